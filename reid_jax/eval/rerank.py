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

d is symmetric, so original_dist[i, j] = d[i, j] / max_k d[i, k]: each row divided by its own maximum.

Two implementations (`method`), the same numbers up to float32 rounding; 'auto' takes 'dense' up to
N = DENSE_MAX_N (where its fewer compilations make a first call faster) and 'sparse' beyond.

'dense': two jitted stages. The first builds original_dist [N, N], the first max(k1 + 1, k2) columns of
initial_rank (`lax.top_k`, which orders ties by index exactly like a stable argsort), the reciprocal sets as
fixed-size index arrays with validity masks, the expansion, and V as a dense [N, N] matrix. The second computes
the Jaccard term from the query rows' nonzeros (at most M per row, M read back after the first stage) against the
dense gallery columns of V, in chunks of `chunk` queries. Memory O(N^2): a few [N, N] float32 buffers at peak
(8 GiB peak RSS at N = 20,000 on a CPU), so it stops at N ~ 20k.

'sparse': nothing of size [N, N] is held. V is kept as per-row lists (column, value), padded to the longest list
(its length read back from a first pass that only counts, or a bound from the shapes when that is small), and
every stage runs over blocks of rows (at most BLOCK_ELEMENTS per [C, N] block):
  1. neighbours: for a block of C rows, d[rows, :] [C, N] (one matmul), the row maxima and the first
     max(k1 + 1, k2) columns of initial_rank by `lax.top_k` of the normalised rows, as above;
  2. sets: R(i) and the candidates R_half(c) from initial_rank alone (gathers); membership in R(i) through a
     [C, N] boolean block; E(i) as (k1 + 1)(round(k1 / 2) + 2) slots, a column that repeats kept at its first
     slot (a scatter-min of slot numbers into a [C, N] block);
  3. V: the entries of E(i) as exp(-d / rowmax_i) with d = |x_i|^2 + |x_e|^2 - 2 x_i . x_e (a gather and dot
     products), normalised by a pairwise sum over the row, which zero padding does not change;
  4. query expansion: the k2 neighbours' lists added in neighbour order into a [C, N] float32 block (the same
     float additions as the dense version's), read back at the union of their columns;
  5. Jaccard: the gallery rows' entries sorted by column (inverted lists: column k -> the gallery rows j with
     V[j, k] > 0); for a step of `chunk` query rows, every (query entry, gallery entry) pair that shares a column
     adds min(V[i, k], V[j, k]) into S[i, j] (a scatter-add into a [chunk, G] block), and the step's rows are
     blended with original_dist[rows, Q:], recomputed by a matmul. The pairs per query row are counted first, so
     the steps (about PAIR_BLOCK pairs each) have static shapes.
Memory: O(N M) for the lists (M the longest, after the query expansion), O(C N) per block and O(chunk G) per
Jaccard step, besides the [Q, G] result, which is assembled in host memory. Compute: O(N^2 D) for the neighbours
(most of the time), O(N (k1^2 + k2 M)) gathers and O(N^2) plain writes (the [C, N] blocks) for the lists, and one
min-and-add per pair of entries that share a column for S. Measured on a 2-core CPU (`python -m reid_jax.bench
rerank`) with random unit features of N / 30 identities, D = 512, k1 50, k2 15: N = 94,000 (Q = 11,681) in 176 s
plus 8 s compilation, peak RSS 5.6 GiB of which 3.6 GiB is the result (longest list 74 entries, 371 after the
query expansion; 4.5e8 pairs for S); N = 20,000 in 11 s, peak RSS 1.1 GiB (dense: 147 s, 8.0 GiB).

Deviations from the common reference implementation:
  * V, the query expansion and the Jaccard step are float32; the reference casts V to float16 there (its results
    differ from ours by that rounding, ~1e-3).
  * Squared distances are clamped at 0 and the diagonal is exactly 0 (the reference keeps the matmul's rounding
    noise, which can make d[i, i] slightly negative or positive); all matmuls run at full float32 precision.
  * Ties in initial_rank are broken by index (stable order); the reference's default np.argsort is not stable.
  * A row of d that is all zero (all features identical) is divided by 1 instead of 0, and a row of V with no
    neighbours stays zero instead of becoming NaN.
  * Only the gallery columns of the Jaccard term are computed (the only ones returned).
Between our two methods: the distances come from matmuls of different shapes (and, in the sparse V, from dot
products), and the sums over a row of V and over the shared columns of S are taken in different orders, so the
results differ by float32 rounding (at most 1.1e-6 at N = 20,000, where distances reach 1); two distances that
close can also swap places in initial_rank. On a GPU, XLA's scatter-add may take the additions of S in any order,
so its last bits may vary between runs.
"""

from __future__ import annotations

from functools import partial
from numbers import Integral, Real

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
METHODS = ("auto", "dense", "sparse")
DENSE_MAX_N = 2048  # 'auto': dense up to this N = Q + G, where its fewer compilations make it the faster
MAX_CHUNK_ELEMENTS = 1 << 26  # dense: [C, M, G] float32 gathered per chunk of queries: 256 MiB
BLOCK_ELEMENTS = 1 << 25  # sparse: rows per block so that a [C, N] (or [chunk, G]) float32 block is <= 128 MiB
PAIR_BLOCK = 1 << 23  # sparse Jaccard: (query entry, gallery entry) pairs aimed at per step of query rows
SMALL_ELEMENTS = 1 << 20  # sparse: lists padded to a bound from the shapes alone when that is this small


def _sq_dists(a, sq_a, b, sq_b):
    """Squared Euclidean distances [A, B] of a [A, D] and b [B, D] (sq_* = squared norms), clamped at 0."""
    return jnp.maximum(sq_a[:, None] + sq_b[None, :] - 2.0 * jnp.matmul(a, b.T, precision=HIGHEST), 0.0)


def _ks(k1: int, k2: int, n: int) -> tuple[int, int, int]:
    """(k1 + 1, round(k1 / 2) + 1, k2), each at most n: the neighbour counts of R, R_half and the query expansion."""
    return min(k1 + 1, n), min(int(np.around(k1 / 2)) + 1, n), min(k2, n)


def _pow2(m: int) -> int:
    """The smallest power of two >= m (1 for m <= 1): few distinct shapes, so few compilations."""
    return 1 << max(int(m) - 1, 0).bit_length()


def _bucket(m: int) -> int:
    """The smallest a 2^e >= m with a in 8..15 (m itself below 16): within 1/8 of m, still few distinct shapes."""
    step = 1 << max(int(m).bit_length() - 4, 0)
    return -(-int(m) // step) * step


def _pairwise_sum(terms):
    """terms [C, M, ...] -> [C, ...]: the sum over M as a pairwise tree, zero-padded to a power of two. Elementwise
    adds, so unlike a reduction whose order depends on the shape, the result depends neither on the number of rows
    C nor on zeros appended to M."""
    m = terms.shape[1]
    terms = jnp.pad(terms, [(0, 0), (0, _pow2(m) - m)] + [(0, 0)] * (terms.ndim - 2))
    while terms.shape[1] > 1:
        half = terms.shape[1] // 2
        terms = terms[:, :half] + terms[:, half:]
    return terms[:, 0]


# ------------------------------------------------------------------------------------------------------- dense

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
    d = _sq_dists(x, sq, x, sq)
    d = jnp.where(jnp.eye(n, dtype=bool), 0.0, d)
    colmax = jnp.max(d, axis=0)
    dist = (d / jnp.where(colmax > 0, colmax, 1.0)[None, :]).T  # original_dist

    k_full, k_half, k_qe = _ks(k1, k2, n)
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
        return _pairwise_sum(jnp.minimum(vals[:, :, None], wg[cols]))  # [C, M, G] -> [C, G]

    blocks = jnp.pad(vq, ((0, pad), (0, 0))).reshape(-1, chunk, n)
    s = jax.lax.map(one_chunk, blocks).reshape(-1, wg.shape[1])[:nq]
    jaccard = 1.0 - s / (2.0 - s)
    return jaccard * (1.0 - lambda_value) + dist_qg * lambda_value


def _dense(q, g, k1: int, k2: int, lambda_value: float, chunk: int | None) -> np.ndarray:
    dist_qg, vq, wg, nnz = _encode(q, g, k1=k1, k2=k2)
    n, num_g = vq.shape[1], g.shape[0]
    m = min(n, _pow2(int(nnz)))  # next power of two >= the most nonzeros in a row
    if chunk is None:
        chunk = max(1, MAX_CHUNK_ELEMENTS // (m * num_g))
    chunk = min(chunk, q.shape[0])
    out = _jaccard_blend(dist_qg, vq, wg, jnp.float32(lambda_value), m=m, chunk=chunk)
    return np.asarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------------------------ sparse

def _map_rows(fn, n: int, block: int):
    """fn(rows [C]) -> pytree of [C, ...], run over every block of C = block rows of 0..n-1 (lax.map, one compile);
    the last block's surplus rows repeat row n - 1 and are cut off. -> pytree of [n, ...]."""
    if block >= n:  # one block: no loop (simpler to compile)
        return fn(jnp.arange(n))
    starts = jnp.arange(0, n, block)
    out = jax.lax.map(lambda s: fn(jnp.minimum(s + jnp.arange(block), n - 1)), starts)
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:n], out)


def _block(n: int, width: int) -> int:
    """Rows per block so that a [C, width] float32 block stays within BLOCK_ELEMENTS (at most n)."""
    return max(1, min(n, BLOCK_ELEMENTS // max(width, 1)))


@partial(jax.jit, static_argnames=("k", "block"))
def _nearest(x, sq, k: int, block: int):
    """x [N, D] -> (rank [N, k] int32: initial_rank[:, :k], rowmax [N]: max_j d[i, j]), a [block, N] block at a
    time."""
    n = x.shape[0]
    cols = jnp.arange(n)

    def one(rows):
        d = _sq_dists(x[rows], sq[rows], x, sq)  # [C, N]
        d = jnp.where(cols[None, :] == rows[:, None], 0.0, d)
        rowmax = jnp.max(d, axis=1)
        dist = d / jnp.where(rowmax > 0, rowmax, 1.0)[:, None]  # original_dist[rows]
        return jax.lax.top_k(-dist, k)[1].astype(jnp.int32), rowmax

    return _map_rows(one, n, block)


def _is_reciprocal(rank, fwd, rows, k: int):
    """fwd [C, k] = rank[rows, :k] -> [C, k] bool: whether rows[c] is among the first k neighbours of fwd[c, a]."""
    return jnp.any(rank[:, :k][fwd] == rows[:, None, None], axis=-1)


def _first_of_each(slots, n: int):
    """slots [C, L] column indices (n = empty) -> [C, L] bool: the first slot of each column of a row (no empties).
    A scatter-min of slot numbers into a [C, n + 1] block: exact and order-independent."""
    c, length = slots.shape
    ci = jnp.arange(c)[:, None]
    slot = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), slots.shape)
    owner = jnp.full((c, n + 1), length, jnp.int32).at[ci, slots].min(slot)
    return (slots < n) & (owner[ci, slots] == slot)


def _compact(slots, keep, m: int, n: int):
    """The kept slots [C, L] moved to the front, in slot order: [C, m] (n = empty); m >= every row's count."""
    ci = jnp.arange(slots.shape[0])[:, None]
    pos = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, m)
    return jnp.full((slots.shape[0], m), n, slots.dtype).at[ci, pos].set(slots, mode="drop")


def _expansion(rank, h_ok, rows, k_full: int, k_half: int):
    """E(rows) as slots [C, k_full (1 + k_half)] (n = empty, a column may repeat) and the first of each, [C, L]."""
    n = rank.shape[0]
    ci = jnp.arange(rows.shape[0])[:, None]
    fwd = rank[rows, :k_full]
    ok = _is_reciprocal(rank, fwd, rows, k_full)  # R(i) = fwd[i][ok[i]]
    r_mask = jnp.zeros((rows.shape[0], n + 1), bool).at[ci, jnp.where(ok, fwd, n)].set(True)
    r_mask = r_mask.at[:, n].set(False)
    cand, cand_ok = rank[:, :k_half][fwd], h_ok[fwd]  # [C, k_full, k_half]: R_half(c) of each c = fwd[i, a]
    inter = jnp.sum(cand_ok & r_mask[ci[..., None], cand], axis=-1)  # |R_half(c) & R(i)|
    accept = ok & (3 * inter > 2 * jnp.sum(cand_ok, axis=-1))  # exact form of inter > 2/3 |R_half(c)|
    slots = jnp.concatenate([jnp.where(ok, fwd, n),
                             jnp.where(accept[..., None] & cand_ok, cand, n).reshape(rows.shape[0], -1)], axis=1)
    return slots, _first_of_each(slots, n)


@partial(jax.jit, static_argnames=("k_full", "k_half", "m", "block", "block_half"))
def _encode_sparse(x, sq, rowmax, rank, k_full: int, k_half: int, m: int | None, block: int, block_half: int):
    """-> the number of members of each E(i) [N] when m is None, else V as (cols [N, m] (N = empty), vals [N, m])."""
    n = x.shape[0]
    h_ok = _map_rows(lambda rows: _is_reciprocal(rank, rank[rows, :k_half], rows, k_half), n,
                     block_half)  # [N, k_half]: R_half(c) = rank[c, :k_half][h_ok[c]]

    def one(rows):
        slots, keep = _expansion(rank, h_ok, rows, k_full, k_half)
        if m is None:
            return jnp.sum(keep, axis=1)
        cols = _compact(slots, keep, m, n)
        e = jnp.minimum(cols, n - 1)
        dots = jnp.einsum("cd,cmd->cm", x[rows], x[e], precision=HIGHEST)
        d = jnp.maximum(sq[rows][:, None] + sq[e] - 2.0 * dots, 0.0)
        d = jnp.where(e == rows[:, None], 0.0, d)
        dist = d / jnp.where(rowmax[rows] > 0, rowmax[rows], 1.0)[:, None]
        w = jnp.where(cols < n, jnp.exp(-dist), 0.0)
        total = _pairwise_sum(w)[:, None]  # the same sum whatever the padding m
        return cols, w / jnp.where(total > 0, total, 1.0)

    return _map_rows(one, n, block)


@partial(jax.jit, static_argnames=("k_qe", "m", "block"))
def _expand_queries(cols, vals, rank, k_qe: int, m: int | None, block: int):
    """V[i] = mean of V[initial_rank[i, :k_qe]] on the lists (cols, vals) [N, M]: the new lists' lengths [N] when
    m is None, else the new (cols [N, m], vals [N, m])."""
    n, width = cols.shape

    def one(rows):
        c = rows.shape[0]
        ci = jnp.arange(c)[:, None]
        nb = rank[rows, :k_qe]  # [C, k_qe]
        slots = cols[nb].reshape(c, k_qe * width)
        keep = _first_of_each(slots, n)
        if m is None:
            return jnp.sum(keep, axis=1)
        # acc + V[nb_t] for t = 0, 1, ... like the dense version; a row's columns are distinct, so each add is one
        # float add per element, in neighbour order.
        acc = jax.lax.fori_loop(0, k_qe, lambda t, acc: acc.at[ci, cols[nb[:, t]]].add(vals[nb[:, t]]),
                                jnp.zeros((c, n + 1), jnp.float32))
        new = _compact(slots, keep, m, n)
        return new, jnp.where(new < n, acc[ci, new] / k_qe, 0.0)

    return _map_rows(one, n, block)


@partial(jax.jit, static_argnames=("size",))
def _inverted_lists(qcols, gcols, gvals, size: int):
    """Gallery lists (gcols, gvals) [G, M] -> (start [N + 1], row [size], val [size], pairs [Q]): the gallery rows j
    with V[j, k] > 0 and their values are row[start[k]:start[k + 1]], val[...], rows ascending (the nonzeros, at
    most size, then a stable sort by column); pairs[i]: the (query entry, gallery entry) pairs of query row i that
    share a column (qcols [Q, M'])."""
    n = qcols.shape[0] + gcols.shape[0]
    flat = gcols.reshape(-1)
    keep = flat < n
    at = jnp.full((size,), flat.shape[0], jnp.int32).at[jnp.where(keep, jnp.cumsum(keep) - 1, size)].set(
        jnp.arange(flat.shape[0], dtype=jnp.int32), mode="drop")  # the nonzeros' flat indices, in row order
    col = jnp.concatenate([flat, jnp.full((1,), n, flat.dtype)])[at]
    order = jnp.argsort(col, stable=True)
    at = at[order]
    start = jnp.searchsorted(col[order], jnp.arange(n + 1, dtype=col.dtype), side="left").astype(jnp.int32)
    deg = jnp.concatenate([start[1:] - start[:-1], jnp.zeros((1,), jnp.int32)])  # column n (empty): none
    val = jnp.concatenate([gvals.reshape(-1), jnp.zeros((1,), gvals.dtype)])[at]
    return start, at // gcols.shape[1], val, jnp.sum(deg[qcols], axis=1)


@partial(jax.jit, static_argnames=("rows", "pairs"))
def _jaccard_step(first, qcols, qvals, start, grow, gval, xq, sqq, rowmax_q, xg, sqg, lambda_value,
                  rows: int, pairs: int):
    """Re-ranked distances [rows, G] of query rows first..first+rows-1 (the query arrays padded by `rows` rows).

    Every pair (entry (i, k, a) of a query row, entry (j, k, b) of the inverted list of column k) adds min(a, b)
    into S[i, j]; pair p belongs to the query entry whose range of pairs holds p (a running maximum of the
    entries' first pairs) and to the gallery entry start[k] + its offset in that range."""
    n = start.shape[0] - 1
    qc = jax.lax.dynamic_slice_in_dim(qcols, first, rows).reshape(-1)  # [rows M]
    qv = jax.lax.dynamic_slice_in_dim(qvals, first, rows).reshape(-1)
    qr = jnp.repeat(jnp.arange(rows), qcols.shape[1])
    deg = jnp.concatenate([start[1:] - start[:-1], jnp.zeros((1,), jnp.int32)])[qc]
    end = jnp.cumsum(deg)
    begin = end - deg
    entry = jnp.arange(qc.shape[0], dtype=jnp.int32)
    owner = jax.lax.cummax(jnp.zeros((pairs,), jnp.int32).at[jnp.where(deg > 0, begin, pairs)].max(entry,
                                                                                                   mode="drop"))
    p = jnp.arange(pairs, dtype=jnp.int32)
    valid = p < end[-1]
    at = jnp.where(valid, start[jnp.minimum(qc[owner], n - 1)] + p - begin[owner], 0)
    s = jnp.zeros((rows, xg.shape[0]), jnp.float32).at[jnp.where(valid, qr[owner], rows), grow[at]].add(
        jnp.minimum(qv[owner], gval[at]), mode="drop")
    jaccard = 1.0 - s / (2.0 - s)
    q = jnp.minimum(first + jnp.arange(rows), xq.shape[0] - 1)
    d = _sq_dists(xq[q], sqq[q], xg, sqg)
    dist = d / jnp.where(rowmax_q[q] > 0, rowmax_q[q], 1.0)[:, None]
    return jaccard * (1.0 - lambda_value) + dist * lambda_value


def _width(bound: int, rows: int, longest, round_up=_pow2) -> int:
    """The static width of [rows, width] lists: `bound` (from the shapes alone, so one compilation per shape) when
    rows x bound is within SMALL_ELEMENTS, else the longest list read back (`longest()`), rounded up (few
    distinct shapes)."""
    return bound if rows * bound <= SMALL_ELEMENTS else min(bound, round_up(int(longest())))


def _sparse(q, g, k1: int, k2: int, lambda_value: float, chunk: int | None) -> np.ndarray:
    x = jnp.concatenate([q, g])
    n, nq, ng = x.shape[0], q.shape[0], g.shape[0]
    sq = jnp.sum(x * x, axis=1)
    k_full, k_half, k_qe = _ks(k1, k2, n)
    rank, rowmax = _nearest(x, sq, k=max(k_full, k_qe), block=_block(n, n))

    # Lists are padded to the longest: its length comes from a first pass that only counts (unless small).
    encode = partial(_encode_sparse, x, sq, rowmax, rank, k_full=k_full, k_half=k_half,
                     block_half=_block(n, k_half * k_half))
    m = _width(min(n, k_full * (1 + k_half)), n,
               lambda: jnp.max(encode(m=None, block=_block(n, n + k_full * (1 + k_half)))))
    cols, vals = encode(m=m, block=_block(n, n + k_full * (1 + k_half) + m * x.shape[1]))
    if k2 != 1:
        expand = partial(_expand_queries, cols, vals, rank, k_qe=k_qe, block=_block(n, 2 * n + k_qe * m))
        cols, vals = expand(m=_width(min(n, k_qe * m), n, lambda: jnp.max(expand(m=None))))

    m = cols.shape[1]
    size = _width(ng * m, 1, lambda: jnp.sum(cols[nq:] < n), _bucket)  # gallery nonzeros
    start, grow, gval, work = _inverted_lists(cols[:nq], cols[nq:], vals[nq:], size=size)
    work = np.asarray(work, np.int64)  # [Q]: pairs sharing a column, per query row
    if chunk is None:  # query rows per step: about PAIR_BLOCK pairs, a [rows, G] block within BLOCK_ELEMENTS
        chunk = int(np.clip(PAIR_BLOCK // max(work.mean(), 1.0), 1, _block(nq, ng)))
    chunk = min(chunk, nq)
    steps = range(0, nq, chunk)
    pairs = _width(chunk * m * ng, 1, lambda: max(max(int(work[s:s + chunk].sum()) for s in steps), 1), _bucket)
    if pairs >= 1 << 31:
        raise ValueError(f"chunk={chunk} query rows make up to {pairs} pairs in one step, beyond int32 indices: "
                         "pass a smaller chunk")
    pad = ((0, chunk), (0, 0))
    qcols, qvals = jnp.pad(cols[:nq], pad, constant_values=n), jnp.pad(vals[:nq], pad)
    args = (qcols, qvals, start, grow, gval, x[:nq], sq[:nq], rowmax[:nq], x[nq:], sq[nq:], jnp.float32(lambda_value))
    out = np.empty((nq, ng), np.float32)
    for s in steps:
        block = _jaccard_step(s, *args, rows=chunk, pairs=pairs)
        out[s:s + chunk] = np.asarray(block)[:nq - s]
    return out


# ------------------------------------------------------------------------------------------------------ public

def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def k_reciprocal(query_feats, gallery_feats, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                 chunk: int | None = None, method: str = "auto") -> np.ndarray:
    """Re-ranked distances [Q, G] (float32, smaller = more similar) of query_feats [Q, D] and gallery_feats [G, D].

    k1: size of the k-reciprocal neighbourhood; k2: local query expansion width (1 = none); lambda_value: weight of
    the original (normalised squared Euclidean) distance against the Jaccard distance; chunk: queries per step of
    the Jaccard stage (default: chosen to bound its memory); method: 'dense' ([N, N] matrices, N = Q + G),
    'sparse' (neighbour lists, nothing [N, N]) or 'auto' (dense up to N = DENSE_MAX_N, sparse beyond).
    """
    k1, k2 = _check_int("k1", k1), _check_int("k2", k2)
    if chunk is not None:
        chunk = _check_int("chunk", chunk)
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, Real) or not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    q, g = jnp.asarray(query_feats, jnp.float32), jnp.asarray(gallery_feats, jnp.float32)
    if q.ndim != 2 or g.ndim != 2:
        raise ValueError(f"query_feats and gallery_feats must be 2-D [num, dim], got shapes {q.shape} and {g.shape}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_feats and gallery_feats must have the same feature dim, got {q.shape[1]} "
                         f"(query_feats) and {g.shape[1]} (gallery_feats)")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f"query_feats and gallery_feats must be non-empty, got {q.shape[0]} and {g.shape[0]} rows")
    if method == "auto":
        method = "dense" if q.shape[0] + g.shape[0] <= DENSE_MAX_N else "sparse"
    run = _dense if method == "dense" else _sparse
    return run(q, g, k1, k2, float(lambda_value), chunk)
