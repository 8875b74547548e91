"""Throughput measurements: `python -m reid_jax.bench encode --image-size=384,128 --batch=8`.

Speed is measured here, not in the tests. Each benchmark prints one JSON line per setting so that results can be
collected into tables (`... | tee bench.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

from reid_jax.models import clip as clip_lib

PRESETS = {"vit_b16": clip_lib.CLIPConfig.vit_b16, "tiny": clip_lib.CLIPConfig.tiny}


def _model(args) -> clip_lib.CLIP:
    if args.checkpoint:
        return clip_lib.load_pretrained(args.checkpoint, image_size=args.image_size, stride=args.stride,
                                        dtype=args.dtype)
    cfg = PRESETS[args.model](image_size=args.image_size, stride=args.stride, dtype=args.dtype)
    return clip_lib.CLIP(cfg, rngs=nnx.Rngs(0))


def _compile_seconds(model: clip_lib.CLIP, method: str, x) -> float:
    """Ahead-of-time lower + compile of the same computation `encode_*` jits."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))
    t0 = time.perf_counter()
    fn.lower(state, x).compile()
    return time.perf_counter() - t0


def _run_seconds(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. trace + compile, median steady-state seconds per call)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench_encode(args) -> None:
    """`model.encode_image` / `encode_text` as a user calls them: numpy in, jitted inside."""
    model = _model(args)
    rng = np.random.default_rng(0)
    for batch in args.batch:
        images = rng.normal(size=(batch, *args.image_size, 3)).astype(np.float32)
        ids = np.zeros((batch, model.config.text.context_length), np.int32)
        ids[:, 0], ids[:, 1:10], ids[:, 10] = 49406, 320, 49407
        for name, method, x in (("encode_image", "image_features", images), ("encode_text", "text_features", ids)):
            compile_s = _compile_seconds(model, method, jax.numpy.asarray(x))
            first, steady = _run_seconds(lambda: getattr(model, name)(x), args.repeats)
            print(json.dumps({
                "bench": name, "model": args.model, "image_size": list(args.image_size), "stride": args.stride,
                "dtype": args.dtype, "batch": batch, "device": jax.devices()[0].device_kind,
                "compile_s": round(compile_s, 3), "first_call_s": round(first, 3),
                "run_s": round(steady, 4), "items_per_s": round(batch / steady, 1)}), flush=True)


def bench_data(args) -> None:
    """Training input pipeline throughput (decode + augment + tokenise), images/s, per worker count."""
    import ml_collections

    from reid_jax import data
    from reid_jax.data import index as index_lib
    from reid_jax.data import pipeline, transforms

    if args.build:
        from reid_jax.data import build

        build.build(args.dataset, args.data_dir, config=args.config)
    source = data.load_source(args.dataset, args.split, args.data_dir, args.config)
    index = index_lib.split_index(args.dataset, args.split, args.data_dir, args.config)
    aug = transforms.default_config()
    aug.image_size = args.image_size
    for workers in args.workers:
        cfg = ml_collections.ConfigDict({"batch_size": args.batch, "caption_mode": "random", "context_length": 77,
                                         "num_epochs": None, "num_workers": workers, "aug": aug})
        it = iter(pipeline.pairs_train(source, index, cfg, seed=0))
        for _ in range(args.warmup):  # start-up (worker processes, read-ahead) is not timed
            next(it)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        seconds = time.perf_counter() - t0
        rate = args.batch * args.batches / seconds
        print(json.dumps({"bench": "data", "dataset": args.dataset, "image_size": list(args.image_size),
                          "batch": args.batch, "workers": workers, "images_per_s": round(rate, 1),
                          "images_per_s_per_worker": round(rate / max(workers, 1), 1)}), flush=True)


def _hw(text: str) -> tuple[int, int]:
    h, w = (int(x) for x in text.split(","))
    return h, w


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reid_jax.bench")
    sub = parser.add_subparsers(dest="bench", required=True)
    enc = sub.add_parser("encode", help="encode_image / encode_text compile and run time")
    enc.add_argument("--model", choices=sorted(PRESETS), default="vit_b16")
    enc.add_argument("--checkpoint", default=None, help="load weights instead of a random init")
    enc.add_argument("--image-size", type=_hw, default=(384, 128))
    enc.add_argument("--stride", type=int, default=16)
    enc.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    enc.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    enc.add_argument("--repeats", type=int, default=5)
    enc.set_defaults(fn=bench_encode)
    dat = sub.add_parser("data", help="training input pipeline images/s")
    dat.add_argument("--dataset", default="synthetic_pedestrians")
    dat.add_argument("--config", default="demo")
    dat.add_argument("--split", default="train")
    dat.add_argument("--data_dir", required=True)
    dat.add_argument("--build", action="store_true", help="build the dataset first if needed")
    dat.add_argument("--image-size", type=_hw, default=(384, 128))
    dat.add_argument("--batch", type=int, default=64)
    dat.add_argument("--batches", type=int, default=30)
    dat.add_argument("--warmup", type=int, default=3)
    dat.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    dat.set_defaults(fn=bench_data)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
