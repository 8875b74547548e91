"""k-reciprocal re-ranking against a float64 numpy transcription of Zhong et al. (CVPR 2017), written as plain loops,
and the sparse method (neighbour lists) against the dense one ([N, N] matrices)."""

import numpy as np
import pytest

from reid_jax.eval import metrics, rerank
from tests.numerics import assert_close

FLOAT64 = 1e-5  # float32 distances against the float64 transcription, relative to the largest (tests/numerics.py)
# Sparse against dense, relative to the largest distance (~1): both compute the same float32 numbers, but the
# distances come from matmuls of different shapes (and dot products), and the sums over a row of V and over the
# shared columns of S run in different orders, each off by a few ulps (1.2e-7); 2e-6 leaves room for those and
# none for a wrong neighbour set, which changes a distance by far more.
SPARSE = 2e-6


def _reciprocal_set(rank, i, k):
    """Those j among the first k + 1 neighbours of i that have i among their own first k + 1 neighbours."""
    return [int(j) for j in rank[i, :k + 1] if i in rank[j, :k + 1]]


def _reference(q, g, k1, k2, lam):
    x = np.concatenate([q, g]).astype(np.float64)
    n, nq = len(x), len(q)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = np.sum((x[i] - x[j]) ** 2)
    dist = np.transpose(d / np.max(d, axis=0))
    rank = np.argsort(dist, axis=1, kind="stable")
    k_half = int(np.around(k1 / 2))
    v = np.zeros((n, n))
    for i in range(n):
        r = _reciprocal_set(rank, i, k1)
        expansion = list(r)
        for c in r:
            rc = _reciprocal_set(rank, c, k_half)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expansion += rc
        expansion = np.unique(expansion)
        w = np.exp(-dist[i, expansion])
        v[i, expansion] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((nq, n))
    for i in range(nq):
        for j in range(n):
            s = np.sum(np.minimum(v[i], v[j]))
            jaccard[i, j] = 1 - s / (2 - s)
    final = jaccard * (1 - lam) + dist[:nq] * lam
    return final[:, nq:], dist[:nq, nq:]


def _feats(seed, nq, ng, dim=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(nq, dim)), rng.normal(size=(ng, dim))


@pytest.mark.parametrize("nq, ng, k1, k2, lam", [
    (7, 40, 20, 6, 0.3),
    (7, 40, 20, 1, 0.3),   # no query expansion
    (7, 40, 5, 3, 0.5),    # round(5 / 2) = 2 (half to even)
    (7, 40, 7, 2, 0.0),    # pure Jaccard; round(7 / 2) = 4
    (3, 5, 20, 10, 0.3),   # k1 + 1 and k2 larger than N
])
def test_matches_reference(nq, ng, k1, k2, lam):
    q, g = _feats(nq * 100 + k1, nq, ng)
    ours = rerank.k_reciprocal(q, g, k1=k1, k2=k2, lambda_value=lam)
    ref, _ = _reference(q, g, k1, k2, lam)
    assert ours.shape == (nq, ng) and ours.dtype == np.float32
    assert_close(ours, ref, FLOAT64, "re-ranked distances")


def test_lambda_one_is_normalised_original_distance():
    q, g = _feats(3, 7, 40)
    _, dist = _reference(q, g, 20, 6, 1.0)
    assert_close(rerank.k_reciprocal(q, g, lambda_value=1.0), dist, FLOAT64, "normalised distances")


def test_chunking_is_exact():
    q, g = _feats(4, 9, 30)
    np.testing.assert_array_equal(rerank.k_reciprocal(q, g, chunk=1), rerank.k_reciprocal(q, g))
    np.testing.assert_array_equal(rerank.k_reciprocal(q, g, chunk=4), rerank.k_reciprocal(q, g))


def _clustered(seed, nid=10, ncam=3, per_cam=2, dim=16):
    rng = np.random.default_rng(seed)
    centers = 3 * rng.normal(size=(nid, dim))
    pid = np.repeat(np.arange(nid), ncam * per_cam)
    cam = np.tile(np.repeat(np.arange(ncam), per_cam), nid)
    feats = centers[pid] + rng.normal(size=(len(pid), dim))
    is_query = np.tile(np.arange(ncam * per_cam) == 0, nid)  # one query per identity, from camera 0
    return [(a[is_query], a[~is_query]) for a in (feats, pid, cam)]


def test_image_reid_with_distances():
    (q, g), (qp, gp), (qc, gc) = _clustered(5)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    plain = metrics.image_reid(q, qp, qc, g, gp, gc)
    given = metrics.image_reid(None, qp, qc, None, gp, gc, distances=-(qn @ gn.T))
    assert given.keys() == plain.keys()
    assert given["num_queries"] == plain["num_queries"]
    for k in ("R1", "R5", "R10", "mAP", "mINP"):  # percent, float32 means of the same ranking
        assert_close(given[k], plain[k], 1e-6, k, scale=100)
    assert_close(given["cmc"], plain["cmc"], 1e-6, "cmc", scale=100)

    reranked = metrics.image_reid(None, qp, qc, None, gp, gc, distances=rerank.k_reciprocal(q, g, k1=6, k2=3),
                                   max_rank=10, chunk=3)
    assert reranked["num_queries"] == 10
    for k in ("R1", "mAP", "mINP"):
        assert 0 <= reranked[k] <= 100, k


@pytest.mark.parametrize("kwargs, name", [
    ({"k1": 0}, "k1"), ({"k1": 2.5}, "k1"), ({"k2": 0}, "k2"), ({"lambda_value": 1.5}, "lambda_value"),
    ({"lambda_value": -0.1}, "lambda_value"), ({"chunk": 0}, "chunk"), ({"method": "fast"}, "method"),
    ({"chunk": 0, "method": "sparse"}, "chunk"),
])
def test_bad_arguments(kwargs, name):
    q, g = _feats(6, 3, 8)
    with pytest.raises(ValueError, match=name):
        rerank.k_reciprocal(q, g, **kwargs)


def test_bad_features_and_distances():
    q, g = _feats(7, 3, 8)
    with pytest.raises(ValueError, match="feature dim"):
        rerank.k_reciprocal(q, g[:, :5])
    with pytest.raises(ValueError, match="2-D"):
        rerank.k_reciprocal(q[0], g)
    pids, cams = np.zeros(3, int), np.zeros(8, int)
    with pytest.raises(ValueError, match="distances"):
        metrics.image_reid(None, pids, pids, None, cams, cams + 1, distances=np.zeros((3, 7)))
    with pytest.raises(ValueError, match="query_feats"):
        metrics.image_reid(None, pids, pids, None, cams, cams + 1)


def test_image_reid_reranks_normalised_features_with_the_configs_settings():
    """`image_reid.reranked`: CLIP-ReID's / MUVA's evaluators L2-normalise before re-ranking with k1 50, k2 15."""
    import ml_collections

    from reid_jax.eval import image_reid

    q, g = _feats(11, 7, 60)
    q, g = q * np.linspace(0.5, 3.0, 7)[:, None], g * np.linspace(0.2, 5.0, 60)[:, None]  # uneven norms
    rr = ml_collections.ConfigDict({"k1": 50, "k2": 15, "lambda_value": 0.3, "normalize": True})
    unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731
    ref, _ = _reference(unit(q), unit(g), 50, 15, 0.3)
    assert_close(image_reid.reranked(q, g, rr), ref, FLOAT64, "normalised then re-ranked")
    rr.normalize = False
    ref_raw, _ = _reference(q, g, 50, 15, 0.3)
    assert_close(image_reid.reranked(q, g, rr), ref_raw, FLOAT64, "raw features")
    assert np.abs(ref - ref_raw).max() > 0.01  # the norms matter: the switch is not a no-op here


def _integer_feats(seed, nq, ng, dim=8):
    """Small integers times 1, 2 or 4 (uneven norms) with repeated rows: float32 distances are exact, so many are
    exactly tied (ties go by index in both methods) and no rounding can reorder neighbours."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(nq + ng, dim)) * rng.choice([1, 2, 4], size=(nq + ng, 1))
    x[-1], x[nq] = x[-2], x[0]  # a duplicate in the gallery, one of a query
    return x[:nq].astype(np.float32), x[nq:].astype(np.float32)


def _unit(f):
    return f / np.linalg.norm(f, axis=1, keepdims=True)


@pytest.mark.parametrize("k1, k2, nq, ng", [(20, 6, 13, 70), (7, 1, 41, 42), (50, 15, 1, 82), (20, 10, 3, 5)])
def test_sparse_matches_dense(k1, k2, nq, ng):
    """Exact ties, uneven norms, several lambdas; the shapes stay the same within a case so each method compiles
    once for it."""
    rng = np.random.default_rng(k1 * 100 + nq)
    gauss = rng.normal(size=(nq + ng, 8)) * rng.uniform(0.2, 5.0, size=(nq + ng, 1))
    cases = [(_integer_feats(k1, nq, ng), 0.3), ((gauss[:nq], gauss[nq:]), 0.0),
             ((_unit(gauss[:nq]), _unit(gauss[nq:])), 0.7)]
    if nq + ng < 10:  # all features identical: every distance 0, every row maximum 0
        cases.append(((np.ones((nq, 8)), np.ones((ng, 8))), 0.3))
    for (q, g), lam in cases:
        dense = rerank.k_reciprocal(q, g, k1, k2, lam, method="dense")
        sparse = rerank.k_reciprocal(q, g, k1, k2, lam, method="sparse")
        assert sparse.shape == (nq, ng) and sparse.dtype == np.float32
        assert_close(sparse, dense, SPARSE, f"sparse vs dense, lambda {lam}", scale=1.0)
    q, g = cases[0][0]  # and one case against the transcription, not only against the dense method
    assert_close(sparse_ref := rerank.k_reciprocal(q, g, k1, k2, 0.3, method="sparse"),
                 _reference(q, g, k1, k2, 0.3)[0], FLOAT64, "sparse vs the transcription")
    assert np.isfinite(sparse_ref).all()


def test_sparse_blocks_and_steps_are_exact(monkeypatch):
    """Blocks of a few rows in every stage, lists padded to their longest (read back by a counting pass) instead
    of to a bound, and Jaccard steps of a few query rows give the same numbers bit for bit: each row's arithmetic
    depends neither on its block nor on the padding. 'auto' above DENSE_MAX_N is the sparse method."""
    q, g = _integer_feats(3, 13, 70)
    whole = rerank.k_reciprocal(q, g, 20, 6, method="sparse")
    monkeypatch.setattr(rerank, "DENSE_MAX_N", 82)
    np.testing.assert_array_equal(rerank.k_reciprocal(q, g, 20, 6), whole)
    monkeypatch.setattr(rerank, "BLOCK_ELEMENTS", 700)  # 8-row blocks of distances, 1-row blocks of V
    monkeypatch.setattr(rerank, "PAIR_BLOCK", 50)  # Jaccard steps of a query row or two
    monkeypatch.setattr(rerank, "SMALL_ELEMENTS", 0)  # every list length counted first
    np.testing.assert_array_equal(rerank.k_reciprocal(q, g, 20, 6, method="sparse"), whole)
    np.testing.assert_array_equal(rerank.k_reciprocal(q, g, 20, 6, chunk=5, method="sparse"), whole)
