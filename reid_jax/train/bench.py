"""Training throughput with the real input pipeline: `python -m reid_jax.bench train --data_dir=DIR [--build]`.

The TDE+NAM recipe (configs/tde_nam.py) on a built dataset (synthetic_pedestrians `demo` by default): the grain
stream `pairs_train` with `--workers` processes feeds the jitted step `loop.fit` runs (`loop.jitted_step`), the
next batches read and sent in the background (`loop.prefetch`), as in training. One JSON line:

  pairs_per_s     steady state, pipeline and step together (after `--warmup` steps, compilation excluded)
  step_only_ms    the same step fed one fixed device batch: what the model alone allows
  input_wait_ms   per step, time the loop was blocked waiting for its next batch (reading, augmenting and the
                  host-to-device transfer not hidden behind the step)
  host_cores      CPU seconds of this process and its children (the grain workers) per wall second, over the
                  steady state; on a CPU backend that includes the step itself
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import psutil

from reid_jax.errors import UserError

PRESETS = {"vit-b-16": "vit_b16", "tiny": "tiny"}


def _cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of `process` and its live children (grain's workers outlive the measurement, so
    RUSAGE_CHILDREN, which counts only children that exited, would miss them)."""
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def config_for(args) -> ml_collections.ConfigDict:
    """configs/tde_nam.py's paper recipe on `args.dataset` with the bench's model, batch, workers and device
    augmentation."""
    from reid_jax.models.clip import CLIPConfig

    path = Path(__file__).resolve().parents[2] / "configs" / "tde_nam.py"
    if not path.is_file():
        raise UserError(f"bench train reads the TDE+NAM recipe from {path}, which is missing: run it from a source "
                        f"checkout (`pip install -e .`)")
    spec = importlib.util.spec_from_file_location("tde_nam_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("")
    preset = PRESETS[args.model]
    arch = getattr(CLIPConfig, preset)()
    c.model.update({"preset": preset, "image_size": tuple(args.image_size), "dtype": args.dtype})
    c.data.update({"data_dir": str(args.data_dir), "auto_build": args.build, "batch_size": args.batch,
                   "num_workers": args.workers, "context_length": arch.text.context_length})
    c.data.train = ml_collections.ConfigDict({"name": args.dataset, "split": "train", "config": args.config,
                                              "label": args.dataset})
    c.data.aug.on_device, c.data.aug.resize_on_device = args.on_device, args.resize_on_device
    c.nam.layer = min(c.nam.layer, arch.vision.layers, arch.text.layers)
    return c


def bench_train(args) -> None:
    from reid_jax.data.pipeline import Shard, close_stream
    from reid_jax.train import loop, tde_nam

    config = config_for(args)
    with tempfile.TemporaryDirectory() as workdir:
        task = tde_nam.Task(config, Path(workdir))
    mesh, graphdef, state, shardings = loop.place_state(config, task)
    step_fn = loop.jitted_step(config, task, graphdef, shardings)
    iterator = iter(task.train_stream(Shard.from_jax()))
    ahead = loop.prefetch(iterator, mesh)
    process = psutil.Process()
    batch = metrics = None
    try:
        t0 = time.perf_counter()
        for step in range(max(args.warmup, 1)):  # compilation, worker start-up and read-ahead are not timed
            batch, _ = next(ahead)
            state, metrics = step_fn(state, batch, step)
            jax.block_until_ready(metrics)
        warmup_s = time.perf_counter() - t0

        wait, cpu0, t0 = 0.0, _cpu_seconds(process), time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            t = time.perf_counter()
            batch, _ = next(ahead)
            wait += time.perf_counter() - t
            state, metrics = step_fn(state, batch, step)
        jax.block_until_ready((state, metrics))
        wall, cpu = time.perf_counter() - t0, _cpu_seconds(process) - cpu0

        t0 = time.perf_counter()
        for step in range(args.steps):  # the last batch again and again: no input at all
            state, metrics = step_fn(state, batch, step)
        jax.block_until_ready((state, metrics))
        step_only = (time.perf_counter() - t0) / args.steps
    finally:
        batch = metrics = None
        ahead.close()
        close_stream(iterator)
    pairs = args.batch * args.steps
    print(json.dumps({
        "bench": "train", "model": args.model, "image_size": list(args.image_size), "dtype": args.dtype,
        "batch": args.batch, "workers": args.workers, "on_device": args.on_device,
        "resize_on_device": args.on_device and args.resize_on_device, "steps": args.steps,
        "device": jax.devices()[0].device_kind, "warmup_s": round(warmup_s, 1),
        "pairs_per_s": round(pairs / wall, 1), "step_ms": round(wall / args.steps * 1e3, 2),
        "step_only_ms": round(step_only * 1e3, 2), "step_only_pairs_per_s": round(args.batch / step_only, 1),
        "input_wait_ms": round(wait / args.steps * 1e3, 2), "host_cores": round(cpu / wall, 2),
        "host_cpu_ms_per_pair": round(cpu / pairs * 1e3, 3)}), flush=True)


def add_parsers(sub, hw) -> None:
    """The `train` subcommand of `python -m reid_jax.bench`."""
    tr = sub.add_parser("train", help="training pairs/s with the grain pipeline feeding the jitted TDE+NAM step")
    tr.add_argument("--data_dir", required=True, help="TFDS folder holding the dataset")
    tr.add_argument("--build", action="store_true", help="build the dataset first if it is missing (synthetic only)")
    tr.add_argument("--dataset", default="synthetic_pedestrians")
    tr.add_argument("--config", default="demo", help="the dataset's builder config")
    tr.add_argument("--model", choices=sorted(PRESETS), default="vit-b-16")
    tr.add_argument("--image-size", type=hw, default=(384, 128))
    tr.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    tr.add_argument("--batch", type=int, default=64)
    tr.add_argument("--workers", type=int, default=8, help="grain worker processes (0 = threads in this process)")
    tr.add_argument("--steps", type=int, default=20, help="timed steps")
    tr.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first compiles)")
    tr.add_argument("--on-device", action=argparse.BooleanOptionalAction, default=True,
                    help="normalise and erase on the device from uint8 images (config.data.aug.on_device)")
    tr.add_argument("--resize-on-device", action=argparse.BooleanOptionalAction, default=True,
                    help="with --on-device: resize, flip and crop on the device too (config.data.aug.resize_on_device)")
    tr.set_defaults(fn=bench_train)
