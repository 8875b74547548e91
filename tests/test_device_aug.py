"""uint8 images normalised and erased on the device (`config.data.aug.on_device`), and resized, flipped and cropped
there too (`resize_on_device`), against the host's float path, which is the reference (tests/test_pipeline.py
checks it against the formulas, tests/test_resample.py the resize against PIL); and the device prefetch's exact
stream positions."""

import functools
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from reid_jax import mesh as mesh_lib
from reid_jax.data import device, pipeline, transforms
from reid_jax.data.index import SplitIndex
from reid_jax.eval.encode import encode_stream
from tests.numerics import assert_close

H, W = 32, 16


@pytest.fixture(scope="module")
def source():
    """24 records of 6 identities, random textures (a wrong flip or crop shows), 3 captions each; images larger
    than H x W (resized on the host), smaller (upsampled on the device when it resizes) and of its size."""
    rng = np.random.default_rng(0)
    boxes = np.array([[0.2, 0.0, 0.8, 0.2], [0.1, 0.2, 0.9, 0.6], [-1, -1, -1, -1]], np.float32)
    sizes = [(40, 20), (20, 10), (H, W), (25, 11)]
    return [{"image": rng.integers(0, 256, (*sizes[i % 4], 3), np.uint8), "file_name": f"{i}.png".encode(),
             "pid": i // 4, "camid": i % 2, "captions": [f"person {i} caption {c}".encode() for c in range(3)],
             "caption_sources": [], "domain": b"d", "part_boxes": boxes} for i in range(24)]


@pytest.fixture(scope="module")
def index(source):
    return SplitIndex.scan(source)


def _cfg(fill: str, on_device: bool = True, resize: bool = True) -> ml_collections.ConfigDict:
    aug = transforms.default_config()
    aug.update({"image_size": (H, W), "pad": 3, "erase_prob": 0.6, "erase_fill": fill, "on_device": on_device,
                "resize_on_device": resize})
    return ml_collections.ConfigDict({"batch_size": 16, "caption_mode": "random", "context_length": 16,
                                      "num_epochs": None, "num_workers": 0, "aug": aug,
                                      "pk": {"identities": 4, "instances": 4}})


def _batches(make, source, index, fill, resize=True, **kw):
    """The first two batches of the stream, uint8 (on the device) and float (host), same seed."""
    out = []
    for on_device in (True, False):
        it = iter(make(source, index, _cfg(fill, on_device, resize), seed=4, **kw))
        out.append([next(it) for _ in range(2)])
    return out


def _geometry(batch):
    """The uint8 images after the resize, flip and crop: the batch's own, or the device's from its tables."""
    if "resample_rows" not in batch:
        return batch["image"]
    return np.asarray(device.resample(batch["image"], batch["resample_rows"], batch["resample_cols"]))


@functools.cache
def _prepare(fill: str):
    aug = _cfg(fill).aug
    return jax.jit(lambda b, key: device.prepare_images(b, aug, jax.random.key(key)))


def _prepared(batch, fill, key=0):
    """`prepare_images` jitted, as the training step runs it."""
    return _prepare(fill)(batch, key)


def _inside(erase: np.ndarray) -> np.ndarray:
    """bool [B, H, W]: the rectangles."""
    mask = np.zeros((len(erase), H, W), bool)
    for row, (top, left, height, width) in zip(mask, erase):
        row[top: top + height, left: left + width] = True
    return mask


STREAMS = [(pipeline.pairs_train, {}), (pipeline.pk_train, {"captions": True}), (pipeline.pk_train, {})]


@pytest.mark.parametrize("fill", ["mean", "zero"])
@pytest.mark.parametrize("stream", range(len(STREAMS)), ids=["pairs", "pk+captions", "pk"])
@pytest.mark.parametrize("resize", [True, False], ids=["resize_on_device", "resize_on_host"])
def test_uint8_then_prepare_equals_the_host_path(source, index, fill, stream, resize):
    make, kw = STREAMS[stream]
    dev, host = _batches(make, source, index, fill, resize, **kw)
    erased = 0
    for d, h in zip(dev, host):
        assert d["image"].dtype == np.uint8 and h["image"].dtype == np.float32
        assert d["erase"].dtype == np.int32 and d["erase"].shape == (16, 4)
        assert ("resample_rows" in d) == resize
        if resize:  # sources smaller than H x W wait at the top-left of their row, zeros around them
            small = [i for i, r in enumerate(d["image_index"]) if source[r]["image"].shape[:2] == (20, 10)]
            assert small and not d["image"][small, 20:].any() and not d["image"][small, :, 10:].any()
        erased += int((d["erase"][:, 2] > 0).sum())
        got = _prepared(d, fill)
        assert set(got) == set(h)  # erase and the tables consumed
        assert got["image"].dtype == jnp.float32
        assert_close(got["image"], h["image"], 1e-6, f"{fill} image", scale=1.0)
        for k in h:
            if k != "image":
                np.testing.assert_array_equal(np.asarray(got[k]), h[k], err_msg=k)
    assert 0 < erased < 32  # both kinds of example were seen


@pytest.mark.parametrize("stream", range(len(STREAMS)), ids=["pairs", "pk+captions", "pk"])
def test_resizing_on_the_device_gives_the_hosts_bytes(source, index, stream):
    """resize_on_device: the device's resize, flip and crop of the sources are the host's uint8 images exactly
    (PIL's integer arithmetic), and every other field is the same."""
    make, kw = STREAMS[stream]
    on, off = ([next(it) for _ in range(2)] for it in
               (iter(make(source, index, _cfg("random", resize=r), seed=5, **kw)) for r in (True, False)))
    for d, h in zip(on, off):
        np.testing.assert_array_equal(_geometry(d), h["image"])
        assert set(d) - set(h) == {"resample_rows", "resample_cols"}
        for k in h:
            if k != "image":
                np.testing.assert_array_equal(d[k], h[k], err_msg=k)


@pytest.mark.parametrize("stream", range(len(STREAMS)), ids=["pairs", "pk+captions", "pk"])
def test_random_fill_same_rectangles_and_stream_noise_from_the_rng(source, index, stream):
    """'random': the host's rectangles (where its float image departs from the plain normalised one) are the
    device's; outside them the images agree, inside the device draws N(0, 1) from the step rng; captions drawn
    after the erasing are the host's too."""
    make, kw = STREAMS[stream]
    dev, host = _batches(make, source, index, "random", **kw)
    noise = []
    for d, h in zip(dev, host):
        inside = _inside(d["erase"])
        plain = np.stack([transforms.normalize(x, "clip") for x in _geometry(d)])
        np.testing.assert_array_equal((h["image"] != plain).any(-1), inside)  # host noise fills exactly these
        got = np.asarray(_prepared(d, "random")["image"])
        assert_close(got[~inside], h["image"][~inside], 1e-6, "outside the rectangles", scale=1.0)
        noise.append(got[inside])
        np.testing.assert_array_equal(got, np.asarray(_prepared(d, "random")["image"]))  # a function of the rng
        assert not np.array_equal(got[inside], np.asarray(_prepared(d, "random", key=1)["image"])[inside])
        for k in h:
            if k != "image":
                np.testing.assert_array_equal(d[k], h[k], err_msg=k)
    noise = np.concatenate(noise).ravel()
    assert noise.size > 2000
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1.0) < 0.1, (noise.mean(), noise.std())


def test_the_float_host_batch_passes_through():
    batch = {"image": jnp.ones((2, H, W, 3), jnp.float32), "pid": jnp.arange(2)}
    assert device.prepare_images(batch, _cfg("mean").aug) is batch
    with pytest.raises(ValueError, match="erase_fill must be one of"):
        bad = _cfg("pink").aug
        device.prepare_images({"image": jnp.zeros((1, H, W, 3), jnp.uint8), "erase": jnp.ones((1, 4), jnp.int32)},
                              bad, jax.random.key(0))


def test_eval_stream_uint8_normalised_on_the_device_equals_eval_transform(source):
    dev, host = (pipeline.eval_images(source, _cfg("mean", on), batch_size=10) for on in (True, False))
    assert dev.aug is not None and host.aug is None
    for d, h in zip(dev, host):
        assert d["image"].dtype == np.uint8 and "erase" not in d
        want = np.stack([transforms.eval_transform(source[i]["image"], _cfg("mean").aug) for i in h["image_index"]])
        np.testing.assert_array_equal(h["image"], want)
        assert_close(device.prepare_images(d, _cfg("mean").aug)["image"], want, 1e-6, "eval image", scale=1.0)
    # encode_stream normalises a uint8 stream before the encoder: the same features as the host path's
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"fsdp": 1}))
    encode = jax.jit(lambda b: b["image"].reshape(b["image"].shape[0], -1) * 2.0)
    feats = [encode_stream(pipeline.eval_images(source, _cfg("mean", on), batch_size=10), "image", encode, mesh)
             for on in (True, False)]
    assert feats[0]["feats"].shape == (len(source), H * W * 3)
    assert_close(feats[0]["feats"], feats[1]["feats"], 1e-6, "encoded", scale=2.0)
    np.testing.assert_array_equal(feats[0]["image_index"], np.arange(len(source)))


# ------------------------------------------------------------------------------------------------- prefetch
class _Counting:
    """An iterator over 0, 1, 2, ... with grain's get_state / set_state; `fail_at` raises there."""

    def __init__(self, fail_at=None):
        self.n, self.fail_at = 0, fail_at

    def __next__(self):
        if self.n == self.fail_at:
            raise KeyError("boom")
        self.n += 1
        return {"x": np.full(2, self.n - 1)}

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "device-prefetch"]


def test_prefetch_hands_each_batch_with_the_state_after_it_and_stops():
    it = _Counting()
    ahead = device.DevicePrefetch(it, lambda b: jax.device_put(b), depth=2)
    got = [next(ahead) for _ in range(5)]
    for i, (batch, state) in enumerate(got):
        np.testing.assert_array_equal(np.asarray(batch["x"]), [i, i])
        assert state == {"n": i + 1}  # what a checkpoint after this batch stores
    assert it.n >= 5  # ...while the reader has run ahead
    resumed = _Counting()
    resumed.set_state(got[2][1])
    assert next(resumed)["x"][0] == 3  # resuming from it gives the next batch trained on
    ahead.close()
    assert not _prefetch_threads()


def test_prefetch_raises_the_readers_error_at_its_batch():
    ahead = device.DevicePrefetch(_Counting(fail_at=3), lambda b: b, depth=2)
    assert [int(next(ahead)[0]["x"][0]) for _ in range(3)] == [0, 1, 2]
    for _ in range(2):  # and again on every later call
        with pytest.raises(KeyError, match="boom"):
            next(ahead)
    ahead.close()
    assert not _prefetch_threads()


class _ImageTask:
    """A task whose step reports the images it was given (and trains a 1 x 1 layer on them)."""

    def __init__(self, config):
        self.config = config

    def init_state(self):
        import optax
        from flax import nnx

        from reid_jax.train import loop

        return loop.TrainState(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), optax.sgd(0.1))

    def train_step(self, ts, batch, rng):
        loss, _ = ts.minimize(lambda p: (jnp.mean(p.model(batch["image"][..., :1])) ** 2, None))
        return {"loss": loss, "image": batch["image"], "rng": jax.random.key_data(rng)}


@pytest.mark.parametrize("fill", ["mean", "random"])
def test_the_fit_step_prepares_uint8_batches(source, index, fill):
    """`loop.jitted_step` (what fit runs) hands the task the host path's images (the 'random' fill: its noise from
    the step rng, which the task still gets unchanged)."""
    from reid_jax.train import loop

    dev, host = _batches(pipeline.pairs_train, source, index, fill)
    config = ml_collections.ConfigDict({"seed": 3, "data": _cfg(fill), "mesh": {"fsdp": 1, "fsdp_min_size": 1}})
    task = _ImageTask(config)
    mesh, graphdef, state, shardings = loop.place_state(config, task)
    step = loop.jitted_step(config, task, graphdef, shardings)
    _, metrics = step(state, mesh_lib.global_batch(dev[1], mesh), 7)
    rng = jax.random.fold_in(jax.random.key(3), 7)
    np.testing.assert_array_equal(metrics["rng"], jax.random.key_data(rng))
    want = host[1]["image"] if fill == "mean" else device.prepare_images(dev[1], config.data.aug, rng)["image"]
    assert_close(metrics["image"], want, 1e-6, "image the task got", scale=1.0)
