"""Jitted retrieval metrics: text-to-image (R@k, mAP, mINP) and image ReID (Market-1501 protocol).

Both rank the whole gallery for a chunk of queries at a time (a jitted function of a [C, G] similarity block: the
cosine similarities of [C, D] x [G, D] features, or minus a precomputed distance block such as the output of
`rerank.k_reciprocal`), so memory stays bounded for galleries of a million (C shrinks as G grows). Per query, with
the gallery sorted by similarity (ties in gallery order, as numpy's stable argsort) and r the 1-based rank among the
gallery items that count:

  AP   = mean over correct items of (correct items up to r) / r
  INP  = (number of correct items) / (rank of the last correct item)
  CMC@k = 1 if a correct item is within the first k

Results are in percent, averaged over the queries that have at least one correct item.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax.losses import l2_normalize

MAX_CHUNK_ELEMENTS = 1 << 25  # similarities per chunk ([C, G] float32 + int32 order: ~256 MiB)


@jax.jit
def _cosine_chunk(q, g):
    """q [C, D], g [G, D] normalised -> similarities [C, G]."""
    return q @ g.T


@partial(jax.jit, static_argnames=("max_rank",))
def _rank_chunk(sims, q_pid, q_cam, g_pid, g_cam, max_rank: int):
    """sims [C, G] (larger = better) -> per query (AP, INP, CMC [max_rank], has_match), all [C, ...].

    q_cam / g_cam = -1 switch the same-camera filter off (text-to-image); otherwise gallery items of the query's
    pid seen by the query's camera do not count (Market-1501 protocol).
    """
    order = jnp.argsort(-sims, axis=1, stable=True)
    pid_s, cam_s = g_pid[order], g_cam[order]  # [C, G] gallery pids / cameras in rank order
    same_pid = pid_s == q_pid[:, None]
    counts = ~(same_pid & (cam_s == q_cam[:, None]) & (q_cam[:, None] >= 0))
    match = same_pid & counts
    rank = jnp.cumsum(counts, axis=1)  # 1-based rank among counted items
    hits = jnp.cumsum(match, axis=1)
    num_rel = hits[:, -1]
    has = num_rel > 0
    denom = jnp.maximum(num_rel, 1)
    ap = jnp.sum(jnp.where(match, hits / rank, 0.0), axis=1) / denom
    last = jnp.max(jnp.where(match, rank, 0), axis=1)
    inp = num_rel / jnp.maximum(last, 1)
    first = jnp.min(jnp.where(match, rank, jnp.iinfo(jnp.int32).max), axis=1)
    cmc = first[:, None] <= jnp.arange(1, max_rank + 1)[None]
    return ap, inp, cmc, has


def _evaluate(q, q_pid, q_cam, g, g_pid, g_cam, max_rank: int, chunk: int | None, distances=None) -> dict:
    """Features q [Q, D], g [G, D] ranked by cosine similarity, or, if distances [Q, G] is given, by -distances."""
    g_pid, g_cam = jnp.asarray(g_pid, jnp.int32), jnp.asarray(g_cam, jnp.int32)
    if distances is None:  # rows: query features; a chunk's similarities come from _cosine_chunk
        rows, g = l2_normalize(jnp.asarray(q, jnp.float32)), l2_normalize(jnp.asarray(g, jnp.float32))
    else:  # rows: the similarities themselves
        rows = -jnp.asarray(distances, jnp.float32)
    n = rows.shape[0]
    chunk = chunk or max(1, min(n, MAX_CHUNK_ELEMENTS // max(g_pid.shape[0], 1)))
    pad = -n % chunk  # one compiled shape for every chunk
    rows = jnp.pad(rows, ((0, pad), (0, 0)))
    q_pid = jnp.pad(jnp.asarray(q_pid, jnp.int32), (0, pad))
    q_cam = jnp.pad(jnp.asarray(q_cam, jnp.int32), (0, pad))
    parts = []
    for s in range(0, n + pad, chunk):
        sims = rows[s: s + chunk] if distances is not None else _cosine_chunk(rows[s: s + chunk], g)
        parts.append(_rank_chunk(sims, q_pid[s: s + chunk], q_cam[s: s + chunk], g_pid, g_cam, max_rank))
    ap, inp, cmc, has = (np.concatenate([np.asarray(p[i]) for p in parts])[:n] for i in range(4))
    if not has.any():
        raise ValueError("no query has a correct gallery item; check the pids")
    cmc = cmc[has].mean(0) * 100
    out = {"R1": float(cmc[0]), "R5": float(cmc[min(4, max_rank - 1)]), "R10": float(cmc[min(9, max_rank - 1)]),
           "mAP": float(ap[has].mean() * 100), "mINP": float(inp[has].mean() * 100),
           "num_queries": int(has.sum())}
    return out, cmc


def text_to_image(text_feats, text_pids, image_feats, image_pids, chunk: int | None = None) -> dict:
    """Caption queries [Q, D] against gallery images [G, D] by cosine similarity; no camera filtering.

    Returns R1, R5, R10, mAP, mINP in percent (and num_queries).
    """
    no_cam_q = np.full(len(text_pids), -1)
    out, _ = _evaluate(text_feats, text_pids, no_cam_q, image_feats, image_pids, np.full(len(image_pids), -1),
                       max_rank=10, chunk=chunk)
    return out


def image_reid(query_feats, query_pids, query_camids, gallery_feats, gallery_pids, gallery_camids,
               max_rank: int = 50, chunk: int | None = None, distances=None) -> dict:
    """Market-1501 protocol: same pid and same camera removed, queries without a match skipped.

    Ranks by cosine similarity of the features, or, if `distances` (a precomputed [Q, G] matrix, smaller = more
    similar, e.g. from `rerank.k_reciprocal`) is given, by those distances; the features are then ignored and may
    be None. Returns R1, R5, R10, mAP, mINP in percent, `cmc` (list of max_rank values, percent) and num_queries.
    """
    if np.any(np.asarray(query_camids) < 0) or np.any(np.asarray(gallery_camids) < 0):
        raise ValueError("image_reid needs zero-based camera ids (>= 0) for every query and gallery item")
    if distances is not None:
        shape, want = np.shape(distances), (len(query_pids), len(gallery_pids))
        if shape != want:
            raise ValueError(f"distances must have shape [num queries, num gallery] = {want}, got {shape}")
    elif query_feats is None or gallery_feats is None:
        raise ValueError("image_reid needs query_feats and gallery_feats unless distances is given")
    out, cmc = _evaluate(query_feats, query_pids, query_camids, gallery_feats, gallery_pids, gallery_camids,
                         max_rank=max_rank, chunk=chunk, distances=distances)
    return {**out, "cmc": cmc.tolist()}
