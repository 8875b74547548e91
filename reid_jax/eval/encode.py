"""Features of a whole evaluation stream, computed on the mesh.

`jitted(model, fn)` compiles `fn(model, batch)` once over the model's state (split out of the nnx module a single
time), so encoding a split is one compiled function called per batch; `encode_stream` feeds it the host batches
of a stream as global arrays and gathers the valid rows back to numpy on every process.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from reid_jax import mesh as mesh_lib


def jitted(model: nnx.Module, fn):
    """`fn(model, batch) -> features` as `encode(batch)`, jitted with the model's state as an argument."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, batch: fn(nnx.merge(graphdef, s), batch))
    return lambda batch: run(state, batch)


def encode_stream(stream, key: str, encode, mesh, desc: str = "") -> dict:
    """Runs `encode(batch)` (global arrays) over the stream on the mesh -> the valid rows of its features ('feats')
    and of every batch field but the input `key`, as numpy arrays. `desc` labels the progress bar."""
    out = {}
    bar = tqdm(stream, desc=f"eval {desc or key}", total=getattr(stream, "num_batches", None), leave=False,
               disable=jax.process_index() != 0, dynamic_ncols=True)
    for batch in bar:
        arrays = mesh_lib.global_batch(batch, mesh)
        valid = mesh_lib.gather(arrays.pop("valid"))
        feats = encode(arrays)
        arrays.pop(key)
        rows = {"feats": mesh_lib.gather(feats)} | {k: mesh_lib.gather(v) for k, v in arrays.items()}
        for k, v in rows.items():
            out.setdefault(k, []).append(v[valid])
    return {k: np.concatenate(v) for k, v in out.items()}
