"""Retrieval metrics against a plain numpy loop of the Market-1501 / IRRA formulas."""

import numpy as np
import pytest

from reid_jax.eval import metrics
from tests.numerics import assert_close

# Metrics in percent from float32 scores and float32 means, against float64: relative to 100 (tests/numerics.py)
PERCENT = 1e-6


def _reference(q, q_pid, q_cam, g, g_pid, g_cam, max_rank):
    """The classic per-query loop (Market-1501 eval_func), with cameras < 0 meaning 'no camera filter'."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    dist = -(qn @ gn.T)
    aps, inps, cmcs = [], [], []
    for i in range(len(q)):
        order = np.argsort(dist[i], kind="stable")
        remove = (g_pid[order] == q_pid[i]) & (g_cam[order] == q_cam[i]) & (q_cam[i] >= 0)
        matches = (g_pid[order] == q_pid[i])[~remove].astype(float)
        if not matches.any():
            continue
        cmc = np.minimum(matches.cumsum(), 1)
        cmcs.append(np.pad(cmc, (0, max(0, max_rank - len(cmc))), mode="edge")[:max_rank])
        precision = matches.cumsum() / np.arange(1, len(matches) + 1)
        aps.append((precision * matches).sum() / matches.sum())
        last = np.flatnonzero(matches)[-1]
        inps.append(matches.sum() / (last + 1))
    cmc = np.mean(cmcs, 0) * 100
    return {"R1": cmc[0], "R5": cmc[4], "R10": cmc[9], "mAP": np.mean(aps) * 100, "mINP": np.mean(inps) * 100,
            "num_queries": len(aps), "cmc": cmc}


def _data(seed, nq, ng, nid, ncam, dim=16):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(nid, dim))
    g_pid = rng.integers(0, nid, ng)
    q_pid = rng.integers(0, nid, nq)
    g = centers[g_pid] + 1.2 * rng.normal(size=(ng, dim))
    q = centers[q_pid] + 1.2 * rng.normal(size=(nq, dim))
    return q, q_pid, rng.integers(0, ncam, nq), g, g_pid, rng.integers(0, ncam, ng)


@pytest.mark.parametrize("chunk", [None, 7])
def test_image_reid_matches_reference(chunk):
    q, qp, qc, g, gp, gc = _data(0, 60, 70, 25, 2)
    ours = metrics.image_reid(q, qp, qc, g, gp, gc, chunk=chunk)
    ref = _reference(q, qp, qc, g, gp, gc, 50)
    assert ours["num_queries"] == ref["num_queries"] < 60  # some queries lose all matches to the camera rule
    for k in ("R1", "R5", "R10", "mAP", "mINP"):
        assert_close(ours[k], ref[k], PERCENT, k, scale=100)
    assert_close(ours["cmc"], ref["cmc"], PERCENT, "cmc", scale=100)


@pytest.mark.parametrize("chunk", [None, 16])
def test_text_to_image_matches_reference(chunk):
    q, qp, _, g, gp, _ = _data(1, 90, 120, 30, 1)
    ours = metrics.text_to_image(q, qp, g, gp, chunk=chunk)
    ref = _reference(q, qp, np.full(90, -1), g, gp, np.full(120, -1), 10)
    for k in ("R1", "R5", "R10", "mAP", "mINP"):
        assert_close(ours[k], ref[k], PERCENT, k, scale=100)


def test_hand_computed_case():
    # gallery ranked for the query as: wrong, right, wrong, right -> AP = (1/2 + 2/4) / 2, INP = 2/4, R1 = 0
    q = np.array([[1.0, 0.0]])
    g = np.array([[1.0, 0.1], [1.0, 0.2], [1.0, 0.3], [1.0, 0.4]])
    out = metrics.text_to_image(q, np.array([7]), g, np.array([3, 7, 4, 7]))
    assert out["R1"] == 0 and out["R5"] == 100 and out["mAP"] == pytest.approx(50.0) and out["mINP"] == 50.0
    # Market rule: the match seen by the query's camera is removed; the other one is then third of three.
    out = metrics.image_reid(q, np.array([7]), np.array([0]), g, np.array([3, 7, 4, 7]), np.array([1, 0, 1, 1]))
    assert out["mAP"] == pytest.approx(100 / 3) and out["mINP"] == pytest.approx(100 / 3)
    assert out["cmc"][:3] == [0, 0, 100]


def test_errors():
    q, qp, qc, g, gp, gc = _data(2, 4, 10, 3, 2)
    with pytest.raises(ValueError, match="camera"):
        metrics.image_reid(q, qp, qc - 5, g, gp, gc)
    with pytest.raises(ValueError, match="no query"):
        metrics.text_to_image(q, qp + 100, g, gp)
