"""Every GPU figure docs/speed.md asks for, in one command: `python -m reid_jax.bench gpu_report --out=DIR
--data_dir=DATA`.

A lent GPU comes with minutes, not hours: the benches run one after another from a fixed plan, most wanted first,
each in a process of its own (a crash, a refusal or a hang costs one row, and each starts with the device's memory
free), and a bench is not started when the time left in `--budget` is below its estimate. After every bench the
three files are rewritten (temporary name, then rename), so a run cut short keeps what it measured:

  DIR/results.jsonl  every JSON row the benches printed, each with its plan entry's name (`entry`)
  DIR/log.txt        everything they printed, with each entry's command and exit status
  DIR/summary.md     the tables: attention (XLA vs cuDNN: time, largest relative difference of output and
                     gradients), the training step (ms, pairs/s, MFU per batch and attention), PyTorch AMP's same
                     step, and the real pipeline feeding the step against the step alone
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from reid_jax.files import write_text_atomically


@dataclasses.dataclass(frozen=True)
class Entry:
    """One bench of the plan: `python -m reid_jax.bench *argv`, not started with under `estimate_s` left."""
    name: str
    argv: tuple[str, ...]
    estimate_s: float


def gpu_plan(data_dir: str, workers: int) -> list[Entry]:
    """The issue's GPU measurements, most wanted first (ViT-B/16 + text at 384x128, bfloat16, SDM + AdamW)."""
    step = ("train_step", "--dtype=bfloat16", "--steps=20")
    return [
        Entry("attention_image", ("attention", "--tokens=193", "--pad-to=2", "--batch=64"), 45),
        Entry("step_b64", (*step, "--batch=64", "--profile=30"), 120),
        Entry("step_b64_xla", (*step, "--batch=64", "--attention=xla"), 100),
        Entry("step_b256", (*step, "--batch=256", "--steps=10"), 120),
        Entry("train_b64", ("train", f"--data_dir={data_dir}", "--build", f"--workers={workers}", "--batch=64",
                            "--steps=30"), 180),
        Entry("torch_amp_b64", ("train_step", "--torch", "--amp", "--device=cuda", "--batch=64", "--steps=20"), 60),
        Entry("attention_text", ("attention", "--tokens=77", "--causal", "--batch=64"), 45),
        Entry("step_b256_xla", (*step, "--batch=256", "--steps=10", "--attention=xla"), 120),
    ]


def run_plan(plan: list[Entry], out: Path, budget_s: float, python: str = sys.executable) -> list[dict]:
    """Runs `plan` in order inside `budget_s` seconds, writing `out`'s three files after every entry; returns the
    rows. An entry is stopped (and its process group killed) when it outlives the time left."""
    out.mkdir(parents=True, exist_ok=True)
    rows, log, start = [], [], time.monotonic()
    for entry in plan:
        left = budget_s - (time.monotonic() - start)
        if left < entry.estimate_s:
            log.append(f"## {entry.name}: skipped ({left:.0f} s left, estimate {entry.estimate_s:.0f} s)\n")
            continue
        command = [python, "-m", "reid_jax.bench", *entry.argv]
        t0 = time.monotonic()
        text, status = _run(command, left)
        log.append(f"## {entry.name}: {' '.join(command[1:])}\n{text}\n"
                   f"## {entry.name}: {status} after {time.monotonic() - t0:.0f} s\n")
        rows += [{"entry": entry.name} | row for row in _json_rows(text)]
        _write(out, rows, log)
    _write(out, rows, log)
    return rows


def _run(command: list[str], timeout_s: float) -> tuple[str, str]:
    """(stdout + stderr, 'exit N' or 'stopped at the budget') of `command` in a new process group."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True) as process:
        try:
            text, _ = process.communicate(timeout=timeout_s)
            return text, f"exit {process.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # its children too (the PyTorch process, grain's workers)
            text, _ = process.communicate()
            return text, "stopped at the budget"


def _json_rows(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a log line that happens to start with a brace
    return rows


def _write(out: Path, rows: list[dict], log: list[str]) -> None:
    write_text_atomically(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text_atomically(out / "log.txt", "\n".join(log))
    write_text_atomically(out / "summary.md", summary(rows))


def _table(header: list[str], lines: list[list]) -> str:
    cells = [header, ["---"] * len(header), *[["" if v is None else str(v) for v in line] for line in lines]]
    return "".join("| " + " | ".join(c) + " |\n" for c in cells)


def summary(rows: list[dict]) -> str:
    """The markdown tables of `rows` (see the module docstring); a kind of bench with no row is left out."""
    device = next((r["device"] for r in rows if r.get("device")), "unknown device")
    parts = [f"# GPU report: {device}\n"]
    attention = [r for r in rows if r.get("bench") == "attention"]
    if attention:
        parts.append("\n## Attention, forward + backward\n\n" + _table(
            ["entry", "implementation", "tokens (padded)", "causal", "ms", "out", "dq", "dk", "dv", "error"],
            [[r["entry"], r["implementation"], f"{r.get('tokens')} ({r.get('padded_to')})", r.get("causal"),
              r.get("fwd_bwd_ms"), *(_g(r.get(f"{n}_rel_err")) for n in ("out", "dq", "dk", "dv")),
              r.get("error")] for r in attention]))
    steps = [r for r in rows if r.get("bench") in ("train_step", "train_step_torch")]
    if steps:
        parts.append("\n## The training step\n\n" + _table(
            ["entry", "code", "batch", "attention", "ms", "pairs/s", "TFLOP/s", "MFU", "compile s"],
            [[r["entry"], "PyTorch AMP" if r["bench"] == "train_step_torch" else "ours", r["batch"],
              r.get("attention"), r["step_ms"], r["pairs_per_s"], r.get("tflops_per_s"),
              f"{r['mfu']:.1%}" if r.get("mfu") is not None else None, r.get("compile_s")] for r in steps]))
    train = [r for r in rows if r.get("bench") == "train"]
    if train:
        parts.append("\n## The pipeline feeding the step\n\n" + _table(
            ["entry", "batch", "workers", "pairs/s", "step alone, pairs/s", "end to end / step alone",
             "input wait ms", "host cores"],
            [[r["entry"], r["batch"], r["workers"], r["pairs_per_s"], r["step_only_pairs_per_s"],
              f"{r['pairs_per_s'] / r['step_only_pairs_per_s']:.2f}", r["input_wait_ms"], r["host_cores"]]
             for r in train]))
    return "".join(parts)


def _g(value) -> str | None:
    return None if value is None else f"{value:.2g}"


def bench_gpu_report(args) -> None:
    plan = gpu_plan(args.data_dir, args.workers or max(1, (os.cpu_count() or 2) - 4))
    if args.only:
        unknown = set(args.only) - {e.name for e in plan}
        if unknown:
            raise SystemExit(f"--only: no plan entry named {sorted(unknown)}; the plan's entries: "
                             f"{[e.name for e in plan]}")
        plan = [e for e in plan if e.name in args.only]
    run_plan(plan, Path(args.out), args.budget)
    print((Path(args.out) / "summary.md").read_text(), flush=True)


def add_parsers(sub) -> None:
    """The `gpu_report` subcommand of `python -m reid_jax.bench`."""
    rep = sub.add_parser("gpu_report", help="the GPU benches docs/speed.md reports, in one run within a budget")
    rep.add_argument("--out", required=True, help="folder for results.jsonl, log.txt and summary.md")
    rep.add_argument("--data_dir", required=True, help="TFDS folder for the end-to-end bench (built if missing)")
    rep.add_argument("--budget", type=float, default=540.0, help="seconds for the whole plan")
    rep.add_argument("--workers", type=int, default=0, help="grain workers end to end (0 = the cores less 4)")
    rep.add_argument("--only", nargs="+", default=None, help="run only these plan entries, in plan order")
    rep.set_defaults(fn=bench_gpu_report)
