"""Search benchmarks, run through `python -m reid_jax.bench index | query` (one JSON line per setting).

index: images/s of `search.build` (read, decode, transform, encode, write) against the bare `Encoder` forward on
       the same images already transformed in memory, same batch, compile excluded from both: the overhead.
query: latency of one text or image query (encoder forward + top-K) over galleries of random unit features, and the
       process's peak resident memory, each gallery size in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flax import nnx
from PIL import Image

from reid_jax.inference import Encoder
from reid_jax.models import clip as clip_lib
from reid_jax.weights.released import Loaded, common


def random_encoder(preset: str, image_size: tuple[int, int], dtype: str) -> Encoder:
    """An Encoder over a randomly initialised CLIP (speed does not depend on the weights)."""
    cfg = getattr(clip_lib.CLIPConfig, preset)(image_size=image_size)
    model = clip_lib.CLIP(cfg, rngs=nnx.Rngs(0))
    mean, std = common.CLIP_MEAN_STD
    loaded = Loaded("clip", model, lambda m, images, camids=None: m.image_features(images),
                    lambda m, ids: m.text_features(ids), image_size, mean, std, {"stride": cfg.vision.stride})
    return Encoder(loaded, Path(f"random-{preset}"), dtype)


def _gallery(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """n JPEGs of a pedestrian crop's size (Market-1501's are 128 x 64), smooth noise so they compress like photos."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(small).resize(size[::-1], Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def bench_index(args) -> None:
    from reid_jax.search import index

    enc = random_encoder(args.model, args.image_size, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = _gallery(tmp / "gallery", args.images, args.source_size)
        _gallery(tmp / "warmup", args.batch, args.source_size, seed=1)
        cfg = index.BuildConfig(batch=args.batch, workers=args.workers, dtype=args.dtype)
        index.build(enc.source, tmp / "warmup", tmp / "warmup.index", cfg=cfg, encoder=enc)  # compiles the step

        x = np.stack([enc.preprocess(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
        batches = [x[i:i + args.batch] for i in range(0, len(x), args.batch)]
        batches[-1] = np.concatenate([batches[-1], np.zeros((args.batch - len(batches[-1]), *x.shape[1:]),
                                                            x.dtype)])  # the indexer pads too
        enc.image_features(batches[0])  # compile
        bare, runs = [], []
        for r in range(args.repeats):  # alternating, so both see the same machine
            t0 = time.perf_counter()
            for b in batches:
                enc.image_features(b)
            bare.append(time.perf_counter() - t0)
            summary = index.build(enc.source, tmp / "gallery", tmp / f"run{r}.index", cfg=cfg, encoder=enc)
            runs.append(summary["encode_seconds"])
    bare_s, index_s = statistics.median(bare), statistics.median(runs)
    print(json.dumps({"bench": "index", "model": args.model, "image_size": list(args.image_size),
                      "dtype": enc.dtype, "images": args.images, "batch": args.batch,
                      "bare_images_per_s": round(args.images / bare_s, 2),
                      "index_images_per_s": round(args.images / index_s, 2),
                      "overhead_pct": round(100 * (index_s / bare_s - 1), 1), "repeats": args.repeats}), flush=True)


def _random_gallery(path: Path, n: int, dim: int, block: int = 1 << 16) -> None:
    """n random unit rows as a float16 .npy, written block by block through the file (not a memory map, whose
    written pages would count in this process's resident memory)."""
    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    offset = header.offset
    del header
    rng = np.random.default_rng(0)
    with open(path, "r+b") as f:
        f.seek(offset)
        for start in range(0, n, block):
            rows = rng.standard_normal((min(block, n - start), dim), np.float32)
            f.write((rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16).tobytes())


def _query_one(args) -> None:
    """In its own process: a gallery of args.n random unit rows on disk, then timed queries."""
    from reid_jax import tokenizer
    from reid_jax.search import topk

    args.n = args.n_list[0]
    enc = random_encoder(args.model, args.image_size, args.dtype)
    dim = enc.image_features(np.zeros((1, *args.image_size, 3), np.float32)).shape[1]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "features.npy"
        _random_gallery(path, args.n, int(dim))
        feats = np.load(path, mmap_mode="r")
        ids = tokenizer.tokenize("a woman in a red coat with a black backpack", enc.context_length)
        image = np.random.default_rng(1).normal(size=(1, *args.image_size, 3)).astype(np.float32)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {"bench": "query", "model": args.model, "n": args.n, "dim": int(dim), "top": args.top}
        for kind, encode in (("text", lambda: enc.text_features(ids)), ("image", lambda: enc.image_features(image))):
            q = encode()
            topk.top_k(feats, q, args.top)  # compile
            times, enc_times = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                q = encode()
                t1 = time.perf_counter()
                topk.top_k(feats, q / np.linalg.norm(q), args.top)
                times.append(time.perf_counter() - t0)
                enc_times.append(t1 - t0)
            out[f"{kind}_ms"] = round(1e3 * statistics.median(times), 2)
            out[f"{kind}_encode_ms"] = round(1e3 * statistics.median(enc_times), 2)
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out["rss_before_queries_mb"] = round(rss_before / 1024, 1)
        out["gallery_mb"] = round(args.n * dim * 2 / 2 ** 20, 1)
    print(json.dumps(out), flush=True)


def bench_query(args) -> None:
    if args.inner:
        return _query_one(args)
    for n in args.n_list:
        cmd = [sys.executable, "-m", "reid_jax.bench", "query", f"--n={n}", f"--model={args.model}",
               f"--image-size={args.image_size[0]},{args.image_size[1]}", f"--top={args.top}",
               f"--repeats={args.repeats}", f"--dtype={args.dtype}", "--inner"] + ([f"--tmp={args.tmp}"]
                                                                                    if args.tmp else [])
        subprocess.run(cmd, check=True)


def add_parsers(sub, hw) -> None:
    """The `index` and `query` subcommands of `python -m reid_jax.bench`."""
    idx = sub.add_parser("index", help="search index images/s against the bare Encoder forward")
    idx.add_argument("--model", default="vit_b16", choices=("vit_b16", "tiny"))
    idx.add_argument("--image-size", type=hw, default=(384, 128))
    idx.add_argument("--source-size", type=hw, default=(128, 64), help="size of the JPEGs on disk")
    idx.add_argument("--images", type=int, default=256)
    idx.add_argument("--batch", type=int, default=32)
    idx.add_argument("--workers", type=int, default=0)
    idx.add_argument("--dtype", default="auto")
    idx.add_argument("--repeats", type=int, default=3)
    idx.set_defaults(fn=bench_index)
    q = sub.add_parser("query", help="query latency and peak memory over galleries of random features")
    q.add_argument("--n", dest="n_list", type=lambda s: [int(float(x)) for x in s.split(",")],
                   default=[10_000, 1_000_000, 10_000_000])
    q.add_argument("--model", default="vit_b16", choices=("vit_b16", "tiny"))
    q.add_argument("--image-size", type=hw, default=(384, 128))
    q.add_argument("--top", type=int, default=10)
    q.add_argument("--repeats", type=int, default=5)
    q.add_argument("--dtype", default="auto")
    q.add_argument("--tmp", default=None, help="folder for the gallery file (10M x 512 float16 = 9.8 GiB)")
    q.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    q.set_defaults(fn=bench_query)
