"""Subset / concatenated source views, their indexes, and multi-source / domain-restricted training sets."""

import ml_collections
import numpy as np
import pytest

from reid_jax.data import pipeline, sources, transforms
from reid_jax.data.index import SplitIndex

H, W = 32, 16


def _record(tag: str, i: int, pid: int, camid: int, domain: str, ncap: int = 1) -> dict:
    return {"image": np.full((40, 20, 3), i % 250, np.uint8), "file_name": f"{tag}/{i}.jpg".encode(), "pid": pid,
            "camid": camid, "captions": [f"{tag} {i} caption {c}".encode() for c in range(ncap)],
            "caption_sources": [], "domain": domain.encode(), "part_boxes": np.zeros((3, 4), np.float32)}


class Batched(list):
    """A list that also reads in batches, recording each batched call (to check forwarding)."""

    def __init__(self, items):
        super().__init__(items)
        self.calls = []

    def __getitems__(self, ids):
        self.calls.append(list(ids))
        return [self[i] for i in ids]


@pytest.fixture
def three():
    """Three tiny sources: A (pids 0..3, cams 0..2), B (pids 5..7, no cameras), C (pids 1..2, cams 0..1)."""
    a = Batched([_record("a", i, i % 4, i % 3, "sun" if i % 2 else "rain", 1 + i % 2) for i in range(8)])
    b = [_record("b", i, 5 + i % 3, -1, "web") for i in range(5)]
    c = Batched([_record("c", i, 1 + i % 2, i % 2, "snow") for i in range(4)])
    return [a, b, c]


def _names(recs):
    return [r["file_name"].decode() for r in recs]


def _same_index(x: SplitIndex, y: SplitIndex):
    assert x.pids.tolist() == y.pids.tolist()
    assert x.camids.tolist() == y.camids.tolist()
    assert x.num_captions.tolist() == y.num_captions.tolist()
    assert x.domains.tolist() == y.domains.tolist()


# ------------------------------------------------------------------------------------------------ in memory
def test_subset_source_order_getitems_and_index(three):
    a = three[0]
    records = np.array([6, 1, 1, 3])
    view = sources.SubsetSource(a, records)
    assert len(view) == 4
    assert _names(view) == ["a/6.jpg", "a/1.jpg", "a/1.jpg", "a/3.jpg"]
    assert view[-1]["file_name"] == b"a/3.jpg" and view[np.int64(0)]["file_name"] == b"a/6.jpg"
    assert _names(view.__getitems__([3, 0, 2])) == ["a/3.jpg", "a/6.jpg", "a/1.jpg"]
    assert a.calls[-1] == [3, 6, 1]  # forwarded to the base's batched read, with base ids
    with pytest.raises(IndexError):
        view[4]
    _same_index(sources.subset_index(SplitIndex.scan(a), records), SplitIndex.scan(view))
    # A base without __getitems__ is read record by record.
    plain = sources.SubsetSource(three[1], [4, 0])
    assert _names(plain.__getitems__([1, 0])) == ["b/0.jpg", "b/4.jpg"]
    with pytest.raises(ValueError, match="outside 0..4"):
        sources.SubsetSource(three[1], [5])


def test_concat_source_offsets_labels_and_order(three):
    indexes = [SplitIndex.scan(s) for s in three]
    view = sources.ConcatSource(three, indexes)
    assert len(view) == 17
    assert view.offsets_pid.tolist() == [0, 4, 12]  # A: max pid 3 -> 4; B: max pid 7 -> 8
    assert view.offsets_cam.tolist() == [0, 3, 3]  # B has no cameras: adds nothing
    assert _names(view) == _names(three[0]) + _names(three[1]) + _names(three[2])
    assert view[8]["pid"] == 5 + 4 and view[8]["camid"] == -1 and view[8]["domain"] == b"web"
    assert view[13]["pid"] == 1 + 12 and view[14]["camid"] == 1 + 3 and view[13]["domain"] == b"snow"
    assert view[-1]["file_name"] == b"c/3.jpg"
    # Batched reads keep the requested order and read each batched source once.
    ids = [15, 2, 9, 13, 0, 9]
    assert _names(view.__getitems__(ids)) == [_names(view)[i] for i in ids]
    assert three[0].calls[-1] == [2, 0] and three[2].calls[-1] == [2, 0]
    got = [(r["pid"], r["camid"]) for r in view.__getitems__(ids)]
    assert got == [(view[i]["pid"], view[i]["camid"]) for i in ids]
    # The bases are untouched.
    assert three[1][0]["pid"] == 5 and three[2][0]["domain"] == b"snow"
    # Distinct pids across sources.
    pid_sets = [{int(view[i]["pid"]) for i in range(view.starts[k], view.starts[k + 1])} for k in range(3)]
    assert not (pid_sets[0] & pid_sets[1] or pid_sets[0] & pid_sets[2] or pid_sets[1] & pid_sets[2])
    _same_index(sources.concat_index(indexes), SplitIndex.scan(view))

    labelled = sources.ConcatSource(three, indexes, labels=["market", "msmt", "cuhk"])
    assert [r["domain"] for r in labelled.__getitems__([0, 8, 16])] == [b"market", b"msmt", b"cuhk"]
    scanned = SplitIndex.scan(labelled)
    _same_index(sources.concat_index(indexes, ["market", "msmt", "cuhk"]), scanned)
    assert scanned.domains.tolist() == ["market"] * 8 + ["msmt"] * 5 + ["cuhk"] * 4


def test_concat_of_subsets_matches_its_index(three):
    a, _, c = three
    ia, ic = SplitIndex.scan(a), SplitIndex.scan(c)
    keep_a, keep_c = ia.subset(["sun"]), ic.subset(None)
    subs = [sources.SubsetSource(a, keep_a), sources.SubsetSource(c, keep_c)]
    idx = [sources.subset_index(ia, keep_a), sources.subset_index(ic, keep_c)]
    view = sources.ConcatSource(subs, idx, ["a", "c"])
    assert len(view) == len(keep_a) + len(keep_c)
    _same_index(sources.concat_index(idx, ["a", "c"]), SplitIndex.scan(view))
    assert _names(view.__getitems__([len(keep_a), 0])) == ["c/0.jpg", f"a/{keep_a[0]}.jpg"]


def test_concat_errors(three):
    indexes = [SplitIndex.scan(s) for s in three]
    with pytest.raises(ValueError, match="2 indexes for 3 sources"):
        sources.ConcatSource(three, indexes[:2])
    with pytest.raises(ValueError, match="2 labels"):
        sources.ConcatSource(three, indexes, ["x", "y"])
    with pytest.raises(ValueError, match="source 1 has 5 records but its index 8"):
        sources.ConcatSource(three, [indexes[0], indexes[0], indexes[2]])
    with pytest.raises(ValueError, match="no indexes"):
        sources.concat_index([])


# ------------------------------------------------------------------------------------------ built TFDS set
def _spec(split="train", domains=None, label="synthetic", **kw):
    spec = {"name": "synthetic_pedestrians", "split": split, "config": "small", "label": label, **kw}
    return spec if domains is None else {**spec, "domains": list(domains)}


def _cfg() -> ml_collections.ConfigDict:
    aug = transforms.default_config()
    aug.image_size = (H, W)
    aug.pad = 2
    return ml_collections.ConfigDict({"batch_size": 8, "caption_mode": "random", "context_length": 16,
                                      "num_epochs": None, "num_workers": 0, "aug": aug,
                                      "pk": {"identities": 4, "instances": 2}})


def test_training_set_single_spec(data_dir):
    from reid_jax.data import specs

    full_source, full_index = specs.dataset_source(ml_collections.ConfigDict(_spec()), data_dir, False)
    source, index = specs.training_set(ml_collections.ConfigDict(_spec()), data_dir, False)
    assert type(source) is type(full_source)  # unrestricted: the split's own source and index, unchanged
    _same_index(index, full_index)

    source, index = specs.training_set(_spec(domains=["daylight", "night"]), data_dir, False,
                                        decode_image=False)
    assert isinstance(source, sources.SubsetSource)
    assert 0 < len(source) == len(index) < len(full_index)
    assert set(index.domains.tolist()) == {"daylight", "night"}
    assert len(index) == int(np.isin(full_index.domains, ["daylight", "night"]).sum())
    scanned = SplitIndex.scan(source)
    _same_index(scanned, index)  # every record's domain is daylight or night, in the index's order

    with pytest.raises(ValueError, match=r"dusk.*daylight.*night.*overcast"):
        specs.training_set(_spec(domains=["night", "dusk"]), data_dir, False)


def test_training_set_two_specs_and_pipelines(data_dir):
    from reid_jax.data import specs

    two = [_spec(domains=["daylight"]), _spec(domains=["night"])]
    source, index = specs.training_set(two, data_dir, False)
    assert isinstance(source, sources.ConcatSource) and len(source) == len(index)
    first = source.starts[1]
    assert set(index.domains[:first].tolist()) == {"synthetic#0"} and set(index.domains[first:]) == {"synthetic#1"}
    assert not set(index.pids[:first].tolist()) & set(index.pids[first:].tolist())
    recs = source.__getitems__([len(source) - 1, 0])
    assert recs[0]["pid"] == index.pids[-1] and recs[1]["pid"] == index.pids[0]
    assert recs[0]["domain"] == b"synthetic#1" and recs[0]["image"].shape[-1] == 3

    # train + test splits with distinct labels: distinct identities, the labels as domains.
    source2, index2 = specs.training_set([_spec(), _spec("test", label="held")], data_dir, False)
    n_train = int(source2.starts[1])
    assert set(index2.domains.tolist()) == {"synthetic", "held"}
    assert index2.pids[n_train:].min() > index2.pids[:n_train].max()

    # The grain pipelines run on the concatenated source.
    pk = next(iter(pipeline.pk_train(source, index, _cfg(), seed=0)))
    labels = pipeline._train_labels(index, np.arange(len(index)))
    n_ids = len(np.unique(index.pids))
    assert pk["image"].shape == (8, H, W, 3) and len(np.unique(pk["pid"])) == 4
    assert ((pk["pid"] >= 0) & (pk["pid"] < n_ids)).all()
    assert (pk["pid"] == labels[pk["image_index"]]).all()
    assert (pk["camid"] == index.camids[pk["image_index"]]).all()
    batches = list(pipeline.eval_images(source, _cfg(), batch_size=32))
    valid = np.concatenate([b["valid"] for b in batches])
    pids = np.concatenate([b["pid"] for b in batches])[valid]
    assert valid.sum() == len(index) and (pids == index.pids).all()
    assert pids.min() >= 0 and pids.max() <= index.pids.max()


def test_evaluation_set_domains(data_dir):
    from reid_jax.data import specs

    spec = _spec(domains=("overcast",))
    for split in ("query", "gallery"):
        source, index = specs.evaluation_set(spec, split, data_dir, False, decode_image=False)
        full = specs.dataset_source(ml_collections.ConfigDict(_spec(split)), data_dir, False)[1]
        assert 0 < len(source) == len(index) == int((full.domains == "overcast").sum())
        _same_index(SplitIndex.scan(source), index)
    source, index = specs.evaluation_set(_spec(), "query", data_dir, False)
    assert not isinstance(source, sources.SubsetSource) and len(source) == len(index)
