"""synthetic_pedestrians: splits, determinism, ReID protocol, domains, part boxes, captions, caption noise."""

import collections
import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders.synthetic_pedestrians import CONFIGS, attributes, builder, freeform, render
from reid_jax import data
from reid_jax.data.build import build

NAME = "synthetic_pedestrians"
SPLITS = ("train", "test", "query", "gallery")
SMALL = next(c for c in CONFIGS if c.name == "small")
NOISY = next(c for c in CONFIGS if c.name == "small_noisy")


def _read(data_dir, split, raw_images=False) -> list[dict]:
    """All records of a split, sorted by file name, text as str; images encoded bytes with raw_images."""
    decoders = {"image": tfds.decode.SkipDecoding()} if raw_images else None
    src = data.builder(NAME, data_dir, "small").as_data_source(split=split, decoders=decoders)
    recs = []
    for i in range(len(src)):
        r = dict(src[i])
        for k in ("file_name", "domain"):
            r[k] = r[k].decode()
        r["captions"] = [c.decode() for c in r["captions"]]
        r["caption_sources"] = [c.decode() for c in r["caption_sources"]]
        recs.append(r)
    return sorted(recs, key=lambda r: r["file_name"])


@pytest.fixture(scope="module")
def recs(data_dir):
    return {s: [dict(r) for r in data.load_source(NAME, s, data_dir, "small")] for s in SPLITS}


@pytest.fixture(scope="module")
def people():
    return {p.pid: p for p in attributes.identities(SMALL)}


def _text(r, key):
    v = r[key]
    return v.decode() if isinstance(v, bytes) else v


def _pids(rs):
    return {int(r["pid"]) for r in rs}


# -------------------------------------------------------------------------------------------- splits, protocol
def test_split_sizes(recs):
    n, per = SMALL.num_identities, SMALL.images_per_identity
    train_ids, test_ids = _pids(recs["train"]), _pids(recs["test"])
    assert len(train_ids) + len(test_ids) == n
    assert abs(len(train_ids) - SMALL.train_fraction * n) < SMALL.max_group  # split falls on a group boundary
    assert len(recs["train"]) == per * len(train_ids) and len(recs["test"]) == per * len(test_ids)
    assert len(recs["query"]) == SMALL.queries_per_identity * len(test_ids)
    assert len(recs["query"]) + len(recs["gallery"]) == len(recs["test"])
    for rs in recs.values():
        counts = collections.Counter(int(r["pid"]) for r in rs)
        assert len(set(_text(r, "file_name") for r in rs)) == len(rs)  # no duplicates
        assert min(counts.values()) >= 1


def test_identities_disjoint_and_pids_from_one(recs, people):
    train, test = _pids(recs["train"]), _pids(recs["test"])
    assert not train & test
    assert train | test == set(range(1, SMALL.num_identities + 1))
    assert _pids(recs["query"]) == _pids(recs["gallery"]) == test
    names = lambda s: {_text(r, "file_name") for r in recs[s]}  # noqa: E731
    assert names("query") | names("gallery") == names("test") and not names("query") & names("gallery")
    assert all(people[p].split == "train" for p in train) and all(people[p].split == "test" for p in test)


def test_every_query_has_a_gallery_match_from_another_camera(recs):
    gallery = collections.defaultdict(set)
    for r in recs["gallery"]:
        gallery[int(r["pid"])].add(int(r["camid"]))
    for q in recs["query"]:
        assert gallery[int(q["pid"])] - {int(q["camid"])}, _text(q, "file_name")
    per_pid = collections.defaultdict(list)
    for q in recs["query"]:
        per_pid[int(q["pid"])].append(int(q["camid"]))
    assert all(len(set(c)) == len(c) for c in per_pid.values())  # queries of one pid from distinct cameras


def test_camids_zero_based_and_several_per_identity(recs):
    cams = collections.defaultdict(set)
    for s in ("train", "test"):
        for r in recs[s]:
            assert 0 <= int(r["camid"]) < SMALL.num_cameras
            assert _text(r, "file_name").split("/")[1].startswith(f"{int(r['pid']):04d}_c{int(r['camid'])}_")
            cams[int(r["pid"])].add(int(r["camid"]))
    assert min(len(c) for c in cams.values()) >= SMALL.cameras_per_identity[0]
    assert set().union(*cams.values()) == set(range(SMALL.num_cameras))


def test_deterministic_build(data_dir, tmp_path):
    build(NAME, tmp_path, config="small")
    for split in SPLITS:
        a, b = _read(data_dir, split, raw_images=True), _read(tmp_path, split, raw_images=True)
        assert len(a) == len(b)
        for ra, rb in zip(a, b):
            assert ra["image"] == rb["image"]  # the PNG bytes
            for k in ("file_name", "pid", "camid", "captions", "caption_sources", "domain"):
                assert ra[k] == rb[k], (split, k)
            np.testing.assert_array_equal(ra["part_boxes"], rb["part_boxes"])


def test_another_seed_gives_other_people_and_images():
    other = dataclasses.replace(SMALL, name="small_seed1", seed=1)
    a, b = builder.plan(SMALL)["train"], builder.plan(other)["train"]
    assert [s.identity.coarse() for s in a[::6]] != [s.identity.coarse() for s in b[::6]]
    assert [s.captions for s in a] != [s.captions for s in b]
    im_a, im_b = builder.render_shot(SMALL, a[0])[0], builder.render_shot(other, b[0])[0]
    assert np.abs(im_a.astype(int) - im_b.astype(int)).mean() > 10
    again = builder.render_shot(SMALL, builder.plan(SMALL)["train"][0])
    np.testing.assert_array_equal(again[0], im_a)
    assert builder.encode_png(again[0], 1) == builder.encode_png(im_a, 1)


# ----------------------------------------------------------------------------------------------------- domains
def test_three_domains_one_per_identity(recs, people):
    domains = collections.defaultdict(set)
    for s in ("train", "test"):
        for r in recs[s]:
            domains[int(r["pid"])].add(_text(r, "domain"))
    assert all(len(d) == 1 for d in domains.values())
    assert all(domains[p] == {people[p].domain} for p in domains)
    for s in ("train", "test"):  # both sides of the split see every domain
        assert {_text(r, "domain") for r in recs[s]} == set(SMALL.domains)
    assert len(SMALL.domains) >= 3


def _image_stats(image: np.ndarray) -> np.ndarray:
    """[brightness, colourfulness (max - min channel), high-frequency energy (mean abs neighbour difference)]."""
    x = image.astype(np.float32)
    hf = np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()
    return np.array([x.mean(), (x.max(-1) - x.min(-1)).mean(), hf])


def test_domains_look_different(recs):
    stats = collections.defaultdict(list)
    for r in recs["train"] + recs["test"]:
        stats[_text(r, "domain")].append(_image_stats(r["image"]))
    stats = {d: np.stack(v) for d, v in stats.items()}
    names = sorted(stats)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            # Some statistic separates the two domains by over two pooled standard deviations (not just a shift
            # in the mean that noise could make): a classifier on that one number would tell them apart.
            pooled = np.sqrt((stats[a].var(0) + stats[b].var(0)) / 2)
            effect = np.abs(stats[a].mean(0) - stats[b].mean(0)) / pooled
            assert effect.max() > 2.0, (a, b, effect)


# -------------------------------------------------------------------------------------------------- part boxes
def test_part_boxes_ordered_and_inside(recs):
    for r in recs["train"] + recs["test"]:
        b = r["part_boxes"]
        assert b.shape == (3, 4) and b.dtype == np.float32
        assert (b >= 0).all() and (b <= 1).all()
        assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
        head, upper, legs = b
        assert head[1] < upper[1] < legs[1] and head[3] < upper[3] < legs[3]  # top to bottom
        centre_y = (b[:, 1] + b[:, 3]) / 2
        assert centre_y[0] < centre_y[1] < centre_y[2]


def _centre_votes(image: np.ndarray, box: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Per-colour vote counts of the central part of a box (away from arms and edges): nearest palette colour."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box * [w, h, w, h]
    dx, dy = (x1 - x0) / 4, (y1 - y0) / 7
    px = image[int(y0 + dy):int(np.ceil(y1 - dy)), int(x0 + dx):int(np.ceil(x1 - dx))].reshape(-1, 1, 3)
    nearest = np.argmin(((px.astype(np.float32) - palette[None]) ** 2).sum(-1), 1)
    return np.bincount(nearest, minlength=len(palette))


def test_upper_box_is_dominated_by_the_upper_garment_colour(recs, people):
    names = list(attributes.COLOURS)
    hits, totals = collections.Counter(), collections.Counter()
    for r in recs["train"] + recs["test"]:
        who = people[int(r["pid"])]
        if who.pattern != "plain" or who.upper_type == "jacket":  # stripes, checks, open front: two colours
            continue
        palette = render.domain_colour(np.array([attributes.COLOURS[n] for n in names]), who.domain)
        votes = _centre_votes(r["image"], r["part_boxes"][1], palette)
        hits[who.domain] += names[votes.argmax()] == who.upper_colour
        totals[who.domain] += 1
    assert sum(totals.values()) > 50
    assert sum(hits.values()) / sum(totals.values()) > 0.9, (hits, totals)  # chance: about 1 in 10
    assert all(hits[d] / totals[d] > 0.8 for d in totals), (hits, totals)


def test_boxes_follow_offset_and_scale():
    """Boxes come from the pixels drawn: shifting the crop shifts them, rendering larger leaves them alone."""
    shot = builder.plan(SMALL)["train"][3]
    who, view = shot.identity, shot.view
    _, base = render.render(who, view, who.domain, (128, 64))
    _, moved = render.render(who, dataclasses.replace(view, dx=view.dx + 0.1), who.domain, (128, 64))
    np.testing.assert_allclose(moved[:, [0, 2]] - base[:, [0, 2]], 0.1, atol=1.5 / 64)
    np.testing.assert_allclose(moved[:, [1, 3]], base[:, [1, 3]])
    _, taller = render.render(who, dataclasses.replace(view, height=view.height * 0.8), who.domain, (128, 64))
    assert (taller[:, 3] - taller[:, 1] < base[:, 3] - base[:, 1]).all()
    image, big = render.render(who, view, who.domain, (256, 128))
    assert image.shape == (256, 128, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(big, base, atol=1.5 / 64)


# ---------------------------------------------------------------------------------------------------- captions
def test_template_bank():
    assert len(attributes.TEMPLATES) >= 20
    assert len(set(attributes.TEMPLATES)) == len(attributes.TEMPLATES)
    held = attributes.template_split(SMALL.held_out_templates)
    assert len(held["test"]) == SMALL.held_out_templates and not set(held["train"]) & set(held["test"])
    who = attributes.identities(SMALL)
    for t in range(len(attributes.TEMPLATES)):
        for p in who:
            text, slots = attributes.caption(p, t, np.random.default_rng(0))
            assert not set("{}[]") & set(text) and "  " not in text and text.endswith("."), text
            assert {"upper_colour", "upper_type", "lower_colour", "hair_colour"} <= {s for s, _, _ in slots}


def test_captions_describe_the_identity(recs, people):
    for s in ("train", "test"):
        for r in recs[s]:
            who = people[int(r["pid"])]
            caps = [c.decode() for c in r["captions"]]
            assert len(caps) == SMALL.captions_per_image
            for c in caps:
                words = c.replace(",", " ").replace(".", " ").replace(";", " ").split()
                for attr in ("upper_colour", "upper_type", "lower_type", "hair_colour"):
                    assert getattr(who, attr) in words, (attr, c)
                assert ("woman" in words or "Woman" in words) == (who.gender == "woman"), c


def test_caption_sources_respect_held_out_templates(recs):
    held = attributes.template_split(SMALL.held_out_templates)
    allowed = {s: {attributes.template_name(t) for t in held[s]} for s in held}
    used = collections.defaultdict(set)
    for split, key in (("train", "train"), ("test", "test"), ("query", "test"), ("gallery", "test")):
        for r in recs[split]:
            srcs = [c.decode() for c in r["caption_sources"]]
            assert len(srcs) == len(r["captions"]) and len(set(srcs)) == len(srcs)
            assert set(srcs) <= allowed[key], (split, srcs)
            used[key] |= set(srcs)
    assert used["train"] == allowed["train"] and used["test"] == allowed["test"]  # every template in use


def _vocab_tokens(text: str) -> collections.Counter:
    vocab = set().union(*attributes.VOCAB.values())
    return collections.Counter(w for w in text.replace(",", " ").replace(".", " ").replace(";", " ").split()
                               if w in vocab)


def test_caption_noise_replaces_words_with_wrong_ones_at_the_rate():
    rate, replaced, total = 0.3, 0, 0
    for p in attributes.identities(SMALL):
        for t in range(len(attributes.TEMPLATES)):
            clean = attributes.caption(p, t, np.random.default_rng([p.pid, t]), 0.0)
            noisy = attributes.caption(p, t, np.random.default_rng([p.pid, t]), rate)
            assert all(true == said for _, true, said in clean.slots)
            assert [s for s, _, _ in clean.slots] == [s for s, _, _ in noisy.slots]
            expected = _vocab_tokens(clean.text)
            for slot, true, said in noisy.slots:
                assert true == getattr(p, slot)
                if said != true:
                    assert said in attributes.VOCAB[slot]  # a real word of that slot, and wrong for this person
                    replaced += 1
                    expected[true] -= 1
                    expected[said] += 1
            assert +expected == _vocab_tokens(noisy.text), (clean.text, noisy.text)  # the text says what slots say
            total += len(noisy.slots)
    sigma = np.sqrt(rate * (1 - rate) / total)
    assert abs(replaced / total - rate) < 4 * sigma, (replaced, total)


def test_noisy_config_captions(people):
    """small_noisy is small with wrong words in its training captions, about caption_noise of them; the
    evaluation captions stay clean."""
    clean, noisy = builder.plan(SMALL), builder.plan(NOISY)
    assert [s.captions for s in clean["test"]] == [s.captions for s in noisy["test"]]
    changed = total = 0
    for a, b in zip(clean["train"], noisy["train"]):
        assert a.file_name == b.file_name and a.caption_sources == b.caption_sources and a.view == b.view
        for ca, cb in zip(a.captions, b.captions):
            ta, tb = _vocab_tokens(ca), _vocab_tokens(cb)
            assert sum(ta.values()) == sum(tb.values())
            changed += sum((ta - tb).values())
            total += sum(ta.values())
    # a few replacements coincide with another word of the same caption, so the count is a little low
    assert NOISY.caption_noise - 0.06 < changed / total <= NOISY.caption_noise + 0.03, changed / total
    assert SMALL.caption_noise == 0


# ------------------------------------------------------------------------------- the CLIP-pretraining corpus
def test_freeform_captions_say_the_identity_words():
    """Clean free-form captions name only the identity's own words, at least two attribute groups' worth; with
    noise the text says exactly the (possibly wrong) words their slots record."""
    groups = set()
    for p in attributes.identities(SMALL):
        for k in range(20):
            clean = freeform.caption(p, np.random.default_rng([p.pid, k]))
            noisy = freeform.caption(p, np.random.default_rng([p.pid, k]), 0.3)
            assert clean.slots and all(true == said == getattr(p, s) for s, true, said in clean.slots), clean
            assert not set("{}[]") & set(clean.text) and "  " not in clean.text, clean.text
            for c in (clean, noisy):
                assert _vocab_tokens(c.text) == collections.Counter(said for _, _, said in c.slots), c
            unpatterned = [[s for s, _, _ in c.slots if s != "pattern"] for c in (clean, noisy)]
            assert unpatterned[0] == unpatterned[1]  # the same groups (a plain pattern goes unsaid)
            mentioned = {s for s, _, _ in clean.slots}
            groups.add(len({s.split("_")[0] for s in mentioned} - {"pattern", "logo"}))
            words = clean.text.lower().replace(",", " ").replace(".", " ").split()
            assert words.count("woman") + words.count("lady") <= (p.gender == "woman") * 2
    assert min(groups) >= 2 and max(groups) >= 5  # from a couple of attributes to nearly all of them


def test_freeform_frames_are_no_template():
    """A free-form caption never reproduces a template sentence of the same person, held-out ones included."""
    p = attributes.identities(SMALL)[0]
    templated = {attributes.caption(p, t, np.random.default_rng(0)).text for t in range(len(attributes.TEMPLATES))}
    texts = {freeform.caption(p, np.random.default_rng(k)).text for k in range(300)}
    assert len(texts) > 150 and not texts & templated


def test_clip_corpus_plan():
    """clip_corpus: other people than every other config (pids after the offset), training identities only, about
    freeform_fraction free-form captions and the rest from the training templates, never a held-out one."""
    corpus = next(c for c in CONFIGS if c.name == "clip_corpus")
    small_corpus = dataclasses.replace(corpus, name="x", num_identities=60)
    plan = builder.plan(small_corpus)
    assert not (plan["test"] or plan["query"] or plan["gallery"])
    pids = {s.identity.pid for s in plan["train"]}
    assert pids == set(range(corpus.pid_offset + 1, corpus.pid_offset + 61))
    assert {s.identity.domain for s in plan["train"]} == set(corpus.domains)
    sources = collections.Counter(src for s in plan["train"] for src in s.caption_sources)
    held = attributes.template_split(corpus.held_out_templates)
    train_templates = {attributes.template_name(t) for t in held["train"]}
    assert set(sources) - {freeform.SOURCE} <= train_templates
    n = sum(sources.values())
    rate = corpus.freeform_fraction
    assert abs(sources[freeform.SOURCE] / n - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    # the other configs draw no free-form caption, and the same plan as without the corpus fields
    assert freeform.SOURCE not in {src for s in builder.plan(SMALL)["train"] for src in s.caption_sources}
    assert max(p.pid for p in attributes.identities(SMALL)) == SMALL.num_identities


# ------------------------------------------------------------------------------------------ shared attributes
def test_some_identities_share_coarse_attributes():
    who = attributes.identities(SMALL)
    groups = collections.defaultdict(list)
    for p in who:
        groups[p.coarse()].append(p)
    shared = [g for g in groups.values() if len(g) > 1]
    n_shared = sum(len(g) for g in shared)
    assert abs(n_shared / len(who) - SMALL.shared_fraction) < 0.1
    assert any(g[0].split == "test" for g in shared)  # retrieval on test must tell look-alikes apart
    for g in shared:
        assert len({p.domain for p in g}) == 1 and len({p.split for p in g}) == 1
        details = [(p.pattern, p.pattern_colour, p.logo, p.bag_colour, p.bag_side, p.hat_colour, round(p.build, 1))
                   for p in g]
        assert len(set(details)) == len(details)  # but they differ in something visible


def test_configs(recs):
    names = [c.name for c in CONFIGS]
    assert {"small", "small_noisy", "demo", "demo_noisy", "clip_corpus"} <= set(names) and len(set(names)) == len(names)
    assert {r["image"].shape for s in SPLITS for r in recs[s]} == {(*SMALL.image_size, 3)} == {(128, 64, 3)}
    with pytest.raises(ValueError, match="at least 2 cameras"):
        builder.plan(dataclasses.replace(SMALL, name="x", cameras_per_identity=(1, 2)))


def test_demo_plan_is_what_its_description_says():
    """Its config's description: '1500 identities (1200 train, 300 test) x 8 images, 6 cameras, 3 captions each'."""
    demo = next(c for c in CONFIGS if c.name == "demo")
    plan = builder.plan(demo)
    shots = plan["train"] + plan["test"]
    assert [len({s.identity.pid for s in plan[split]}) for split in ("train", "test")] == [1200, 300]
    assert set(collections.Counter(s.identity.pid for s in shots).values()) == {8}
    assert {s.view.camid for s in shots} == set(range(6))
    assert {len(s.captions) for s in shots} == {3}
