"""The captioner's own cost per image, against the local mock server answering at once.

`python -m reid_jax.captioning.bench [--images 256] [--concurrency 1 32] [--mode template]`

The mock server runs in its own process (so that it does not share this interpreter's GIL) and answers each
request with no delay; what is left is the HTTP round trip on loopback, the server's own handling, and the
captioner's work (reading the file, base64, JSON, checks, writing the line). `bare_ms` is the floor: the same
requests posted one after another on one keep-alive connection with no captioner around them.
With --server-delay (model time stand-in) it shows how concurrency hides the server's latency.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reid_jax.captioning import captioner, client, runner, store
from reid_jax.captioning import templates as templates_lib


def _start_server(folder: Path, n: int, delay: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "reid_jax.captioning.mock_server", "--images", str(folder),
                             "--render", str(n), "--delay", str(delay)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("the mock server did not start (see its error above)")
    return proc, json.loads(line)["url"]


def bare_ms(url: str, folder: Path, keys: list[str], mode: str) -> float:
    """ms per request, sequential, one connection, no captioner: the floor of the round trip."""
    chat = client.ChatClient(url, "mock", client.ClientConfig(retries=0))
    prompt = (templates_lib.STATIC_INSTRUCTION if mode == "static"
              else templates_lib.TEMPLATE_INSTRUCTION.format(template=templates_lib.TEMPLATES[0]))
    t0 = time.perf_counter()
    for key in keys:
        chat.ask(client.Request(prompt, (folder / key).read_bytes()))
    return 1000 * (time.perf_counter() - t0) / len(keys)


def captioner_ms(url: str, folder: Path, out: Path, concurrency: int, mode: str) -> dict:
    stats = runner.Stats()
    chat = client.ChatClient(url, "mock", client.ClientConfig(), on_retry=lambda e: stats.add("retries"))
    job = captioner.make_job(chat, folder, templates_lib.load_bank(None), captioner.CaptionConfig(mode=mode),
                             "mock_" + mode, stats)
    cfg = runner.RunConfig(concurrency=concurrency, log_seconds=1e9)
    return runner.run(folder, out, job, stats, cfg, store.FlushConfig(), desc=f"bench c={concurrency}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m reid_jax.captioning.bench", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256, help="synthetic images captioned per setting")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--mode", choices=captioner.MODES, default="template")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    p.add_argument("--server-delay", type=float, default=0.0,
                   help="seconds the mock server waits before each answer (a stand-in for model time)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        proc, url = _start_server(folder, args.images, args.server_delay)
        try:
            keys = runner.list_images(folder)
            bare = sorted(bare_ms(url, folder, keys, args.mode) for _ in range(args.repeats))[args.repeats // 2]
            print(json.dumps({"bench": "caption", "setting": "bare_http", "images": len(keys),
                              "server_delay_s": args.server_delay,
                              "ms_per_image": round(bare, 3)}), flush=True)
            for c in args.concurrency:
                runs = [captioner_ms(url, folder, Path(tmp) / f"c{c}_{r}.jsonl", c, args.mode)
                        for r in range(args.repeats)]
                s = sorted(runs, key=lambda x: x["elapsed_s"])[args.repeats // 2]
                assert s["succeeded"] == len(keys), s
                print(json.dumps({"bench": "caption", "setting": f"concurrency={c}", "images": len(keys),
                                  "server_delay_s": args.server_delay,
                                  "ms_per_image": s["ms_per_image"],
                                  "images_per_s": round(len(keys) / s["elapsed_s"], 1),
                                  "overhead_vs_bare_ms": round(s["ms_per_image"] - bare, 3)}), flush=True)
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
