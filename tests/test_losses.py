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


def _filip_loops(patches, words, mask, scale):
    """FILIP's token-wise loss with explicit loops over pairs of images and captions, in numpy float64."""
    n = len(patches)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    i2t, t2i = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            c = unit(patches[i]) @ unit(words[j][mask[j]]).T  # [P, words of caption j]
            i2t[i, j] = c.max(1).mean()  # each patch's best word
            t2i[j, i] = c.max(0).mean()  # each word's best patch
    ce = lambda logits: np.mean([np.log(np.exp(r - r.max()).sum()) + r.max() - r[k] for k, r in enumerate(logits)])
    return 0.5 * (ce(scale * i2t) + ce(scale * t2i))


def _cosines(patches, words):
    return losses.patch_word_cosines(jnp.asarray(patches, jnp.float32), jnp.asarray(words, jnp.float32))


def _word_match_loops(patches, words, ids, mask, scale, bias, shown=None):
    """The word-level sigmoid loss with loops over images, captions and words, in numpy float64; `shown[i]`: the
    words image i shows (default: those of its caption)."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    total, count = 0.0, 0
    for i in range(len(patches)):
        own = set(ids[i][mask[i]].tolist()) if shown is None else shown[i]
        for j in range(len(words)):
            for l in np.flatnonzero(mask[j]):
                z = scale * (unit(patches[i]) @ unit(words[j][l])).max() + bias
                y = float(ids[j][l] in own)
                total += np.log1p(np.exp(-abs(z))) + max(z, 0) - z * y  # BCE with logits, stable form
                count += 1
    return total / count


def test_own_word_match_matches_its_formula():
    """Word l of caption b against image b only, labelled by the words image b shows (numpy loops)."""
    rng = np.random.default_rng(9)
    patches, words = rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 6, 8))
    ids = rng.integers(1, 6, size=(3, 6))
    mask = rng.random((3, 6)) < 0.6
    mask[:, 0] = True
    shown = [{1, 2}, {3, 4, 5}, set()]
    image_words = np.zeros((3, 4), np.int32)
    for i, ws in enumerate(shown):
        image_words[i, :len(ws)] = sorted(ws)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    bce = []
    for b in range(3):
        for l in np.flatnonzero(mask[b]):
            z = 10.0 * (unit(patches[b]) @ unit(words[b, l])).max() - 5.0
            bce.append(np.log1p(np.exp(-abs(z))) + max(z, 0) - z * float(ids[b, l] in shown[b]))
    got = losses.own_word_match(jnp.asarray(patches), jnp.asarray(words), jnp.asarray(ids), jnp.asarray(mask),
                                jnp.asarray(image_words), 10.0, -5.0)
    assert_close(float(got), float(np.mean(bce)), TORCH, "own-word-match loss")


def test_filip_matches_its_formula():
    rng = np.random.default_rng(7)
    patches, words = rng.normal(size=(5, 6, 8)), rng.normal(size=(5, 9, 8))
    mask = rng.random((5, 9)) < 0.6
    mask[:, 0] = True
    got = losses.filip(_cosines(patches, words), jnp.asarray(mask), 10.0)
    assert_close(float(got), _filip_loops(patches, words, mask, 10.0), TORCH, "FILIP loss")
    # the masked words play no part: changing them changes nothing
    noisy = np.where(mask[..., None], words, rng.normal(size=words.shape) * 5)
    again = losses.filip(_cosines(patches, noisy), jnp.asarray(mask), 10.0)
    assert_close(float(again), float(got), TORCH, "FILIP loss with other masked words")


def test_word_match_matches_its_formula():
    rng = np.random.default_rng(8)
    patches, words = rng.normal(size=(4, 6, 8)), rng.normal(size=(4, 7, 8))
    ids = rng.integers(1, 6, size=(4, 7))  # a small vocabulary: captions share words
    mask = rng.random((4, 7)) < 0.7
    mask[:, 0] = True
    ids[0, 1], mask[0, 1] = 99, False  # a token outside the mask labels nothing: 99 is no one's word
    ids[1, 2], mask[1, 2] = 99, True
    got = losses.word_match(_cosines(patches, words), jnp.asarray(ids), jnp.asarray(mask), 10.0, -5.0)
    assert_close(float(got), _word_match_loops(patches, words, ids, mask, 10.0, -5.0), TORCH, "word-match loss")
    # labels from the words each image is known to show (e.g. all its captions), 0-padded: 0 labels nothing
    shown = [{1, 2}, {3, 4, 5, 99}, set(), {2}]
    image_words = np.zeros((4, 5), np.int32)
    for i, ws in enumerate(shown):
        image_words[i, :len(ws)] = sorted(ws)
    got = losses.word_match(_cosines(patches, words), jnp.asarray(ids), jnp.asarray(mask), 10.0, -5.0,
                            jnp.asarray(image_words))
    want = _word_match_loops(patches, words, ids, mask, 10.0, -5.0, shown)
    assert_close(float(got), want, TORCH, "word-match loss, labels from image_words")
    assert abs(want - _word_match_loops(patches, words, ids, mask, 10.0, -5.0)) > 1e-3  # the labels do change it
