"""Throughput measurements: `python -m reid_jax.bench encode --image-size=384,128 --batch=8`.

Speed is measured here, not in the tests. Each benchmark prints one JSON line per setting so that results can be
collected into tables (`... | tee bench.jsonl`).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads: on a CPU this may restart the process (reid_jax/allocator.py)
    from reid_jax import allocator

    allocator.reexec("reid_jax.bench")

import argparse
import contextlib
import json
import multiprocessing
import statistics
import time

import jax
import numpy as np
from flax import nnx

from reid_jax import weights
from reid_jax.models import clip as clip_lib

PRESETS = {"vit_b16": clip_lib.CLIPConfig.vit_b16, "tiny": clip_lib.CLIPConfig.tiny}


def _model(args) -> clip_lib.CLIP:
    if args.checkpoint:
        return weights.load_clip(args.checkpoint, image_size=args.image_size, stride=args.stride, dtype=args.dtype)
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
    """Training input pipeline throughput (decode + augment + tokenise): images/s per worker count, and the CPU
    time per image of the process and its workers (the cost per core, whatever the threads overlap); and the
    device's part of the same images (`device.prepare_images`, jitted, on this process's first device)."""
    import ml_collections
    import psutil

    from reid_jax import data
    from reid_jax.data import device
    from reid_jax.data import index as index_lib
    from reid_jax.data import pipeline, transforms
    from reid_jax.train.bench import _cpu_seconds

    if args.build:
        from reid_jax.data import build

        build.build(args.dataset, args.data_dir, config=args.config)
    # encoded: the stored bytes, decoded by the pipeline, as the training tasks read them
    source = data.load_source(args.dataset, args.split, args.data_dir, args.config, decode_image=not args.encoded)
    index = index_lib.split_index(args.dataset, args.split, args.data_dir, args.config)
    aug = transforms.default_config()
    aug.image_size = args.image_size
    aug.on_device, aug.resize_on_device = args.on_device, args.resize_on_device
    prepare = jax.jit(lambda b: device.prepare_images(b, aug, jax.random.key(0)))
    process = psutil.Process()
    for workers in [0] if args.inline else args.workers:
        cfg = ml_collections.ConfigDict({"batch_size": args.batch, "caption_mode": "random", "context_length": 77,
                                         "num_epochs": None, "num_workers": workers, "aug": aug})
        if args.inline:  # the batches made one after the other in this thread: the work per image alone
            batches = pipeline.pairs_batches(source, index, cfg, seed=0)
            it = (batches[b] for b in range(len(batches)))
        else:
            it = iter(pipeline.pairs_train(source, index, cfg, seed=0))
        for _ in range(args.warmup):  # start-up (worker processes, read-ahead) is not timed
            next(it)
        t0, cpu0 = time.perf_counter(), _cpu_seconds(process)
        for _ in range(args.batches):
            next(it)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds(process) - cpu0
        batch = next(it)
        pipeline.close_stream(it)
        images = args.batch * args.batches
        device_ms = None  # the host made the float images: nothing left for the device
        if args.on_device:
            fields = {k: batch[k] for k in ("image", "erase", *device.RESAMPLE_FIELDS) if k in batch}
            device_ms = round(1000 * _run_seconds(lambda: prepare(fields), 5)[1] / args.batch, 3)
        print(json.dumps({"bench": "data", "dataset": args.dataset, "image_size": list(args.image_size),
                          "on_device": args.on_device, "resize_on_device": args.on_device and args.resize_on_device,
                          "encoded": args.encoded, "inline": args.inline,
                          "batch": args.batch, "workers": workers, "images_per_s": round(images / seconds, 1),
                          "images_per_s_per_worker": round(images / seconds / max(workers, 1), 1),
                          "cpu_ms_per_image": round(1000 * cpu / images, 3),
                          "device": jax.devices()[0].device_kind,
                          "device_ms_per_image": device_ms}), flush=True)


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks, for MFU


def _peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in kind), None)


def _tower_flops(tokens: int, width: int, mlp_dim: int, layers: int) -> float:
    """Forward FLOPs of `layers` transformer blocks over `tokens` tokens (multiply-add = 2): q/k/v/out
    projections 4 D^2, MLP 2 D M per token, and the T x T scores and weighted sum 2 T D per token."""
    return 2.0 * layers * tokens * (4 * width ** 2 + 2 * width * mlp_dim + 2 * tokens * width)


def train_flops(cfg: clip_lib.CLIPConfig, batch: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward, no remat recompute), the MFU numerator.
    Counted analytically: XLA's cost analysis counts a scanned layer once, and is not offered on every backend."""
    v, t = cfg.vision, cfg.text
    gh, gw = v.grid
    patches = 2.0 * gh * gw * v.patch_size ** 2 * 3 * v.width
    image = patches + _tower_flops(v.num_tokens, v.width, v.mlp_dim, v.layers)
    text = _tower_flops(t.context_length, t.width, t.mlp_dim, t.layers)
    return 3.0 * batch * (image + text)


def _jax_train_step(args):
    """One TDE training step (SDM on image CLS vs caption EOT, AdamW) as the trainer runs it, compiled ->
    (run: one step, blocking, `hlo_text`, cfg, compile seconds)."""
    import jax.numpy as jnp
    import optax

    from reid_jax import losses

    preset = {"vit-b-16": clip_lib.CLIPConfig.vit_b16, "tiny": clip_lib.CLIPConfig.tiny}[args.model]
    cfg = preset(image_size=args.image_size, stride=args.stride, dtype=args.dtype, remat=args.remat,
                 scan_layers=args.scan, attention=args.attention, pad_tokens_to=args.pad_tokens_to)
    model = clip_lib.CLIP(cfg, rngs=nnx.Rngs(0))
    # model + optimizer as the trainer holds them (loop.TrainState), without importing the data stack
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)))
    rng = np.random.default_rng(0)
    length = cfg.text.context_length
    ids = np.zeros((args.batch, length), np.int32)
    words = min(20, length - 2)  # a typical caption: SOT, 20 words, EOT, padding
    ids[:, 0], ids[:, 1: words + 1], ids[:, words + 1] = 49406, rng.integers(1, 49405, (args.batch, words)), 49407
    batch = {"image": jnp.asarray(rng.normal(size=(args.batch, *args.image_size, 3)), jnp.float32),
             "text": jnp.asarray(ids), "pid": jnp.arange(args.batch)}

    def step(state, batch):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(model):
            return losses.sdm(model.image_features(batch["image"]), model.text_features(batch["text"]), batch["pid"])

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]  # the state is donated: each step consumes the one before

    def run():
        holder[0], loss = compiled(holder[0], batch)
        jax.block_until_ready(loss)

    return run, compiled.as_text(), cfg, compile_s


def _step_seconds(runs: dict, steps: int) -> dict[str, list[float]]:
    """Each run once untimed (warm-up), then `steps` rounds in which every run takes one timed step in turn: runs
    compared this way see the same machine load."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            if len(runs) > 1:  # let the other library's idle threads stop spinning (OpenMP waits busy ~0.2 s)
                time.sleep(1.0)
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_train_step(args) -> None:
    """The TDE training step's time, pairs/s and MFU; with `--vs-torch`, alternating with PyTorch's same step."""
    if args.torch:
        run, threads = _torch_train_step(args)
        step_s = statistics.median(_step_seconds({"torch": run}, args.steps)["torch"])
        print(json.dumps({"bench": "train_step_torch", "batch": args.batch, "image_size": list(args.image_size),
                          "amp": args.amp, "device": args.device, "threads": threads,
                          "step_ms": round(step_s * 1e3, 1), "pairs_per_s": round(args.batch / step_s, 2)}),
              flush=True)
        return
    run, hlo_text, cfg, compile_s = _jax_train_step(args)
    runs = {"jax": run}
    with contextlib.ExitStack() as stack:
        if args.vs_torch:
            runs["torch"] = stack.enter_context(_TorchProcess(args))
            threads = runs["torch"].threads
        times = _step_seconds(runs, args.steps)
    step_s = statistics.median(times["jax"])
    if args.profile:
        _print_profile(run, hlo_text, step_s, args)
    flops, peak = train_flops(cfg, args.batch), _peak_flops(args)
    row = {"bench": "train_step", "model": args.model, "batch": args.batch, "image_size": list(args.image_size),
           "dtype": args.dtype, "remat": args.remat, "scan_layers": args.scan,
           "attention": clip_lib.attention_implementation(cfg, cfg.vision.width // cfg.vision.heads),
           "pad_tokens_to": cfg.pad_tokens_to, "device": jax.devices()[0].device_kind,
           "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 1),
           "pairs_per_s": round(args.batch / step_s, 2), "tflops_per_s": round(flops / step_s / 1e12, 3),
           "mfu": round(flops / step_s / peak, 4) if peak else None}
    if args.vs_torch:  # per round: torch's time over ours, so a slow moment of the machine hits both
        ratios = [t / j for t, j in zip(times["torch"], times["jax"])]
        row |= {"torch_amp": args.amp, "torch_threads": threads,
                "torch_step_ms": round(statistics.median(times["torch"]) * 1e3, 1),
                "speedup_vs_torch": round(statistics.median(ratios), 3),
                "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)]}
    print(json.dumps(row), flush=True)


def _print_profile(run, hlo_text: str, step_s: float, args) -> None:
    """The per-op breakdown of `run` (one step): the top `--profile` ops, then time per kind of op."""
    from reid_jax import profiling

    rows = profiling.op_times(run, hlo_text, steps=2)
    total = sum(r["ms_per_step"] for r in rows)
    for r in rows[: args.profile]:
        print(json.dumps({"bench": "profile_op", **{k: r[k] for k in ("op", "opcode", "shape")},
                          "ms": round(r["ms_per_step"], 2), "share": round(r["ms_per_step"] / total, 4),
                          "source": r["source"][-120:]}), flush=True)
    for name, ms, count in profiling.summary(rows):
        print(json.dumps({"bench": "profile_kind", "kind": name, "ops": count, "ms": round(ms, 1),
                          "share": round(ms / total, 4)}), flush=True)
    print(json.dumps({"bench": "profile_total", "op_ms_per_step": round(total, 1),
                      "step_ms": round(step_s * 1e3, 1)}), flush=True)


class _TorchProcess:
    """PyTorch's step (`_torch_train_step`) run in a process of its own, one step per call, for `--vs-torch`.

    Not in this process: there, each library's step slowed the other's next one (on a 2-core EPYC, float32: JAX's
    step 7.0 s before any PyTorch step ran, 9.7 s right after one, 7.4-7.9 s in the steps after that), which no
    pause between them removed; in two processes each keeps its own memory and threads warm and only the cores
    are shared, one step at a time."""

    def __init__(self, args):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        settings = {k: v for k, v in vars(args).items() if not callable(v)}
        self._process = ctx.Process(target=_torch_worker, args=(child, settings), daemon=True)
        self._process.start()
        child.close()
        self.threads = self._reply()

    def _reply(self):
        try:
            kind, value = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise SystemExit(f"the PyTorch reference process ended (exit code {self._process.exitcode})") from None
        if kind == "error":
            raise SystemExit(f"the PyTorch reference step failed: {value}")
        return value

    def __call__(self) -> None:
        self._conn.send("step")
        self._reply()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _torch_worker(conn, settings: dict) -> None:
    """`_TorchProcess`'s side: builds the step, then runs one per "step" message until "stop"."""
    try:
        run, threads = _torch_train_step(argparse.Namespace(**settings))
        conn.send(("ok", threads))
        while conn.recv() == "step":
            run()
            conn.send(("ok", None))
    except (Exception, SystemExit) as e:  # noqa: BLE001 - reported to the parent, which stops there
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _torch_train_step(args):
    """The same step in PyTorch with OpenAI's CLIP model code (clip-anytorch's clip/model.py, installed with
    `pip install --no-deps clip-anytorch`), SDM written in torch, AdamW (`--amp`: bfloat16 autocast): the reference
    for `train_step` -> (run: one step, blocking, torch's thread count)."""
    import importlib.util
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    spec = importlib.util.find_spec("clip")
    if spec is None:
        raise SystemExit("needs `pip install --no-deps clip-anytorch==2.6.0` (OpenAI's model code)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.py"
    mspec = importlib.util.spec_from_file_location("openai_clip_model", path)
    openai = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(openai)
    model = openai.CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12).float()
    gh, gw = ((s - 16) // args.stride + 1 for s in args.image_size)
    with torch.no_grad():  # the ReID grid, as the papers' code resizes it
        pos = model.visual.positional_embedding
        grid = F.interpolate(pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=(gh, gw), mode="bilinear")
        model.visual.positional_embedding = torch.nn.Parameter(
            torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)]))
    model.visual.conv1.stride = (args.stride, args.stride)
    device = torch.device(args.device)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images = torch.randn(args.batch, 3, *args.image_size, device=device)
    ids = torch.zeros(args.batch, 77, dtype=torch.long)
    ids[:, 0], ids[:, 1:21], ids[:, 21] = 49406, torch.randint(1, 49405, (args.batch, 20)), 49407
    ids, pid = ids.to(device), torch.arange(args.batch, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def sdm(img, txt, scale=50.0):
        img, txt = img.float(), txt.float()
        labels = (pid[:, None] == pid[None]).float()
        q = labels / labels.sum(1, keepdim=True)
        t2i = scale * F.normalize(txt, dim=1) @ F.normalize(img, dim=1).t()
        kl = lambda z: (F.softmax(z, 1) * (F.log_softmax(z, 1) - torch.log(q + 1e-8))).sum(1).mean()
        return kl(t2i) + kl(t2i.t())

    def run():
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = sdm(model.encode_image(images), model.encode_text(ids))
        loss.backward()
        opt.step()
        sync()

    run()  # the first steps warm the allocator and kernels up
    return run, torch.get_num_threads()


def bench_attention(args) -> None:
    """The blocks' attention as `CLIP` runs it (tokens padded to `--pad-to` with the pad keys masked) for each
    implementation this device has: forward + backward time, and the largest difference of the output and of the
    q / k / v gradients from XLA's, relative to their largest magnitude."""
    import jax.numpy as jnp

    b, t, h, d = args.batch, args.tokens, args.heads, args.head_dim
    padded = clip_lib.padded_length(t, args.pad_to)
    q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(b, padded, h, d)), args.dtype) for i in range(3))
    cot = jnp.asarray(np.random.default_rng(3).normal(size=(b, padded, h, d)), args.dtype)
    lengths = jnp.full((b,), t, jnp.int32) if padded != t and not args.causal else None

    def attention(impl):
        def loss(q, k, v):
            out = jax.nn.dot_product_attention(q, k, v, is_causal=args.causal, key_value_seq_lengths=lengths,
                                               implementation=impl)
            return jnp.sum((out * cot)[:, :t].astype(jnp.float32)), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    results = {}
    for impl in ("xla", "cudnn"):
        row = {"bench": "attention", "implementation": impl, "device": jax.devices()[0].device_kind, "batch": b,
               "tokens": t, "padded_to": padded, "heads": h, "head_dim": d, "causal": args.causal,
               "dtype": args.dtype}
        try:
            fn = attention(impl)
            (_, out), grads = fn(q, k, v)
        except Exception as e:  # cuDNN absent (CPU) or refusing the shape: reported, not fatal
            print(json.dumps(row | {"error": str(e).splitlines()[0][:200]}), flush=True)
            continue
        _, seconds = _run_seconds(lambda: fn(q, k, v), args.repeats)
        results[impl] = [np.asarray(x[:, :t], np.float32) for x in (out, *grads)]
        row["fwd_bwd_ms"] = round(seconds * 1e3, 3)
        if impl != "xla" and "xla" in results:
            for name, a, ref in zip(("out", "dq", "dk", "dv"), results[impl], results["xla"]):
                row[f"{name}_rel_err"] = float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))
        print(json.dumps(row), flush=True)


def bench_eval(args) -> None:
    """`metrics.text_to_image` on random features of CUHK-PEDES test size (6156 captions, 3074 images)."""
    from reid_jax.eval import metrics

    rng = np.random.default_rng(0)
    pids = rng.integers(0, args.identities, args.gallery)
    gallery = rng.normal(size=(args.gallery, args.dim)).astype(np.float32)
    q_pids = pids[rng.integers(0, args.gallery, args.queries)]
    queries = (gallery[rng.integers(0, args.gallery, args.queries)] +
               rng.normal(size=(args.queries, args.dim))).astype(np.float32)
    metrics.text_to_image(queries, q_pids, gallery, pids)  # compile
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        metrics.text_to_image(queries, q_pids, gallery, pids)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"bench": "eval", "queries": args.queries, "gallery": args.gallery, "dim": args.dim,
                      "device": jax.devices()[0].device_kind, "eval_s": round(statistics.median(times), 4)}),
          flush=True)


def bench_rerank(args) -> None:
    """`rerank.k_reciprocal` (by default k1 50, k2 15, lambda 0.3: `configs/common.py: rerank`) on unit features of
    N / 30 identities (centre + noise), N = Q + G with Q / N as MSMT17's 11,659 / 93,820. Each (N, method) runs in
    a fresh subprocess, so its peak RSS (ru_maxrss) is its own; compilation (tracing, lowering, XLA) is timed apart
    through jax.monitoring and left out of `seconds`. With several methods at one N, each after the first reports
    its largest difference from the one before."""
    import os
    import resource
    import subprocess
    import sys
    import tempfile

    from reid_jax.eval import rerank

    if not args.one:
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.n:
                for i, method in enumerate(args.method):
                    out = os.path.join(tmp, f"{n}_{i}.npy")
                    extra = [f"--save={out}"] if i + 1 < len(args.method) else []
                    extra += [f"--compare={os.path.join(tmp, f'{n}_{i - 1}.npy')}"] if i else []
                    subprocess.run([sys.executable, "-m", "reid_jax.bench", "rerank", "--one", f"--n={n}",
                                    f"--method={method}", f"--dim={args.dim}", f"--k1={args.k1}", f"--k2={args.k2}",
                                    f"--lambda-value={args.lambda_value}", *extra], check=True)
        return

    compile_s = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compile_s.append(secs) if event.startswith("/jax/core/compile/") else None)
    n, method = args.n[0], args.method[0]
    nq = round(n * 11659 / 93820)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, max(1, n // 30), n)
    feats = rng.normal(size=(max(1, n // 30), args.dim)).astype(np.float32)[ids]
    feats += 0.8 * rng.normal(size=feats.shape).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    dist = rerank.k_reciprocal(feats[:nq], feats[nq:], args.k1, args.k2, args.lambda_value, method=method)
    total = time.perf_counter() - t0
    row = {"bench": "rerank", "n": n, "q": nq, "g": n - nq, "dim": args.dim, "k1": args.k1, "k2": args.k2,
           "method": method, "device": jax.devices()[0].device_kind, "seconds": round(total - sum(compile_s), 2),
           "compile_s": round(sum(compile_s), 2),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "rss_before_gib": round(rss_before / 2**20, 2)}  # ru_maxrss is in KiB on Linux
    if args.save:
        np.save(args.save, dist)
    if args.compare:
        row["max_abs_diff"] = float(np.abs(dist - np.load(args.compare)).max())
    print(json.dumps(row), flush=True)


def _hw(text: str) -> tuple[int, int]:
    h, w = (int(x) for x in text.split(","))
    return h, w


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m reid_jax.bench`: one subcommand per bench."""
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
    trs = sub.add_parser("train_step", help="TDE training step time, pairs/s, MFU")
    trs.add_argument("--model", choices=("vit-b-16", "tiny"), default="vit-b-16")
    trs.add_argument("--batch", type=int, default=8)
    trs.add_argument("--image-size", type=_hw, default=(384, 128))
    trs.add_argument("--stride", type=int, default=16)
    trs.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    trs.add_argument("--remat", action="store_true")
    trs.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                     help="blocks as one lax.scan or unrolled (default)")
    trs.add_argument("--attention", default="", choices=clip_lib.ATTENTION,
                     help="jax.nn.dot_product_attention implementation ('' = cuDNN on NVIDIA GPUs in bfloat16, "
                          "else XLA)")
    trs.add_argument("--pad-tokens-to", type=int, default=0,
                     help="pad token sequences to a multiple of this, pad keys masked (0 = 2 for cuDNN, else none)")
    trs.add_argument("--device", default="cpu", help="--torch only: cpu or cuda")
    trs.add_argument("--amp", action="store_true", help="--torch only: bfloat16 autocast (PyTorch AMP)")
    trs.add_argument("--steps", type=int, default=3)
    trs.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (known GPUs built in)")
    trs.add_argument("--torch", action="store_true", help="time the PyTorch reference step instead (ViT-B/16)")
    trs.add_argument("--profile", type=int, default=0, metavar="TOP",
                     help="also trace two steps and print the TOP longest ops and the time per kind of op")
    trs.add_argument("--vs-torch", action="store_true",
                     help="also run PyTorch's step (--amp for autocast), alternating step by step, and report the "
                          "speed-up")
    trs.set_defaults(fn=bench_train_step)
    att = sub.add_parser("attention", help="XLA vs cuDNN attention: time and agreement (values, gradients)")
    att.add_argument("--batch", type=int, default=64)
    att.add_argument("--tokens", type=int, default=193, help="193: ViT-B/16 at 384x128; 77: the text")
    att.add_argument("--pad-to", type=int, default=2)
    att.add_argument("--heads", type=int, default=12)
    att.add_argument("--head-dim", type=int, default=64)
    att.add_argument("--causal", action="store_true")
    att.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    att.add_argument("--repeats", type=int, default=20)
    att.set_defaults(fn=bench_attention)
    ev = sub.add_parser("eval", help="text-to-image metric time (compilation excluded)")
    ev.add_argument("--queries", type=int, default=6156)
    ev.add_argument("--gallery", type=int, default=3074)
    ev.add_argument("--identities", type=int, default=1000)
    ev.add_argument("--dim", type=int, default=512)
    ev.add_argument("--repeats", type=int, default=3)
    ev.set_defaults(fn=bench_eval)
    rr = sub.add_parser("rerank", help="k-reciprocal re-ranking time and peak RSS (a subprocess per setting)")
    rr.add_argument("--n", type=lambda t: [int(v) for v in t.split(",")], default=[20000],
                    help="N = Q + G, comma-separated")
    rr.add_argument("--method", type=lambda t: t.split(","), default=["sparse"], help="dense, sparse or auto, "
                    "comma-separated")
    rr.add_argument("--dim", type=int, default=512)
    rr.add_argument("--k1", type=int, default=50)
    rr.add_argument("--k2", type=int, default=15)
    rr.add_argument("--lambda-value", type=float, default=0.3)
    rr.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run one setting in this process
    rr.add_argument("--save", default="", help=argparse.SUPPRESS)
    rr.add_argument("--compare", default="", help=argparse.SUPPRESS)
    rr.set_defaults(fn=bench_rerank)
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
    dat.add_argument("--on-device", action=argparse.BooleanOptionalAction, default=True,
                     help="uint8 images, normalised and erased on the device (config.data.aug.on_device)")
    dat.add_argument("--resize-on-device", action=argparse.BooleanOptionalAction, default=True,
                     help="with --on-device: resize, flip and crop on the device too, from the decoded sources "
                          "(config.data.aug.resize_on_device)")
    dat.add_argument("--encoded", action=argparse.BooleanOptionalAction, default=True,
                     help="read the stored image bytes and decode them in the pipeline, as training does "
                          "(--no-encoded: TFDS's decoded arrays)")
    dat.add_argument("--inline", action="store_true",
                     help="make the batches in the main thread, no grain threads or workers (--workers ignored)")
    dat.set_defaults(fn=bench_data)
    from reid_jax import gpu_report
    from reid_jax.search import bench as search_bench
    from reid_jax.train import bench as train_bench
    search_bench.add_parsers(sub, _hw)
    train_bench.add_parsers(sub, _hw)
    gpu_report.add_parsers(sub)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
