"""The K best gallery rows for a few queries, in bounded memory: `top_k(feats [N, D], queries [Q, D], k)`.

The gallery (float16, usually a memory map of the index's features.npy) is read in chunks of `chunk` rows; each
chunk goes to the device, is scored against the queries in float32 and merged into the running top K by one jitted
function, while a thread reads the next chunk from disk. Memory: two chunks on the host, one chunk in float32 on the
device, whatever N is. Ties keep the lower row first, as a stable sort does.

`faiss_top_k` answers the same question with FAISS (an exact inner-product index over the same float16 values,
cached beside the features), for those who prefer it or want its approximate indexes later.
"""

from __future__ import annotations

import concurrent.futures as cf
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax.errors import UserError

CHUNK = 1 << 17  # rows per device step: 128 MiB of float32 at D = 256, 256 MiB at D = 512


@partial(jax.jit, static_argnames=("k",), donate_argnums=(4, 5))
def _merge_chunk(rows, queries, valid, offset, best_scores, best_ids, k: int):
    """rows [C, D] f16, queries [Q, D] f32, `valid` rows of the chunk are real, the chunk starts at row `offset`;
    best_* [Q, k] -> the top k of both, [Q, k] each."""
    scores = jnp.matmul(queries, rows.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)  # [Q, C]
    scores = jnp.where(jnp.arange(rows.shape[0]) < valid, scores, -jnp.inf)
    ids = offset + jnp.arange(rows.shape[0], dtype=jnp.int32)
    both_scores = jnp.concatenate([best_scores, scores], axis=1)  # earlier rows first: ties keep them
    both_ids = jnp.concatenate([best_ids, jnp.broadcast_to(ids, scores.shape)], axis=1)
    top, where = jax.lax.top_k(both_scores, k)
    return top, jnp.take_along_axis(both_ids, where, axis=1)


def _rows(feats: np.ndarray, start: int, stop: int) -> np.ndarray:
    """feats[start:stop] as float16. From a memory map, the rows are read from its file instead: pages touched
    through a map stay in the process's resident memory, which would then grow to the whole gallery."""
    if isinstance(feats, np.memmap) and feats.filename is not None and feats.flags.c_contiguous:
        stop = min(stop, len(feats))
        row = feats.dtype.itemsize * int(np.prod(feats.shape[1:]))
        with open(feats.filename, "rb") as f:
            f.seek(feats.offset + start * row)
            block = np.fromfile(f, feats.dtype, (stop - start) * row // feats.dtype.itemsize)
        return block.reshape(stop - start, *feats.shape[1:]).astype(np.float16, copy=False)
    return np.asarray(feats[start:stop], np.float16)


def top_k(feats: np.ndarray, queries: np.ndarray, k: int, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """feats [N, D] (float16 or float32, possibly a memory map), queries [Q, D] -> (scores float32 [Q, k'],
    rows int32 [Q, k']), k' = min(k, N), best first (scores are inner products: cosines for unit rows)."""
    n = len(feats)
    queries = jnp.asarray(np.atleast_2d(queries), jnp.float32)
    k = min(int(k), n)
    if k < 1:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int32)
    chunk = max(k, min(chunk, n))  # one compiled shape: the last chunk is padded
    best = (jnp.full((len(queries), k), -jnp.inf, jnp.float32), jnp.full((len(queries), k), -1, jnp.int32))

    def read(start: int) -> np.ndarray:
        block = _rows(feats, start, start + chunk)
        return block if len(block) == chunk else np.pad(block, ((0, chunk - len(block)), (0, 0)))

    with cf.ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(read, 0)
        for start in range(0, n, chunk):
            rows = nxt.result()
            if start + chunk < n:
                nxt = pool.submit(read, start + chunk)
            # Dispatch is asynchronous: without this wait the loop would run ahead of the device, each queued
            # step holding its chunk, and memory would grow with the gallery. The read of the next chunk goes on.
            jax.block_until_ready(best)
            best = _merge_chunk(rows, queries, min(chunk, n - start), start, *best, k=k)
    scores, ids = jax.device_get(best)
    return np.asarray(scores, np.float32), np.asarray(ids, np.int32)


def faiss_top_k(feats: np.ndarray, queries: np.ndarray, k: int, cache: Path | None = None):
    """`top_k` with FAISS: an exact inner-product index over float16 codes (`IndexScalarQuantizer`, QT_fp16), built
    in chunks and cached at `cache` (rebuilt when absent)."""
    try:
        import faiss
    except ImportError as e:
        raise UserError("--backend faiss: the faiss package is not installed; `pip install faiss-cpu` (or "
                        "faiss-gpu), or use the default --backend jax") from e
    n, dim = feats.shape
    if cache is not None and cache.exists():
        index = faiss.read_index(str(cache))
    else:
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        for start in range(0, n, CHUNK):
            index.add(_rows(feats, start, start + CHUNK).astype(np.float32))
        if cache is not None:
            from reid_jax import files
            files.write_atomically(cache, lambda tmp: faiss.write_index(index, str(tmp)))
    scores, ids = index.search(np.ascontiguousarray(np.atleast_2d(queries), np.float32), min(int(k), n))
    return scores.astype(np.float32), ids.astype(np.int32)
