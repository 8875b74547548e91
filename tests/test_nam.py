"""Noise-aware masking against the formulas of docs/tde_nam.md, 'Noise-aware masking (NAM)', written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reid_jax import tokenizer
from reid_jax.models import clip as clip_lib
from reid_jax.models import nam
from tests.numerics import assert_close

P = 0.15


def _ids(rng, n=64, length=20):
    ids = np.zeros((n, length), np.int32)
    for i in range(n):
        k = int(rng.integers(3, length - 1))
        ids[i, 0], ids[i, k] = tokenizer.SOT_ID, tokenizer.EOT_ID
        ids[i, 1:k] = rng.integers(1, tokenizer.MASK_ID, k - 1)
    return ids


def test_masking_probs_formula():
    rng = np.random.default_rng(0)
    ids = _ids(rng)
    sim = rng.uniform(-0.2, 0.9, ids.shape).astype(np.float32)
    sim[5] = nam.UNSEEN  # a caption not seen in the previous epoch
    probs = np.asarray(nam.masking_probs(jnp.asarray(ids), jnp.asarray(sim), P, "nam"))
    for i in range(len(ids)):
        real = (ids[i] > 0) & (ids[i] < tokenizer.MASK_ID)
        if i == 5:
            expected = np.where(real, P, 0.0)
        else:
            r = 1 - sim[i]
            expected = np.where(real, np.clip(r - r[real].mean() + P, 0, 1), 0.0)
        assert_close(probs[i], expected, 2e-6, f"probabilities of caption {i}")  # float32 of the float64 formula
    uniform = np.asarray(nam.masking_probs(jnp.asarray(ids), jnp.asarray(sim), P, "uniform"))
    assert_close(uniform, np.where((ids > 0) & (ids < tokenizer.MASK_ID), P, 0.0), 1e-6, "uniform probabilities")
    assert not np.asarray(nam.masking_probs(jnp.asarray(ids), jnp.asarray(sim), P, "none")).any()
    with pytest.raises(ValueError, match="nam.mode"):
        nam.masking_probs(jnp.asarray(ids), jnp.asarray(sim), P, "random")


def test_mask_tokens_statistics():
    rng = np.random.default_rng(1)
    base = _ids(rng, n=8, length=30)
    base_real = (base > 0) & (base < tokenizer.MASK_ID)
    base_probs = np.where(base_real, rng.uniform(0, 0.5, base.shape), 0.0).astype(np.float32)
    ids, probs = np.tile(base, (500, 1)), np.tile(base_probs, (500, 1))  # 4000 rows, 500 draws of each
    real = (ids > 0) & (ids < tokenizer.MASK_ID)
    out, labels = (np.asarray(x) for x in nam.mask_tokens(jnp.asarray(ids), jnp.asarray(probs),
                                                          jax.random.key(0)))
    chosen = labels > 0
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    assert (out[~real] == ids[~real]).all() and not chosen[~real].any()  # SOT / EOT / pad untouched
    assert chosen.any(axis=1).all()  # at least one token per caption
    # Chosen with probability probs (up to the forced first word): compare per-position frequencies.
    freq = chosen.reshape(500, 8, 30).mean(0)
    np.testing.assert_allclose(freq[:, 2:], base_probs[:, 2:], atol=0.08)
    kinds = out[chosen]
    frac_mask = (kinds == tokenizer.MASK_ID).mean()
    frac_keep = (kinds == ids[chosen]).mean()
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_keep - 0.1) < 0.03
    assert ((kinds >= 1) & (kinds <= tokenizer.MASK_ID)).all()


def test_forced_first_word_when_none_chosen():
    ids = _ids(np.random.default_rng(2), n=4)
    out, labels = nam.mask_tokens(jnp.asarray(ids), jnp.zeros(ids.shape), jax.random.key(1))
    labels, out = np.asarray(labels), np.asarray(out)
    assert (labels[:, 1] == ids[:, 1]).all() and (labels[:, 2:] == 0).all()
    # the forced word always becomes the mask token, never a random id or itself; nothing else changes
    assert (out[:, 1] == tokenizer.MASK_ID).all() and (out[:, 2:] == ids[:, 2:]).all()


def test_dissimilar_tokens_are_masked_more():
    ids = _ids(np.random.default_rng(3), n=1, length=12)
    real = (ids[0] > 0) & (ids[0] < tokenizer.MASK_ID)
    sim = np.where(np.arange(12) % 2 == 0, 0.6, 0.5)[None].astype(np.float32)  # even positions match better
    probs = nam.masking_probs(jnp.asarray(ids), jnp.asarray(sim), P, "nam")
    batch = jnp.tile(jnp.asarray(ids), (3000, 1))
    _, labels = nam.mask_tokens(batch, jnp.tile(probs, (3000, 1)), jax.random.key(2))
    freq = (np.asarray(labels) > 0).mean(0)
    odd, even = real & (np.arange(12) % 2 == 1), real & (np.arange(12) % 2 == 0)
    assert freq[odd].mean() > 1.5 * freq[even].mean()
    assert_close(np.asarray(probs)[0, real].mean(), P, 1e-5, "mean probability")  # unclipped: the mean stays p


def test_token_similarity_reads_the_right_layer_and_patches():
    cfg = clip_lib.CLIPConfig.tiny().replace(vision={"num_extra_tokens": 2})
    model = clip_lib.CLIP(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(4)
    images = jnp.asarray(rng.normal(size=(2, 32, 16, 3)), jnp.float32)
    ids = jnp.asarray(_ids(rng, n=2, length=16))
    _, img_layers = model.visual(images, return_layers=True)
    _, txt_layers = model.text(ids, return_layers=True)
    sim = np.asarray(nam.token_similarity(img_layers, txt_layers, model, layer=1, num_prefix_tokens=3))
    patches = np.asarray(model.visual.project(img_layers[0]))[:, 3:]
    words = np.asarray(model.text.project(txt_layers[0]))
    for b in range(2):
        pn = patches[b] / np.linalg.norm(patches[b], axis=-1, keepdims=True)
        wn = words[b] / np.linalg.norm(words[b], axis=-1, keepdims=True)
        assert_close(sim[b], (wn @ pn.T).max(-1), 1e-5, f"similarities of caption {b}")


def test_nam_report_auc_is_the_pairwise_win_rate():
    from reid_jax.train.nam_oracle import auc as _auc

    rng = np.random.default_rng(3)
    pos, neg = np.round(rng.normal(0.3, 1, 40), 1), np.round(rng.normal(0, 1, 70), 1)  # rounding makes ties
    wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    assert _auc(pos, neg) == pytest.approx(wins / (40 * 70))


def test_degraded_oracle_table_has_the_masking_auc_asked():
    """nam_oracle.degrade: the exact table (1 right, 0 wrong) times the gap plus one Gaussian draw times a single
    sigma, clipped to [-1, 1], whose masking probabilities (docs/tde_nam.md's formula in numpy) rank the wrong
    tokens above the right ones with the AUC asked (every pair counted); out-of-reach targets are refused."""
    from reid_jax import errors
    from reid_jax.train import nam_oracle

    rng = np.random.default_rng(7)
    ids = _ids(rng, n=300, length=24)
    ref = np.where(tokenizer.is_word(ids) & (rng.random(ids.shape) < 0.2), ids % 1000 + 1, ids)  # 20% words wrong
    ref[0, 1:3] = 0  # a caption of another token count: scored neither wrong nor right
    exact = np.where(ids != ref, 0.0, 1.0).astype(np.float32)
    real = np.asarray(tokenizer.is_word(ids))
    aligned = ((ids > 0) == (ref > 0)).all(1, keepdims=True)
    wrong, right = real & aligned & (ids != ref), real & aligned & (ids == ref)
    for target in (0.62, 0.75, 0.9):
        table = nam_oracle.degrade(exact, ids, ref, target, gap=0.15, p=P, seed=3)
        r = 1.0 - table.astype(np.float64)
        mean = np.where(real, r, 0).sum(1, keepdims=True) / real.sum(1, keepdims=True)
        probs = np.where(real, np.clip(r - mean + P, 0, 1), 0)
        pos, neg = probs[wrong], probs[right]
        wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
        assert wins / (len(pos) * len(neg)) == pytest.approx(target, abs=2e-3)
        z = np.random.default_rng(3).standard_normal(ids.shape)
        inside = np.abs(table) < 0.999  # not clipped
        sigma = (table - 0.15 * exact)[inside] / z[inside]
        assert np.ptp(sigma) < 1e-4 and sigma.mean() > 0
    for target in (0.5, 1.0):
        with pytest.raises(errors.ConfigError, match=f"config.nam.oracle_auc = {target} is out of reach"):
            nam_oracle.degrade(exact, ids, ref, target, gap=0.15, p=P, seed=3)


def test_model_similarities_batches_as_one_call():
    """The report's batched similarities (last batch padded) equal nam.token_similarity on all rows at once."""
    from reid_jax.train.nam_report import model_similarities

    model = clip_lib.CLIP(clip_lib.CLIPConfig.tiny(), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(5)
    images = rng.normal(size=(7, 32, 16, 3)).astype(np.float32)
    ids = _ids(rng, n=7, length=16)
    got = model_similarities(model, images, ids, layer=2, batch_size=3)
    _, img_layers = model.visual(jnp.asarray(images), return_layers=True)
    _, txt_layers = model.text(jnp.asarray(ids), return_layers=True)
    assert_close(got, np.asarray(nam.token_similarity(img_layers, txt_layers, model, 2, 1)), 1e-5, "similarities")


def test_nam_report_of_a_model_finds_the_corrupted_words(data_dir):
    """--model mode on small_noisy / small: the corrupted tokens it scores are those where the two builders' plans
    differ (tokenised independently here), and similarities that single them out give AUC 1."""
    import ml_collections

    from data_builders.synthetic_pedestrians import CONFIGS, builder
    from reid_jax.data import build
    from reid_jax.train import nam_report

    build.build("synthetic_pedestrians", data_dir, config="small_noisy")
    length = 48
    noisy, clean = (builder.plan(next(c for c in CONFIGS if c.name == n))["train"] for n in ("small_noisy", "small"))
    expected = 0
    for a, b in zip(noisy, clean):
        for ca, cb in zip(a.captions, b.captions):
            ta, tb = tokenizer.tokenize([ca, cb], length)
            if ((ta > 0) == (tb > 0)).all():
                expected += int(((ta != tb) & (ta > 0)).sum())
    config = ml_collections.ConfigDict({"data": {"context_length": length, "aug": {
        "image_size": (32, 16), "test_interpolation": "bilinear", "mean_std": "clip"}}, "nam": {"layer": 1, "p": P}})
    model = clip_lib.CLIP(clip_lib.CLIPConfig.tiny().replace(text={"context_length": length}), rngs=nnx.Rngs(2))
    out = nam_report.report_model(model, config, data_dir, data_dir, 0, ("small_noisy", "small"))
    assert out["corrupted_tokens"] == expected > 0 and out["images"] == len(noisy)
    assert 0.3 < out["auc"] < 0.7  # a random model does not know the words

    records, ids, ref = nam_report._captions(data_dir, data_dir, length, configs=("small_noisy", "small"))
    oracle = np.where(ids != ref, 0.0, 1.0).astype(np.float32)  # corrupted tokens: least similar
    # the word oracle: a clean token always scores 1; a wrong one scores 1 exactly when a clean caption of the same
    # image holds it (checked here on the raw strings' tokens, one caption at a time)
    out = nam_report.word_oracle(data_dir, data_dir, length, P, 0, ("small_noisy", "small"))
    assert out["corrupted_tokens"] == expected and 0.5 < out["auc"] <= 1.0
    recs, ids2, ref2, words = nam_report._captions(data_dir, data_dir, length, configs=("small_noisy", "small"),
                                                   image_words=True)
    assert (recs == records).all() and (ids2 == ids).all()
    clean_by_record = {}
    for r, row in zip(records, ref):
        clean_by_record.setdefault(int(r), set()).update(row.tolist())
    for r, row, ws in zip(records, ids, words):
        for t in row[(row > 0) & (row < tokenizer.MASK_ID)]:
            assert (t in ws) == (t in clean_by_record[int(r)])
    scores = nam_report._scores(ids, ref, oracle, P, by_kind=True)
    assert scores["auc"] == 1.0
    # per kind: every pair is told apart, and the kinds split the wrong and the right tokens with nothing left over
    kinds = scores["by_kind"]
    assert kinds and all(v["auc"] == 1.0 and v["sim_wrong"] == 0.0 and v["sim_right"] == 1.0 for v in kinds.values())
    wrong = {k.split("/")[0]: v["tokens"][0] for k, v in kinds.items()}
    right = {k.split("/")[1]: v["tokens"][1] for k, v in kinds.items()}
    assert sum(wrong.values()) == scores["corrupted_tokens"] and sum(right.values()) == scores["clean_tokens"]


def test_recognition_scores_each_caption_against_other_images(data_dir):
    """nam_report --recognition: every caption meets `shifts` distinct images other than its own, and a token
    counts as shown exactly when a clean caption of the paired image holds it (tokenised here, one caption at a
    time, from the source's strings)."""
    import ml_collections

    from reid_jax import data
    from reid_jax.data.records import as_str
    from reid_jax.train import nam_report

    records = np.array([2, 2, 4, 9, 9, 9])
    pairs = nam_report.recognition_pairs(records, 2)
    assert pairs.shape == (2, 6) and not (pairs == records).any()
    assert all(len({*pairs[:, k]}) == 2 for k in range(6))
    length, shifts = 48, 3
    config = ml_collections.ConfigDict({"data": {"context_length": length, "aug": {
        "image_size": (32, 16), "test_interpolation": "bilinear", "mean_std": "clip"}}, "nam": {"layer": 1}})
    model = clip_lib.CLIP(clip_lib.CLIPConfig.tiny().replace(text={"context_length": length}), rngs=nnx.Rngs(2))
    out = nam_report.recognition(model, config, data_dir, 0, shifts, clean="small")
    source = data.load_source("synthetic_pedestrians", "train", data_dir, "small", decode_image=False)
    holds = [set().union(*(tokenizer.tokenize(as_str(c), length)[0].tolist() for c in r["captions"]))
             for r in source]
    recs, ids, _ = nam_report._captions(data_dir, data_dir, length, configs=("small", "small"))
    shown = not_shown = 0
    for others in nam_report.recognition_pairs(recs, shifts):
        for row, other in zip(ids, others):
            words = [t for t in row.tolist() if 0 < t < tokenizer.MASK_ID]
            shown += sum(t in holds[other] for t in words)
            not_shown += sum(t not in holds[other] for t in words)
    got = out["recognition"]
    assert out["images"] == len(source) and shown > 0 and not_shown > 0
    assert sum(v["tokens"][0] for v in got.values()) == shown and sum(v["tokens"][1] for v in got.values()) == not_shown
    assert all(0.0 <= v["auc"] <= 1.0 for v in got.values())
    # per slot: each slot's tokens are exactly the caption positions holding one of its words' tokens
    from data_builders.synthetic_pedestrians import attributes
    slots = nam_report.recognition(model, config, data_dir, 0, shifts, clean="small", by_slot=True)["recognition"]
    assert slots["colour"] == got["colour"] and "pattern" in slots and "upper_colour" not in slots
    colours = set(tokenizer.tokenize(sorted({*attributes.COLOURS, *attributes.HAIR_COLOURS}), 16).ravel().tolist())
    for slot, v in slots.items():
        if slot == "colour":
            continue
        vocab = set(tokenizer.tokenize(sorted(attributes.VOCAB[slot]), 16).ravel().tolist())
        own = {t for t in vocab if 0 < t < tokenizer.MASK_ID} - colours  # every BPE piece ("t-shirt": t, -, shirt)
        count = shifts * sum(t in own for row in ids for t in row.tolist() if 0 < t < tokenizer.MASK_ID)
        assert sum(v["tokens"]) == count, slot


def test_attribute_token_ids_are_the_vocabulary_words():
    from data_builders.synthetic_pedestrians import attributes
    from reid_jax.train.nam_report import attribute_token_ids

    got = set(attribute_token_ids().tolist())

    def word_ids(word):
        ids = tokenizer.tokenize([word], 8)[0]
        return {int(i) for i in ids if i not in (0, tokenizer.SOT_ID, tokenizer.EOT_ID)}

    for word in ("red", "jacket", "sneakers", "blonde", "backpack"):
        assert word_ids(word) <= got, word
    for word in ("with", "a", "the", "walking"):
        assert not word_ids(word) & got, word
    assert len(got) <= sum(len(v) for v in attributes.VOCAB.values()) * 3


def test_stage_a_token_losses_compare_the_tokens_of_the_layer_they_name(data_dir, tmp_path):
    """loss.filip_layer = 1 on the 2-layer test model: the step's FILIP and word-match losses are their formulas
    (loops in numpy) on the projected tokens after block 1 of each tower, not after the last; with
    config.data.swap_prob, so is the in-context term on the batch's swapped captions."""
    from reid_jax.data import device, pipeline
    from reid_jax.train import tde_nam
    from tests.cli_config import tiny_config
    from tests.test_losses import _filip_loops, _word_match_loops

    c = tiny_config(data_dir)
    c.nam.mode = "none"
    c.loss.update({"sdm_weight": 0.0, "itc_weight": 0.0, "filip_weight": 1.0, "logit_scale": 10.0,
                   "word_weight": 1.0, "word_scale": 8.0, "word_bias": -3.0})
    c.data.update({"swap_prob": 0.5, "swap_words": ("black", "white", "grey", "red", "blue", "green")})
    task = tde_nam.Task(c, tmp_path)
    ts = task.init_state()
    batch = device.prepare_images(next(iter(task.train_stream(pipeline.Shard()))), c.data.aug, jax.random.key(0))
    model = ts.model
    prefix = 1 + model.config.vision.num_extra_tokens
    ids = np.asarray(batch["text"])
    mask = np.asarray(nam.real_tokens(jnp.asarray(ids)))
    img_last, img_layers = model.visual(batch["image"], return_layers=True)
    txt_last, txt_layers = model.text(jnp.asarray(ids), return_layers=True)
    swapped = np.asarray(batch["swapped_text"])
    swappable = np.isin(ids, pipeline.swap_token_ids(c.data.swap_words))
    assert (swapped != ids).any() and (swapped[~swappable] == ids[~swappable]).all()
    sw_last, sw_layers = model.text(jnp.asarray(swapped), return_layers=True)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    want = {}
    for layer, img, txt, sw in ((1, img_layers[0], txt_layers[0], sw_layers[0]), (0, img_last, txt_last, sw_last)):
        patches = np.asarray(model.visual.project(img[:, prefix:]), np.float64)
        words = np.asarray(model.text.project(txt), np.float64)
        sw_words = np.asarray(model.text.project(sw), np.float64)
        own = []  # each swappable word of the swapped caption against its own image, labelled by its caption
        for b, l in zip(*np.nonzero(swappable)):
            z = 8.0 * (unit(patches[b]) @ unit(sw_words[b, l])).max() - 3.0
            own.append(np.log1p(np.exp(-abs(z))) + max(z, 0) - z * float(swapped[b, l] in ids[b][mask[b]]))
        want[layer] = {"loss_filip": _filip_loops(patches, words, mask, 10.0),
                       "loss_word": _word_match_loops(patches, words, ids, mask, 8.0, -3.0),
                       "loss_word_swap": float(np.mean(own))}
    assert abs(want[1]["loss_filip"] - want[0]["loss_filip"]) > 1e-3  # the test can tell the layers apart
    graphdef, state = nnx.split(ts)
    for layer in (1, 0):
        c.loss.filip_layer = layer
        task = tde_nam.Task(c, tmp_path)
        metrics = jax.jit(lambda s, b: task.train_step(nnx.merge(graphdef, s), b, jax.random.key(1)))(state, batch)
        for name, value in want[layer].items():
            assert_close(float(metrics[name]), value, 1e-4, f"{name} at filip_layer={layer}")


def test_oracle_table_marks_the_wrong_words_and_stays(data_dir, tmp_path):
    """config.nam.oracle: NAM's table starts as the truth of small_noisy against small and no step changes it.
    'exact' is 0 at exactly the tokens where a caption's tokens differ from its clean twin (the reference: both
    builders' plans, matched by file name and tokenised here); 'word' is 0 at the tokens no clean caption of the
    image holds. In each caption NAM then masks every wrong word more likely than any right one. With
    oracle_timing 'as_nam' the table starts unseen and a step writes the exact rows of its examples after masking
    them uniformly; oracle_auc degrades it (nam_oracle.degrade) and needs an oracle kind."""
    from data_builders.synthetic_pedestrians import CONFIGS, builder
    from reid_jax import errors
    from reid_jax.data import build, device, pipeline
    from reid_jax import data
    from reid_jax.data.records import as_str
    from reid_jax.train import nam_oracle, tde_nam
    from tests.cli_config import tiny_config

    build.build("synthetic_pedestrians", data_dir, config="small_noisy")
    plans = {n: {s.file_name: s.captions for s in builder.plan(next(c for c in CONFIGS if c.name == n))["train"]}
             for n in ("small_noisy", "small")}
    c = tiny_config(data_dir)
    c.data.train.config = "small_noisy"
    c.nam.update({"mode": "nam", "oracle": "exact", "oracle_config": "small"})
    length = c.data.context_length
    for kind in ("exact", "word"):
        c.nam.oracle = kind
        task = tde_nam.Task(c, tmp_path)
        ts = task.init_state()
        if kind == "exact":
            exact_table = np.asarray(ts.nam_sims[...], np.float32)
        batch = device.prepare_images(next(iter(task.train_stream(pipeline.Shard()))), c.data.aug, jax.random.key(0))
        table = np.asarray(ts.nam_sims[...], np.float32)[np.asarray(batch["index"])]
        wrong_seen = 0
        for text, rec, row in zip(np.asarray(batch["text"]), np.asarray(batch["image_index"]), table):
            name = as_str(task.source[int(rec)]["file_name"])
            noisy, clean = plans["small_noisy"][name], plans["small"][name]
            cap = next(i for i, n in enumerate(noisy) if (tokenizer.tokenize(n, length)[0] == text).all())
            ref = tokenizer.tokenize(clean[cap], length)[0]
            shown = {t for s in clean for t in tokenizer.tokenize(s, length)[0].tolist()}
            if kind == "exact":
                want = np.where(((text > 0) == (ref > 0)).all() & (text != ref), 0.0, 1.0)
            else:
                want = np.asarray([float(t in shown) for t in text.tolist()])
            word = np.asarray(tokenizer.is_word(text))
            np.testing.assert_array_equal(row[word], want[word])
            wrong_seen += int((want[word] == 0).sum())
        assert wrong_seen > 0
        probs = np.asarray(nam.masking_probs(jnp.asarray(batch["text"]), jnp.asarray(table), P, "nam"))
        is_word = np.asarray(tokenizer.is_word(np.asarray(batch["text"])))
        for prob, wrong, word in zip(probs, table == 0, is_word):  # each wrong word masked more than any right one
            if (wrong & word).any():
                assert prob[wrong & word].min() > prob[~wrong & word].max()
        graphdef, state = nnx.split(ts)
        after = jax.jit(lambda s, b: (lambda t: (task.train_step(t, b, jax.random.key(1)), nnx.state(t))[1])(
            nnx.merge(graphdef, s)))(state, batch)
        np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, after).nam_sims[...]),
                                      np.asarray(ts.nam_sims[...]))
    c.nam.update({"oracle": "exact", "oracle_timing": "as_nam"})  # NAM's table filled row by row as the steps go
    task = tde_nam.Task(c, tmp_path)
    ts = task.init_state()
    assert (np.asarray(ts.nam_sims[...]) == nam.UNSEEN).all()
    graphdef, state = nnx.split(ts)
    step = jax.jit(lambda s, b: (lambda t: (task.train_step(t, b, jax.random.key(1)), nnx.state(t)))(
        nnx.merge(graphdef, s)))
    metrics, after = step(state, batch)  # the first sight of these examples: uniform masking, then their rows
    after = np.asarray(nnx.merge(graphdef, after).nam_sims[...], np.float32)
    seen = np.zeros(len(after), bool)
    seen[np.asarray(batch["index"])] = True
    np.testing.assert_array_equal(after[seen], np.asarray(ts.nam_oracle[...], np.float32)[seen])
    np.testing.assert_array_equal(after[seen], exact_table[seen])
    assert (after[~seen] == nam.UNSEEN).all()
    real = np.asarray(tokenizer.is_word(np.asarray(batch["text"]))).sum()
    assert abs(float(metrics["mask_rate"]) - P) < 4 * np.sqrt(P * (1 - P) / real)  # uniform's rate, not the table's
    c.nam.update({"oracle_timing": "start", "oracle_auc": 0.8})  # degraded: the same noise as nam_oracle.degrade's
    table = np.asarray(tde_nam.Task(c, tmp_path).init_state().nam_sims[...], np.float32)
    noisy = data.load_source("synthetic_pedestrians", "train", data_dir, "small_noisy", decode_image=False)
    clean = data.load_source("synthetic_pedestrians", "train", data_dir, "small", decode_image=False)
    _, ids, ref = nam_oracle.paired_captions(noisy, clean, length)
    assert nam_oracle.masking_auc(ids, ref, table[:len(ids)], P) == pytest.approx(0.8, abs=1e-3)
    np.testing.assert_allclose(table[:len(ids)], nam_oracle.degrade(nam_oracle.similarities(ids, ref, None, "exact"),
                                                                    ids, ref, 0.8, 0.15, P, c.seed), atol=1e-3)
    c.nam.update({"oracle": "", "oracle_auc": 0.8})
    with pytest.raises(errors.ConfigError, match=r"config.nam.oracle_auc = 0.8 degrades .* set config.nam.oracle"):
        tde_nam.Task(c, tmp_path)
    c.nam.update({"oracle": "word", "oracle_auc": 0.0, "mode": "uniform"})
    with pytest.raises(errors.ConfigError, match=r"config.nam.oracle = 'word' .* needs config.nam.mode = 'nam'"):
        tde_nam.Task(c, tmp_path)
