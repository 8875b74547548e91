"""`python -m reid_jax.captioning templates|caption|ground ...`: TDE captions and MUVA part boxes from MLLMs.

  templates  grow the template bank by a multi-turn dialogue with an LLM server -> one template per line
  caption    one caption per image (static instruction or a template) -> JSONL for the luperson_mllm builder
  ground     head / upper-body / legs boxes per image, calibrated -> parts.jsonl for --part_boxes

Every number below is a flag with its default shown by --help. Runs are resumable: rerun the same command after
any crash and only the images not yet in --out are done. The server is asked for its model list once before a
run starts (an unreachable --server stops there, with one line saying so); a run exits 1 when no image succeeded
or more than --max-failed-fraction failed, so that `caption ... && data.build ...` does not go on with a
half-empty file. Path flags expand ~ and $VARS. Errors are one line: exit 1, or 2 for a wrong command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from absl import logging

from reid_jax.captioning import captioner, client, grounding, runner, store
from reid_jax.captioning import templates as templates_lib
from reid_jax.captioning.boxes import SCALES
from reid_jax.captioning.hf_backend import LocalConfig
from reid_jax.data import box_calibration
from reid_jax.errors import EXIT_USAGE, UserError, expand_path, report, warn


class UsageError(UserError):
    """A flag combination that cannot work (exit 2, like argparse's own usage errors)."""


def _path(text: str) -> Path:
    """A path flag, with ~ and $VARS expanded (bash leaves `--out=~/x` as it is)."""
    path = expand_path(text)
    if path is None:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return path


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, such as 0.05; got {text!r}")
    return value


def _floats(n: int, name: str):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(x) for x in text.split(","))
        except ValueError:
            values = ()
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"{name} expects {n} comma-separated numbers; got {text!r}")
        return values
    return parse


def _client_flags(p: argparse.ArgumentParser, default_max_tokens: int, default_temperature: float) -> None:
    d = client.ClientConfig()
    g = p.add_argument_group("server (OpenAI-compatible chat completions)")
    g.add_argument("--server", help="base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", help="model name as the server lists it at /v1/models")
    g.add_argument("--api-key", default=None,  # not the key itself: --help prints defaults
                   help="bearer token, if the server wants one (unset: $OPENAI_API_KEY, if set)")
    g.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request before a retry")
    g.add_argument("--retries", type=int, default=d.retries,
                   help="retries of a request after timeouts, connection errors, 5xx/408/429, malformed answers")
    g.add_argument("--backoff", type=float, default=d.backoff_s, help="first retry wait (s); doubles each retry")
    g.add_argument("--backoff-max", type=float, default=d.backoff_max_s, help="longest retry wait (s)")
    g.add_argument("--max-tokens", type=int, default=default_max_tokens, help="per answer")
    g.add_argument("--temperature", type=float, default=default_temperature, help="sampling temperature")


def _run_flags(p: argparse.ArgumentParser) -> None:
    r, f, loc = runner.RunConfig(), store.FlushConfig(), LocalConfig()
    p.add_argument("--images", required=True, type=_path,
                   help="folder of images (searched recursively; only regular files are read)")
    p.add_argument("--out", required=True, type=_path, help="output JSONL (appended to; a rerun resumes)")
    p.add_argument("--backend", choices=("openai", "transformers"), default="openai")
    p.add_argument("--concurrency", type=int, default=r.concurrency, help="requests in flight")
    p.add_argument("--flush-every", type=int, default=f.every, help="lines per flush")
    p.add_argument("--flush-seconds", type=float, default=f.seconds, help="longest time between flushes")
    p.add_argument("--fsync", action="store_true", help="fsync each flush (survive power loss, slower)")
    p.add_argument("--abort-after", type=int, default=r.abort_after,
                   help="stop after this many images in a row failed (0 = never)")
    p.add_argument("--max-failed-fraction", type=_fraction, default=r.max_failed_fraction,
                   help="exit 1 when more than this fraction of the images tried failed (or none succeeded)")
    p.add_argument("--skip-failed", action="store_true", help="skip images a previous run logged in OUT.failed")
    p.add_argument("--limit", type=int, default=r.limit, help="do at most this many new images (0 = all)")
    p.add_argument("--log-seconds", type=float, default=r.log_seconds,
                   help="progress log period when stderr is not a terminal")
    g = p.add_argument_group("local model (--backend=transformers)")
    g.add_argument("--model-path", type=_path, help="save_pretrained folder: processor (with chat template) + model")
    g.add_argument("--batch-size", type=int, default=loc.batch_size, help="images per generate call")
    g.add_argument("--device", default=loc.device, help="'auto', 'cuda', 'cuda:1', 'cpu'")
    g.add_argument("--dtype", default=loc.dtype, help="'auto' or a torch dtype such as bfloat16")


def _backend(args, stats: runner.Stats):
    """(backend, batch = images per job, concurrency, model name for the source field)."""
    if args.backend == "transformers":
        if not args.model_path:
            raise UsageError("--backend=transformers needs --model-path DIR (a save_pretrained folder)")
        from reid_jax.captioning.hf_backend import TransformersBackend
        local = LocalConfig(args.batch_size, args.max_tokens, args.temperature, args.device, args.dtype)
        return TransformersBackend(args.model_path, local), args.batch_size, 1, Path(args.model_path).name
    if not args.server or not args.model:
        raise UsageError("--server URL and --model NAME are required with --backend=openai "
                         "(or pass --backend=transformers --model-path DIR)")
    return _client(args, stats), 1, args.concurrency, args.model


def _client(args, stats: runner.Stats) -> client.ChatClient:
    """The HTTP client, once the server has answered (`_check_server`)."""
    api_key = args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY", "")
    cfg = client.ClientConfig(args.timeout, args.retries, args.backoff, args.backoff_max, args.max_tokens,
                              args.temperature, api_key)
    probe = client.ChatClient(args.server, args.model, cfg, on_retry=_waiting(args.server))
    _check_server(probe, args)  # its retries are waiting for the server, not the run's: not counted in stats
    probe.close()
    return client.ChatClient(args.server, args.model, cfg, on_retry=lambda e: stats.add("retries"))


def _waiting(server: str):
    def on_retry(e: Exception) -> None:
        logging.warning("--server %s: %s; trying again", server, e)
    return on_retry


def _check_server(chat: client.ChatClient, args) -> None:
    """One model-list request before any image: a server that is down stops the run here, not image by image."""
    try:
        models = chat.models()
    except client.RetryableError as e:
        raise UserError(f"--server {args.server}: no usable answer ({e}); start the model server, or fix --server "
                        "(the OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1)") from None
    except client.RequestError as e:
        raise UserError(f"--server {args.server}: {e}") from None
    if models is not None and args.model not in models:  # only a warning: Ollama answers 'llava' as 'llava:latest'
        warn(f"--model {args.model!r} is not among the models {args.server} lists ({', '.join(models[:8])}); "
             "if requests are refused, pass one of those")


def _run(args, job, stats, batch: int, concurrency: int, desc: str) -> int:
    cfg = runner.RunConfig(concurrency, args.abort_after, args.skip_failed, args.limit, args.log_seconds,
                           args.max_failed_fraction)
    flush = store.FlushConfig(args.flush_every, args.flush_seconds, args.fsync)
    summary = runner.run(args.images, args.out, job, stats, cfg, flush, batch, desc)
    print(json.dumps({"command": args.command, "out": str(args.out), **summary}), flush=True)
    logging.info("%s: %d succeeded, %d failed (logged in %s.failed), %d retries; %.1f s", desc,
                 summary["succeeded"], summary["failed"], args.out, summary.get("retries", 0), summary["elapsed_s"])
    why = runner.verdict(summary, cfg, args.out)
    if why:
        raise runner.RunFailed(why)
    return 0


def cmd_caption(args) -> int:
    stats = runner.Stats()
    runner.check_folder(args.images)  # before the server check, which may wait for a server still loading
    bank = templates_lib.load_bank(args.templates)
    backend, batch, concurrency, name = _backend(args, stats)
    cfg = captioner.CaptionConfig(args.mode, args.source, args.content_retries, args.retry_temperature,
                                  args.min_chars, args.seed)
    source = args.source or captioner.source_name(name, args.mode)
    job = captioner.make_job(backend, args.images, bank, cfg, source, stats)
    return _run(args, job, stats, batch, concurrency, f"caption ({source})")


def cmd_ground(args) -> int:
    stats = runner.Stats()
    calib = box_calibration.CalibrationConfig(tuple(zip(args.bands[::2], args.bands[1::2])), args.min_height,
                                          args.min_width, args.max_height, not args.no_trim_legs)
    calib.validate()
    runner.check_folder(args.images)
    names = tuple(n.strip() for n in args.part_names.split(","))
    if len(names) != len(box_calibration.PARTS):
        raise UsageError(f"--part-names needs {len(box_calibration.PARTS)} comma-separated names (head, upper body, "
                         f"legs in that order); got {args.part_names!r}")
    cfg = grounding.GroundConfig(args.ask, args.part_prompt, args.joint_prompt, names, args.scale,
                                 args.content_retries, args.retry_temperature)
    backend, batch, concurrency, _ = _backend(args, stats)
    job = grounding.make_job(backend, args.images, cfg, calib, stats)
    return _run(args, job, stats, batch, concurrency, "ground")


def cmd_templates(args) -> int:
    if not args.server or not args.model:
        raise UsageError("--server URL and --model NAME are required")
    rules = templates_lib.TemplateRules(args.min_slots, max_similarity=args.max_similarity)
    start = args.out if args.out.exists() else args.bank  # an existing --out is grown further (resumable)
    bank = templates_lib.load_bank(start, rules)
    stats = runner.Stats()
    chat_client = _client(args, stats)
    dcfg = templates_lib.DialogueConfig(args.rounds, args.per_round, args.examples, args.temperature,
                                        args.max_tokens)

    def chat(messages):
        return chat_client.ask(client.Request("", messages=tuple(messages)))

    def on_round(r, kept, rejected):
        templates_lib.save_bank(bank, args.out)  # after every round: a crash loses one round at most
        logging.info("round %d: kept %d, rejected %d; bank has %d templates", r + 1, len(kept), len(rejected),
                     len(bank))
        for cand, why in rejected:
            logging.info("  rejected (%s): %s", why, cand)

    size0 = len(bank)
    try:
        kept, rejected = templates_lib.dialogue(bank, chat, dcfg, rules, on_round)
    except (client.RetryableError, client.RequestError) as e:
        raise UserError(f"{e}; the rounds already done are saved in --out {args.out}: rerun to go on") from None
    templates_lib.save_bank(bank, args.out)
    print(json.dumps({"command": "templates", "out": str(args.out), "start": size0, "kept": len(kept),
                      "rejected": len(rejected), "bank": len(bank), "retries": stats.counts["retries"]}), flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reid_jax.captioning", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = sub.add_parser("templates", help="grow the template bank with an LLM", formatter_class=fmt)
    dd, rr = templates_lib.DialogueConfig(), templates_lib.TemplateRules()
    t.add_argument("--out", required=True, type=_path, help="bank file to write (grown further if it exists)")
    t.add_argument("--bank", type=_path, default=None, help="bank to start from (default: the built-in one)")
    t.add_argument("--rounds", type=int, default=dd.rounds, help="dialogue turns")
    t.add_argument("--per-round", type=int, default=dd.per_round, help="templates asked for per turn")
    t.add_argument("--examples", type=int, default=dd.examples, help="bank templates shown as examples")
    t.add_argument("--min-slots", type=int, default=rr.min_slots, help="distinct slots a template needs")
    t.add_argument("--max-similarity", type=float, default=rr.max_similarity,
                   help="word-level similarity to a bank template at or above which a new one is a near-duplicate")
    _client_flags(t, dd.max_tokens, dd.temperature)
    t.set_defaults(fn=cmd_templates)

    c = sub.add_parser("caption", help="caption every image", formatter_class=fmt)
    cc = captioner.CaptionConfig()
    c.add_argument("--mode", choices=captioner.MODES, default=cc.mode, help="static instruction or templates")
    c.add_argument("--templates", type=_path, default=None, help="bank file (default: the built-in bank)")
    c.add_argument("--source", default=cc.source, help="the 'source' field (default: <model>_<mode>)")
    c.add_argument("--content-retries", type=int, default=cc.content_retries,
                   help="asks again after an empty or slot-leaking caption (next template, --retry-temperature)")
    c.add_argument("--retry-temperature", type=float, default=cc.retry_temperature)
    c.add_argument("--min-chars", type=int, default=cc.min_chars, help="shorter captions count as empty")
    c.add_argument("--seed", type=int, default=cc.seed, help="template assignment")
    _run_flags(c)
    _client_flags(c, client.ClientConfig().max_tokens, client.ClientConfig().temperature)
    c.set_defaults(fn=cmd_caption)

    g = sub.add_parser("ground", help="part boxes for every image", formatter_class=fmt)
    gg, cal = grounding.GroundConfig(), box_calibration.CalibrationConfig()
    g.add_argument("--ask", choices=grounding.ASK, default=gg.ask, help="one question per part, or one for all")
    g.add_argument("--part-prompt", default=gg.part_prompt, help="question per part; {part} = its name")
    g.add_argument("--joint-prompt", default=gg.joint_prompt, help="question for all parts (--ask=joint)")
    g.add_argument("--part-names", default=",".join(gg.part_names), help="head, upper body, legs as asked")
    g.add_argument("--scale", choices=SCALES, default=gg.scale,
                   help="answer coordinates: 0-1000 (Qwen-VL, CogVLM, InternVL), 0-1, pixels (Qwen2.5-VL), auto")
    g.add_argument("--content-retries", type=int, default=gg.content_retries, help="asks again without a box")
    g.add_argument("--retry-temperature", type=float, default=gg.retry_temperature)
    g.add_argument("--bands", type=_floats(6, "--bands"), default=sum(cal.bands, ()),
                   help="fallback bands y0,y1 of head, upper body, legs (fractions of the height)")
    g.add_argument("--min-height", type=_floats(3, "--min-height"), default=cal.min_height,
                   help="per part: shorter boxes are misses")
    g.add_argument("--min-width", type=float, default=cal.min_width, help="narrower boxes are misses")
    g.add_argument("--max-height", type=_floats(3, "--max-height"), default=cal.max_height,
                   help="per part: taller boxes hold the whole person")
    g.add_argument("--no-trim-legs", action="store_true", help="a too-tall legs box falls back instead")
    _run_flags(g)
    _client_flags(g, client.ClientConfig().max_tokens, client.ClientConfig().temperature)
    g.set_defaults(fn=cmd_ground)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        return args.fn(args)
    except UsageError as e:
        return report(UsageError(f"{args.command}: {e}"), EXIT_USAGE)
    except UserError as e:
        return report(UserError(f"{args.command}: {e}"))
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted; what was written is kept, rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
