"""grain pipelines and transforms on an in-memory source in the builders' record schema."""

import ml_collections
import numpy as np
import pytest

from reid_jax import tokenizer
from reid_jax.data import pipeline, transforms
from reid_jax.data.index import SplitIndex
from tests.numerics import assert_close

H, W = 32, 16


def _record(i: int, pid: int, camid: int, ncap: int) -> dict:
    image = np.full((40, 20, 3), i % 250, np.uint8)  # each record a constant grey, to recognise it
    return {"image": image, "file_name": f"{i}.jpg".encode(), "pid": pid, "camid": camid,
            "captions": [f"person {pid} caption {c}".encode() for c in range(ncap)],
            "caption_sources": [], "domain": f"d{pid % 3}".encode(),
            "part_boxes": np.array([[0.2, 0.0, 0.8, 0.2], [0.1, 0.2, 0.9, 0.6], [0.1, 0.6, 0.9, 1.0]], np.float32)}


@pytest.fixture(scope="module")
def source():
    rng = np.random.default_rng(0)
    recs, i = [], 0
    for pid in range(1, 13):  # 12 identities, 2..6 images, 1..3 captions
        for _ in range(int(rng.integers(2, 7))):
            recs.append(_record(i, pid * 10, int(rng.integers(0, 4)), int(rng.integers(1, 4))))
            i += 1
    return recs


@pytest.fixture(scope="module")
def index(source):
    return SplitIndex.scan(source)


def _cfg(**kw) -> ml_collections.ConfigDict:
    aug = transforms.default_config()
    aug.image_size = (H, W)
    aug.pad = 2
    cfg = ml_collections.ConfigDict({"batch_size": 8, "caption_mode": "random", "context_length": 16,
                                     "num_epochs": None, "num_workers": 0, "aug": aug,
                                     "pk": {"identities": 4, "instances": 2}})
    cfg.update(kw)
    return cfg


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_pairs_batch_shapes_dtypes_and_content(source, index):
    host = _cfg()
    host.aug.on_device = False  # normalised and erased on the host: float32 images, no rectangles
    (host_batch,) = _take(pipeline.pairs_train(source, index, host, seed=0), 1)
    assert host_batch["image"].shape == (8, H, W, 3) and host_batch["image"].dtype == np.float32
    assert "erase" not in host_batch
    batch = _take(pipeline.pairs_train(source, index, _cfg(), seed=0), 1)[0]
    assert batch["image"].shape == (8, H, W, 3) and batch["image"].dtype == np.uint8  # the default: on the device
    assert batch["erase"].shape == (8, 4) and batch["erase"].dtype == np.int32
    assert batch["text"].shape == (8, 16) and batch["text"].dtype == np.int32
    assert batch["part_boxes"].shape == (8, 3, 4)
    for j, rec_id in enumerate(batch["image_index"]):
        rec = source[rec_id]
        # The caption is one of the record's own captions, tokenised exactly.
        options = [tokenizer.tokenize(c.decode(), 16)[0] for c in rec["captions"]]
        assert any((batch["text"][j] == o).all() for o in options)
        # Labels are contiguous and consistent with the pids.
        assert batch["pid"][j] == sorted({r["pid"] for r in source}).index(rec["pid"])


def test_all_captions_mode_visits_every_caption_once_per_epoch(source, index):
    n = int(index.num_captions.sum())
    cfg = _cfg(caption_mode="all", batch_size=n, num_epochs=1)
    cfg.aug.erase_prob = 0.0
    (batch,) = _take(pipeline.pairs_train(source, index, cfg, seed=1), 1)
    assert sorted(batch["index"]) == list(range(n))
    got = sorted(tokenizer.tokenize([], 16).tolist() + batch["text"].tolist())
    want = sorted(tokenizer.tokenize([c.decode() for r in source for c in r["captions"]], 16).tolist())
    assert got == want


def test_image_words_are_every_word_of_the_images_captions(source, index):
    """config.data.image_words = W: each pair also carries the distinct word tokens of all its image's captions,
    the reference being the tokeniser's ids of each caption gathered in a Python set."""
    (batch,) = _take(pipeline.pairs_train(source, index, _cfg(caption_mode="all", image_words=12), seed=2), 1)
    assert batch["image_words"].shape == (8, 12) and batch["image_words"].dtype == np.int32
    for row, rec_id in zip(batch["image_words"], batch["image_index"]):
        want = {t for c in source[rec_id]["captions"] for t in tokenizer.tokenize(c.decode(), 16)[0].tolist()}
        want -= {tokenizer.PAD_ID, tokenizer.SOT_ID, tokenizer.EOT_ID}
        assert sorted(row[row > 0].tolist()) == sorted(want) and (row[len(want):] == 0).all()
    assert "image_words" not in _take(pipeline.pairs_train(source, index, _cfg(), seed=2), 1)[0]
    with pytest.raises(ValueError, match=r"config.data.image_words = 3 is too small"):
        _take(pipeline.pairs_train(source, index, _cfg(image_words=3), seed=2), 1)


def test_swapped_text_replaces_swap_words_by_others(source, index):
    """config.data.swap_prob / swap_words: each pair also carries its caption with swap words replaced by other
    ones; with two words and rate 1 that is the caption with the two exchanged, tokenised (the reference: string
    replacement). Images and captions are those of the same stream without swapping."""
    cfg = _cfg(caption_mode="all", swap_prob=1.0, swap_words=("person", "caption"))
    (batch,) = _take(pipeline.pairs_train(source, index, cfg, seed=3), 1)
    (plain,) = _take(pipeline.pairs_train(source, index, _cfg(caption_mode="all"), seed=3), 1)
    np.testing.assert_array_equal(batch["text"], plain["text"])
    np.testing.assert_array_equal(batch["image"], plain["image"])
    for text, rec_id, row in zip(batch["text"], batch["image_index"], batch["swapped_text"]):
        caption = next(c.decode() for c in source[rec_id]["captions"]
                       if (tokenizer.tokenize(c.decode(), 16)[0] == text).all())
        exchanged = caption.replace("person", "@").replace("caption", "person").replace("@", "caption")
        np.testing.assert_array_equal(row, tokenizer.tokenize(exchanged, 16)[0])
    assert "swapped_text" not in plain
    with pytest.raises(ValueError, match=r"config.data.swap_words: \['t-shirt'\] are not single tokens"):
        pipeline.pairs_train(source, index, _cfg(swap_prob=0.5, swap_words=("red", "t-shirt")), seed=3)


def test_swap_words_picks_another_word_at_its_rate():
    """pipeline.swap_words against a loop: a swap word under the rate becomes the word `1 + pick` places on in its
    group (one group: the whole list), and over many draws every other word of the group about equally often."""
    rng = np.random.default_rng(0)
    one = pipeline.Swaps(np.array([7, 3, 9, 4]), np.zeros(4, int), np.full(4, 4))
    groups = pipeline.Swaps(np.array([7, 3, 9, 4, 5]), np.array([0, 0, 0, 3, 3]), np.array([3, 3, 3, 2, 2]))
    for swaps, picks in ((one, 3), (groups, 2)):
        assert swaps.picks == picks
        members = [swaps.ids[s:s + n].tolist() for s, n in zip(swaps.start, swaps.size)]
        ids = rng.choice([1, 2, *swaps.ids.tolist()], size=(6, 10))
        chance, pick = rng.random((6, 10)), rng.integers(swaps.picks, size=(6, 10))
        got = pipeline.swap_words(ids, swaps, chance, pick, 0.5)
        want = ids.copy()
        for b, l in np.ndindex(ids.shape):
            if ids[b, l] in swaps.ids.tolist() and chance[b, l] < 0.5:
                group = members[swaps.ids.tolist().index(ids[b, l])]
                want[b, l] = group[(group.index(ids[b, l]) + 1 + pick[b, l] % (len(group) - 1)) % len(group)]
        np.testing.assert_array_equal(got, want)
        changed = got != ids
        assert changed.any() and (~changed & np.isin(ids, swaps.ids) & (chance < 0.5)).sum() == 0
    # every other word of a group is drawn: 7 (group 7, 3, 9) becomes 3 and 9 about equally, never 4 or 5
    many = pipeline.swap_words(np.full((1, 6000), 7), groups, np.zeros((1, 6000)),
                               rng.integers(groups.picks, size=(1, 6000)), 0.5)
    assert set(np.unique(many).tolist()) == {3, 9} and abs((many == 3).mean() - 0.5) < 0.03


def test_swap_table_groups_words_and_names_bad_ones():
    """config.data.swap_words: a tuple of words is one group; a tuple of tuples, one group each; the table's ids are
    the tokeniser's, and a group of one word, a word in two groups or a mixed tuple is refused by name."""
    table = pipeline.swap_table((("red", "blue", "green"), ("jacket", "coat")))
    want = [tokenizer.encode([w])[0][0] for w in ("red", "blue", "green", "jacket", "coat")]
    assert table.ids.tolist() == want and table.start.tolist() == [0, 0, 0, 3, 3]
    assert table.size.tolist() == [3, 3, 3, 2, 2] and table.picks == 2
    assert pipeline.swap_table(("red", "blue", "green")).size.tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match=r"at least two words .* in each group, got \[\['red', 'blue'\], \['coat'\]\]"):
        pipeline.swap_table((("red", "blue"), ("coat",)))
    with pytest.raises(ValueError, match=r"config.data.swap_words: \['red'\] are in more than one group"):
        pipeline.swap_table((("red", "blue"), ("red", "coat")))
    with pytest.raises(ValueError, match=r"config.data.swap_words must be a tuple of words, or a tuple of groups"):
        pipeline.swap_table(("red", ("blue", "coat")))


def test_pk_batches_have_p_identities_with_k_images(source, index):
    for batch in _take(pipeline.pk_train(source, index, _cfg(), seed=0), 5):
        labels, counts = np.unique(batch["pid"], return_counts=True)
        assert len(labels) == 4 and (counts == 2).all()
        # identities come in contiguous groups of K (so a host slice holds whole identities)
        assert (batch["pid"].reshape(4, 2) == batch["pid"].reshape(4, 2)[:, :1]).all()
        for rec_id, label in zip(batch["image_index"], batch["pid"]):
            assert sorted({r["pid"] for r in source}).index(source[rec_id]["pid"]) == label


def test_identity_walk_visits_every_image_once_per_epoch(source, index):
    """The 'walk' sampler (CLIP-ReID's): per epoch each record at most once, identities with fewer than K images
    drawn up to K, P distinct identities of K records per batch; the walk ends when fewer than P identities hold
    a whole chunk of K, so the records left out are fewer than P chunks' worth plus each identity's remainder."""
    cfg = _cfg(pk={"identities": 4, "instances": 2, "sampler": "walk"}, num_epochs=1)
    batches = list(pipeline.pk_train(source, index, cfg, seed=0))
    ids = np.concatenate([b["image_index"] for b in batches])
    pids = np.array([r["pid"] for r in source])
    for b in batches:
        labels, counts = np.unique(b["pid"], return_counts=True)
        assert len(labels) == 4 and (counts == 2).all()
    uniq, seen = np.unique(ids, return_counts=True)
    small = {p for p in np.unique(pids) if (pids == p).sum() < 2}
    assert all(c == 1 or pids[u] in small for u, c in zip(uniq, seen))  # only topped-up identities repeat
    sizes = {p: int((pids == p).sum()) for p in np.unique(pids)}
    left_out = sum(n % 2 for n in sizes.values())  # each identity's last incomplete chunk
    assert len(source) - left_out - len(ids) < 4 * 2  # plus fewer than P chunks when the walk stops
    # the next epoch is another walk, and the stream resumes exactly mid-walk
    endless = pipeline.pk_train(source, index, _cfg(pk=cfg.pk.to_dict()), seed=0)
    it = iter(endless)
    first = [next(it)["image_index"] for _ in range(len(batches) + 2)]
    np.testing.assert_array_equal(np.concatenate(first[: len(batches)]), ids)
    state = it.get_state()
    expected = next(it)["image_index"]
    resumed = iter(endless)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image_index"], expected)


def test_pk_requires_enough_identities(source, index):
    with pytest.raises(ValueError, match="only 12 identities"):
        pipeline.pk_train(source, index, _cfg(pk={"identities": 20, "instances": 2}), seed=0)


def test_pk_batches_with_one_of_each_images_captions(source, index):
    """captions=True (CLIP-SCGI): each image comes with one of its own captions, tokenised; a set without
    captions says how to add them."""
    seen = set()
    for batch in _take(pipeline.pk_train(source, index, _cfg(), seed=0, captions=True), 20):
        assert batch["text"].shape == (8, 16) and batch["text"].dtype == np.int32
        for rec_id, ids in zip(batch["image_index"], batch["text"]):
            own = [tokenizer.tokenize([c.decode()], 16)[0] for c in source[rec_id]["captions"]]
            hit = [i for i, o in enumerate(own) if np.array_equal(o, ids)]
            assert hit, (rec_id, ids)
            seen.add((int(rec_id), hit[0]))
    assert len({c for _, c in seen}) > 1  # captions are drawn, not always the first
    assert "text" not in _take(pipeline.pk_train(source, index, _cfg(), seed=0), 1)[0]
    bare = [dict(r, captions=[]) for r in source]
    with pytest.raises(ValueError, match="have no caption.*--captions="):
        pipeline.pk_train(bare, SplitIndex.scan(bare), _cfg(), seed=0, captions=True)


def test_hosts_split_the_global_batch(source, index):
    whole = _take(pipeline.pairs_train(source, index, _cfg(), seed=3), 2)
    parts = [_take(pipeline.pairs_train(source, index, _cfg(), seed=3, shard=pipeline.Shard(h, 2)), 2)
             for h in range(2)]
    for step in range(2):
        for key in ("image", "text", "index"):
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), whole[step][key])


def test_resume_mid_epoch_gives_the_same_next_batch(source, index):
    for make in (pipeline.pairs_train, pipeline.pk_train):
        ds = make(source, index, _cfg(), seed=5)
        it = iter(ds)
        for _ in range(3):
            next(it)
        state = it.get_state()
        expected = next(it)
        resumed = iter(ds)
        resumed.set_state(state)
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_worker_processes_give_the_same_stream(source, index):
    serial = _take(pipeline.pairs_train(source, index, _cfg(), seed=7), 3)
    parallel = _take(pipeline.pairs_train(source, index, _cfg(num_workers=2), seed=7), 3)
    for a, b in zip(serial, parallel):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_eval_batches_are_ordered_padded_and_sharded(source, index):
    n = len(source)
    batches = list(pipeline.eval_images(source, _cfg(), batch_size=8))
    valid = np.concatenate([b["valid"] for b in batches])
    ids = np.concatenate([b["image_index"] for b in batches])
    assert valid.sum() == n and not valid[n:].any() and len(valid) % 8 == 0
    np.testing.assert_array_equal(ids[:n], np.arange(n))
    # Two hosts: union of their valid rows is every record exactly once.
    shards = [list(pipeline.eval_images(source, _cfg(), batch_size=4, shard=pipeline.Shard(h, 2))) for h in range(2)]
    assert len(shards[0]) == len(shards[1])
    seen = np.concatenate([b["image_index"][b["valid"]] for s in shards for b in s])
    assert sorted(seen) == list(range(n))
    caps = list(pipeline.eval_captions(source, index, _cfg(), batch_size=8))
    assert sum(b["valid"].sum() for b in caps) == index.num_captions.sum()
    first = caps[0]
    np.testing.assert_array_equal(first["text"][0], tokenizer.tokenize(source[0]["captions"][0].decode(), 16)[0])
    assert first["pid"][0] == source[0]["pid"]


# ------------------------------------------------------------------------------------------------- transforms
def test_flip_and_crop_move_boxes_with_the_pixels():
    rng = np.random.default_rng(0)
    image = np.zeros((40, 20, 3), np.uint8)
    image[4:12, 2:8] = 255  # a white block exactly covering box 0
    boxes = np.array([[2 / 20, 4 / 40, 8 / 20, 12 / 40], [-1, -1, -1, -1], [0.1, 0.5, 0.9, 1.0]], np.float32)
    for _ in range(20):
        out, b = image, boxes
        if rng.random() < 0.5:
            out, b = transforms.hflip(out, b)
        out, b = transforms.pad_crop(out, b, 4, rng)
        x0, y0, x1, y1 = np.round(b[0] * [20, 40, 20, 40]).astype(int)
        assert (out[y0:y1, x0:x1] == 255).all()  # the box still covers the block...
        assert (out == 255).all(-1).sum() == (y1 - y0) * (x1 - x0)  # ...and only it
        assert (b[1] == -1).all()  # absent stays absent


def test_pad_crop_equals_padding_the_whole_image_then_cropping():
    """pad_crop copies only the window's part inside the image (into a given buffer too): the pixels of np.pad +
    crop, for mirrored views as well; the same draws from the generator."""
    image = np.random.default_rng(1).integers(0, 256, (30, 14, 3)).astype(np.uint8)
    boxes = np.zeros((1, 4), np.float32)
    for seed in range(40):
        src = image[:, ::-1] if seed % 2 else image
        rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        out = np.full(image.shape, 7, np.uint8) if seed % 3 else None  # a reused batch row holds old pixels
        got, _ = transforms.pad_crop(src, boxes, 5, rng, out=out)
        top, left = ref_rng.integers(0, 11, size=2)
        np.testing.assert_array_equal(got, np.pad(src, ((5, 5), (5, 5), (0, 0)))[top: top + 30, left: left + 14])
        assert rng.random() == ref_rng.random()  # the generator is left where it was
    out = np.zeros_like(image)
    got, _ = transforms.pad_crop(image[:, ::-1], boxes, 0, np.random.default_rng(0), out=out)
    assert got is out and np.array_equal(out, image[:, ::-1])


def test_normalize_and_erasing():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 16, 3)).astype(np.uint8)
    mean, std = (np.array(v) for v in transforms.MEANS_STDS["clip"])
    assert_close(transforms.normalize(image, "clip"), (image / 255.0 - mean) / std, 1e-6, "normalised image")
    cfg = transforms.default_config()
    x = transforms.normalize(image, "clip")
    for _ in range(50):
        out = transforms.random_erase(x, rng, (0.02, 0.4), (0.3, 3.3),
                                      lambda shape, r: transforms.erase_value(cfg, shape, r))
        erased = (out != x).any(-1)
        frac = erased.mean()
        assert 0.0 < frac <= 0.45  # one rectangle of 2-40% of the area (rounding aside)
        assert_close(out[erased], np.broadcast_to(mean, out[erased].shape), 1e-6, "erased pixels")
        rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
        assert erased[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1].all()  # a rectangle


# ------------------------------------------------------------------------------------------ on a built TFDS set
@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    from reid_jax.data import build

    data_dir = tmp_path_factory.mktemp("tfds")
    build.build("synthetic_pedestrians", data_dir, config="small")
    return data_dir


def test_pipelines_on_a_built_tfds_dataset(synthetic_dir):
    from reid_jax import data
    from reid_jax.data import index as index_lib

    args = ("synthetic_pedestrians", "train", synthetic_dir, "small")
    source = data.load_source(*args)
    index = index_lib.split_index(*args)
    assert (synthetic_dir / "synthetic_pedestrians" / "small").exists()
    assert list((synthetic_dir).rglob("reid_jax_index-train.npz"))  # cached beside the dataset
    assert index_lib.split_index(*args).pids.tolist() == index.pids.tolist()
    assert len(index) == len(source) and index.num_captions.min() >= 1
    # Worker processes read the array_record source themselves.
    batch = _take(pipeline.pairs_train(source, index, _cfg(num_workers=1), seed=0), 1)[0]
    rec = source[int(batch["image_index"][0])]
    assert any((batch["text"][0] == tokenizer.tokenize(c.decode(), 16)[0]).all() for c in rec["captions"])
    pk = _take(pipeline.pk_train(source, index, _cfg(), seed=0), 1)[0]
    assert len(np.unique(pk["pid"])) == 4
    test_index = index_lib.split_index("synthetic_pedestrians", "test", synthetic_dir, "small")
    captions = data.load_source("synthetic_pedestrians", "test", synthetic_dir, "small", decode_image=False)
    assert isinstance(captions[0]["image"], bytes)  # left encoded: caption reads stay cheap
    total = sum(int(b["valid"].sum()) for b in pipeline.eval_captions(captions, test_index, _cfg(), batch_size=32))
    assert total == test_index.num_captions.sum()


def test_encoded_images_give_the_batches_of_decoded_ones(synthetic_dir):
    """The training tasks read sources with decode_image=False and PIL decodes the stored bytes itself: the same
    pixels, boxes, rectangles and captions as from TFDS's decoded arrays, on every stream and on both paths."""
    from reid_jax import data
    from reid_jax.data import index as index_lib

    args = ("synthetic_pedestrians", "train", synthetic_dir, "small")
    decoded, encoded = (data.load_source(*args, decode_image=d) for d in (True, False))
    index = index_lib.split_index(*args)
    for on_device in (True, False):
        cfg = _cfg()
        cfg.aug.on_device = on_device
        for stream in (pipeline.pairs_train, pipeline.pk_train):
            want, got = (_take(stream(s, index, cfg, seed=3), 2) for s in (decoded, encoded))
            for w, g in zip(want, got):
                assert w.keys() == g.keys()
                for key in w:
                    np.testing.assert_array_equal(g[key], w[key], err_msg=f"{stream.__name__} {key}")
        want, got = (next(iter(pipeline.eval_images(s, cfg, batch_size=8))) for s in (decoded, encoded))
        np.testing.assert_array_equal(got["image"], want["image"])


def test_encoded_non_rgb_images_get_the_rebuild_hint():
    import io

    from PIL import Image

    from reid_jax.errors import UserError

    cfg = transforms.default_config()
    cfg.image_size = (16, 8)
    for mode in ("RGBA", "L", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (8, 16)).save(buf, format="TIFF" if mode == "CMYK" else "PNG")
        with pytest.raises(UserError, match=f"image of mode {mode}.*rebuild it with .*--force"):
            transforms.train_transform_uint8(buf.getvalue(), np.full((3, 4), -1, np.float32), cfg,
                                             np.random.default_rng(0))


def test_load_source_says_how_to_build(tmp_path):
    from reid_jax import data

    with pytest.raises(FileNotFoundError, match="python -m reid_jax.data.build synthetic_pedestrians"):
        data.load_source("synthetic_pedestrians", "train", tmp_path, "small")
