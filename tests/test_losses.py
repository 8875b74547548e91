"""Losses against their formulas written out in PyTorch (IRRA's compute_sdm, F.cross_entropy)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid_jax import losses
from tests.numerics import assert_close

TORCH = 1e-5  # scalar losses against PyTorch, relative to their value (tests/numerics.py)


def _irra_sdm(image, text, pid, scale=50.0, eps=1e-8):
    """IRRA's compute_sdm as published (objectives.py), in torch."""
    pid = pid.reshape(-1, 1)
    labels = (pid - pid.t() == 0).float()
    image_norm = image / image.norm(dim=1, keepdim=True)
    text_norm = text / text.norm(dim=1, keepdim=True)
    t2i = scale * (text_norm @ image_norm.t())
    i2t = t2i.t()
    labels_distribute = labels / labels.sum(dim=1)
    i2t_loss = F.softmax(i2t, dim=1) * (F.log_softmax(i2t, dim=1) - torch.log(labels_distribute + eps))
    t2i_loss = F.softmax(t2i, dim=1) * (F.log_softmax(t2i, dim=1) - torch.log(labels_distribute + eps))
    return torch.mean(torch.sum(i2t_loss, dim=1)) + torch.mean(torch.sum(t2i_loss, dim=1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sdm_matches_irra(seed):
    rng = np.random.default_rng(seed)
    image, text = rng.normal(size=(12, 32)).astype(np.float32), rng.normal(size=(12, 32)).astype(np.float32)
    pid = rng.integers(0, 5, 12)  # several positives per row
    ours = losses.sdm(jnp.asarray(image), jnp.asarray(text), jnp.asarray(pid))
    ref = _irra_sdm(torch.from_numpy(image), torch.from_numpy(text), torch.from_numpy(pid))
    assert_close(float(ours), float(ref), TORCH, "SDM")


def test_sdm_is_small_for_aligned_features():
    feats = np.eye(6, 16, dtype=np.float32)
    aligned = losses.sdm(jnp.asarray(feats), jnp.asarray(feats), jnp.arange(6))
    shuffled = losses.sdm(jnp.asarray(feats), jnp.asarray(feats[::-1].copy()), jnp.arange(6))
    assert float(aligned) < 1e-6 < float(shuffled)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_and_id_loss(smoothing):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 8, 11)).astype(np.float32)
    y = rng.integers(0, 11, 8)
    ce = lambda x: F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y), label_smoothing=smoothing)
    assert_close(float(losses.cross_entropy(jnp.asarray(a), jnp.asarray(y), smoothing)), float(ce(a)), TORCH,
                 "cross entropy")
    ours = losses.id_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(y), smoothing)
    assert_close(float(ours), float((ce(a) + ce(b)) / 2), TORCH, "ID loss")


def test_mlm_ignores_unmasked_positions():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 7, 20)).astype(np.float32)
    labels = np.zeros((3, 7), np.int64)
    labels[0, 2], labels[1, 5], labels[2, 1] = 4, 19, 7
    ref = F.cross_entropy(torch.from_numpy(logits).reshape(-1, 20), torch.from_numpy(labels).reshape(-1),
                          ignore_index=0)
    assert_close(float(losses.mlm(jnp.asarray(logits), jnp.asarray(labels))), float(ref), TORCH, "MLM loss")


def test_itc_matches_irra():
    """IRRA's compute_itc (objectives.py) written out in torch."""
    rng = np.random.default_rng(5)
    image, text = rng.normal(size=(9, 16)).astype(np.float32), rng.normal(size=(9, 16)).astype(np.float32)
    ti, tt = torch.from_numpy(image), torch.from_numpy(text)
    logits = 20.0 * (ti / ti.norm(dim=-1, keepdim=True)) @ (tt / tt.norm(dim=-1, keepdim=True)).t()
    labels = torch.arange(9)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    got = losses.itc(jnp.asarray(image), jnp.asarray(text), 20.0)
    assert_close(float(got), float(want), TORCH, "ITC")
