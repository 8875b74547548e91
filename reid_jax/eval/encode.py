"""Features of a whole evaluation stream, computed on the mesh.

`jitted(model, fn)` compiles `fn(model, batch)` once over the model's state (split out of the nnx module a single
time), so encoding a split is one compiled function called per batch; `encode_stream` feeds it the host batches
of a stream as global arrays and gathers the valid rows back to numpy on every process. A stream of uint8 images
(`config.data.aug.on_device`) has them normalised on the device first, so every encoder sees the float32 images
the host path would have given it.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from reid_jax import mesh as mesh_lib
from reid_jax.data import device


def jitted(model: nnx.Module, fn):
    """`fn(model, batch) -> features` as `encode(batch)`, jitted with the model's state as an argument."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, batch: fn(nnx.merge(graphdef, s), batch))
    return lambda batch: run(state, batch)


@functools.lru_cache
def _prepare(mean_std: str):
    """`device.prepare_images` of evaluation batches (no erasing), jitted once per normalisation."""
    aug = ml_collections.ConfigDict({"mean_std": mean_std})
    return jax.jit(lambda batch: device.prepare_images(batch, aug))


def encode_stream(stream, key: str, encode, mesh, desc: str = "") -> dict:
    """Runs `encode(batch)` (global arrays) over the stream on the mesh -> the valid rows of its features ('feats')
    and of every batch field but the input `key`, as numpy arrays. `desc` labels the progress bar. uint8 images
    are normalised on the device with the stream's `aug` (`pipeline.eval_images`) before `encode` sees them."""
    out = {}
    aug = getattr(stream, "aug", None)
    prepare = _prepare(aug.mean_std) if aug is not None else None
    bar = tqdm(stream, desc=f"eval {desc or key}", total=getattr(stream, "num_batches", None), leave=False,
               disable=jax.process_index() != 0, dynamic_ncols=True)
    for batch in bar:
        arrays = mesh_lib.global_batch(batch, mesh)
        if prepare is not None:
            arrays = prepare(arrays)
        valid = mesh_lib.gather(arrays.pop("valid"))
        feats = encode(arrays)
        arrays.pop(key)
        rows = {"feats": mesh_lib.gather(feats)} | {k: mesh_lib.gather(v) for k, v in arrays.items()}
        for k, v in rows.items():
            out.setdefault(k, []).append(v[valid])
    return {k: np.concatenate(v) for k, v in out.items()}
