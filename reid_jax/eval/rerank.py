"""k-reciprocal re-ranking (Zhong et al., CVPR 2017, "Re-ranking Person Re-identification with k-reciprocal Encoding").

`k_reciprocal(query [Q, D], gallery [G, D]) -> [Q, G]` float32 re-ranked distances (smaller = more similar), the
algorithm of the reference implementation used by most ReID codebases (CLIP-ReID, TransReID, fast-reid):

  x = concat(query, gallery) (N = Q + G); d = squared Euclidean distances [N, N];
  original_dist = transpose(d / max(d, axis=0)); initial_rank = row-wise ascending order of original_dist.
  R(i)  = {j in initial_rank[i, :k1+1] : i in initial_rank[j, :k1+1]}           (k-reciprocal neighbours)
  E(i)  = R(i) united with every R_half(c), c in R(i), that satisfies |R_half(c) & R(i)| > 2/3 |R_half(c)|,
          R_half being the same set with k = round(k1 / 2) (numpy's round-half-to-even, as np.around);
  V[i, E(i)] = exp(-original_dist[i, E(i)]) normalised to sum 1, 0 elsewhere;
  if k2 != 1: V[i] = mean of V[initial_rank[i, :k2]]                              (local query expansion)
  S[i, j] = sum_k min(V[i, k], V[j, k]); jaccard = 1 - S / (2 - S)
  result = jaccard * (1 - lambda) + original_dist * lambda, query rows x gallery columns.

Implementation: two jitted stages. The first builds original_dist, the first max(k1 + 1, k2) columns of
initial_rank (`lax.top_k`, which orders ties by index exactly like a stable argsort), the reciprocal sets as
fixed-size index arrays with validity masks (gathers, no Python loops), the expansion, and V as a dense [N, N]
matrix. The second computes the Jaccard term from the sparsity of V: every query row of V has at most M nonzeros
(M is read back after the first stage and rounded up to a power of two, so few shapes are compiled); per query the
M largest entries of V[i] (all its nonzeros, plus zeros that contribute nothing to a sum of minima) are gathered
with their columns, and S[i, gallery] = sum over those columns c of min(V[i, c], V[gallery, c]). Queries go through
in chunks of C (`chunk`; by default C keeps the [C, M, G] float32 intermediate under ~256 MiB).

Memory: O(N^2) for original_dist and the dense V (a few [N, N] float32 buffers at peak, ~1.6 GB each at N = 20k),
fine up to N ~ 20k on an accelerator; compute is O(N^2 (k1 + k2) + Q M G).

Deviations from the common reference implementation:
  * V, the query expansion and the Jaccard step are float32; the reference casts V to float16 there (its results
    differ from ours by that rounding, ~1e-3).
  * Squared distances are clamped at 0 and the diagonal is exactly 0 (the reference keeps the matmul's rounding
    noise, which can make d[i, i] slightly negative or positive); all matmuls run at full float32 precision.
  * Ties in initial_rank are broken by index (stable order); the reference's default np.argsort is not stable.
  * A column of d that is all zero (all features identical) is divided by 1 instead of 0, and a row of V with no
    neighbours stays zero instead of becoming NaN.
  * Only the gallery columns of the Jaccard term are computed (the only ones returned).
"""

from __future__ import annotations

from functools import partial
from numbers import Integral, Real

import jax
import jax.numpy as jnp
import numpy as np

MAX_CHUNK_ELEMENTS = 1 << 26  # [C, M, G] float32 gathered per chunk of queries: 256 MiB


def _reciprocal(rank: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """rank [N, >= k] -> (fwd [N, k] = rank[:, :k], ok [N, k]): fwd[i, a] is k-reciprocal to i iff ok[i, a]."""
    fwd = rank[:, :k]
    bwd = fwd[fwd]  # [N, k, k]: the first k neighbours of each of i's first k neighbours
    ok = jnp.any(bwd == jnp.arange(rank.shape[0], dtype=rank.dtype)[:, None, None], axis=-1)
    return fwd, ok


@partial(jax.jit, static_argnames=("k1", "k2"))
def _encode(q, g, k1: int, k2: int):
    """-> (original_dist[:Q, Q:] [Q, G], V[:Q] [Q, N], V[Q:].T [N, G], max nonzeros in a row of V[:Q])."""
    x = jnp.concatenate([q, g]).astype(jnp.float32)
    n, nq = x.shape[0], q.shape[0]
    sq = jnp.sum(x * x, axis=1)
    gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    d = jnp.where(jnp.eye(n, dtype=bool), 0.0, d)
    colmax = jnp.max(d, axis=0)
    dist = (d / jnp.where(colmax > 0, colmax, 1.0)[None, :]).T  # original_dist

    k_full = min(k1 + 1, n)
    k_half = min(int(np.around(k1 / 2)) + 1, n)
    k_qe = min(k2, n)
    _, rank = jax.lax.top_k(-dist, max(k_full, k_qe))  # ascending distance, ties by index

    rows = jnp.arange(n)
    fwd, ok = _reciprocal(rank, k_full)  # R(i) = fwd[i][ok[i]]
    r_mask = jnp.zeros((n, n), bool).at[rows[:, None], jnp.where(ok, fwd, n)].set(True, mode="drop")
    h_fwd, h_ok = _reciprocal(rank, k_half)  # R_half(c) = h_fwd[c][h_ok[c]]
    cand, cand_ok = h_fwd[fwd], h_ok[fwd]  # [N, k_full, k_half]: R_half of each candidate c = fwd[i, a]
    inter = jnp.sum(cand_ok & r_mask[rows[:, None, None], cand], axis=-1)  # |R_half(c) & R(i)|
    size = jnp.sum(cand_ok, axis=-1)
    accept = ok & (3 * inter > 2 * size)  # exact form of inter > 2/3 size
    add = jnp.where(accept[..., None] & cand_ok, cand, n)
    e_mask = r_mask.at[rows[:, None, None], add].set(True, mode="drop")  # E(i), duplicates merged

    v = jnp.where(e_mask, jnp.exp(-dist), 0.0)
    total = jnp.sum(v, axis=1, keepdims=True)
    v = v / jnp.where(total > 0, total, 1.0)
    if k2 != 1:
        v = jax.lax.fori_loop(0, k_qe, lambda t, acc: acc + v[rank[:, t]], jnp.zeros_like(v)) / k_qe
    vq = v[:nq]
    return dist[:nq, nq:], vq, v[nq:].T, jnp.max(jnp.sum(vq > 0, axis=1))


@partial(jax.jit, static_argnames=("m", "chunk"))
def _jaccard_blend(dist_qg, vq, wg, lambda_value, m: int, chunk: int):
    """dist_qg [Q, G], vq = V[:Q] [Q, N], wg = V[Q:].T [N, G] -> (1 - lambda) jaccard + lambda dist, [Q, G]."""
    nq, n = vq.shape
    pad = -nq % chunk

    def one_chunk(v_rows):  # [C, N] -> S [C, G]
        vals, cols = jax.lax.top_k(v_rows, m)  # every nonzero of each row (m >= the most nonzeros in a row)
        terms = jnp.minimum(vals[:, :, None], wg[cols])  # [C, M, G]
        # Pairwise sum over M, zero-padded to a power of two: elementwise adds, so unlike a reduction whose order
        # depends on the shape, the result does not depend on the chunk size.
        terms = jnp.pad(terms, ((0, 0), (0, -m % (1 << (m - 1).bit_length())), (0, 0)))
        while terms.shape[1] > 1:
            half = terms.shape[1] // 2
            terms = terms[:, :half] + terms[:, half:]
        return terms[:, 0]

    blocks = jnp.pad(vq, ((0, pad), (0, 0))).reshape(-1, chunk, n)
    s = jax.lax.map(one_chunk, blocks).reshape(-1, wg.shape[1])[:nq]
    jaccard = 1.0 - s / (2.0 - s)
    return jaccard * (1.0 - lambda_value) + dist_qg * lambda_value


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def k_reciprocal(query_feats, gallery_feats, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                 chunk: int | None = None) -> np.ndarray:
    """Re-ranked distances [Q, G] (float32, smaller = more similar) of query_feats [Q, D] and gallery_feats [G, D].

    k1: size of the k-reciprocal neighbourhood; k2: local query expansion width (1 = none); lambda_value: weight of
    the original (normalised squared Euclidean) distance against the Jaccard distance; chunk: queries per step of
    the Jaccard stage (default: as many as keep its [chunk, M, G] intermediate under ~256 MiB).
    """
    k1, k2 = _check_int("k1", k1), _check_int("k2", k2)
    if chunk is not None:
        chunk = _check_int("chunk", chunk)
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, Real) or not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")
    q, g = jnp.asarray(query_feats, jnp.float32), jnp.asarray(gallery_feats, jnp.float32)
    if q.ndim != 2 or g.ndim != 2:
        raise ValueError(f"query_feats and gallery_feats must be 2-D [num, dim], got shapes {q.shape} and {g.shape}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_feats and gallery_feats must have the same feature dim, got {q.shape[1]} "
                         f"(query_feats) and {g.shape[1]} (gallery_feats)")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f"query_feats and gallery_feats must be non-empty, got {q.shape[0]} and {g.shape[0]} rows")

    dist_qg, vq, wg, nnz = _encode(q, g, k1=k1, k2=k2)
    n, num_g = vq.shape[1], g.shape[0]
    m = min(n, 1 << max(int(nnz) - 1, 0).bit_length())  # next power of two >= the most nonzeros in a row
    if chunk is None:
        chunk = max(1, MAX_CHUNK_ELEMENTS // (m * num_g))
    chunk = min(chunk, q.shape[0])
    out = _jaccard_blend(dist_qg, vq, wg, jnp.float32(lambda_value), m=m, chunk=chunk)
    return np.asarray(out, dtype=np.float32)
