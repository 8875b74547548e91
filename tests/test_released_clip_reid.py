"""CLIP-ReID's released files (their stage-2 `model.state_dict()`, tests/torch_clip_reid.py at test widths): the
test-time feature against their eval forward, for the plain model (stride 16) and SIE-OLP (stride 12, camera
embedding), from fp32, fp16 and 'module.'-prefixed files; the input size told by the stored grid; clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from reid_jax.inference import Encoder
from reid_jax.weights import released
from reid_jax.weights.readers import CheckpointError
from reid_jax.weights.released import clip_reid, common
from tests import torch_clip_reid as ref
from tests.numerics import assert_close

FP32 = 1e-4  # the bound; float32 rounding in other kernels measures about 1e-6 of the feature scale


def read(path):
    """The file's state through the dispatcher (numpy float32, 'module.' stripped), which must name this module."""
    module, state = released.read(path)
    assert module is clip_reid, module
    return state


def _images(n: int, seed: int, size=(256, 128)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *size, 3)).astype(np.float32)


def _features(loaded, images, camids=None) -> np.ndarray:
    """Through nnx.jit, as the Encoder runs `image_fn`."""
    cams = None if camids is None else jnp.asarray(camids, jnp.int32)
    return np.asarray(nnx.jit(loaded.image_fn)(loaded.model, jnp.asarray(images), cams))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    model = ref.build(seed=0)
    path = tmp_path_factory.mktemp("clip_reid") / "ViT-B-16_60.pth"
    ref.save(model, path)
    return model, path


@pytest.fixture(scope="module")
def sie_olp(tmp_path_factory):
    model = ref.build(seed=10, stride=12, cameras=4)
    path = tmp_path_factory.mktemp("clip_reid_sie") / "ViT-B-16_60.pth"
    ref.save(model, path)
    return model, path


def test_plain_model_features_match_their_eval_forward(plain):
    model, path = plain
    state = read(path)
    assert clip_reid.matches(state) and state["image_encoder.positional_embedding"].shape == (129, 128)
    loaded = clip_reid.encoder(path, state, None, None, None)
    assert (loaded.kind, loaded.image_size, (loaded.mean, loaded.std)) == ("clip_reid", (256, 128),
                                                                           common.HALF_MEAN_STD)
    assert loaded.text_fn is None
    assert loaded.info.items() >= {"stride": 16, "grid": (16, 8), "num_cameras": 0, "num_classes": 7}.items()
    images = _images(3, 1)
    want = ref.features(model, images)
    assert want.shape == (3, 128 + 48)
    assert_close(_features(loaded, images), want, FP32, "plain CLIP-ReID feature")
    assert_close(_features(loaded, images, [0, 1, 2]), want, FP32, "camera ids ignored without SIE")


def test_sie_olp_features_match_their_eval_forward(sie_olp):
    """210 stored patches resolve to 256x128 at stride 12; cv_embed[camid] * coefficient joins CLS."""
    model, path = sie_olp
    state = read(path)
    loaded = clip_reid.encoder(path, state, None, None, None)
    assert loaded.info.items() >= {"stride": 12, "grid": (21, 10), "num_cameras": 4,
                                   "camera_coefficient": 1.0}.items()
    images, cams = _images(4, 2), np.array([3, 0, 2, 0])
    assert_close(_features(loaded, images, cams), ref.features(model, images, cams), FP32, "SIE-OLP feature")
    # the same images from other cameras give other features: the camera row is used, and per image
    moved = _features(loaded, images, (cams + 1) % 4) - _features(loaded, images, cams)
    assert np.abs(moved).max(axis=1).min() > 1e-3
    with pytest.raises(ValueError, match="camera"):
        _features(loaded, images, None)


def test_sie_coefficient_is_the_callers(sie_olp):
    model, path = sie_olp
    loaded = clip_reid.encoder(path, read(path), (256, 128), 12, 3.0)
    assert loaded.info["camera_coefficient"] == 3.0
    model.sie_coe = 3.0
    try:
        images, cams = _images(2, 3), np.array([1, 2])
        assert_close(_features(loaded, images, cams), ref.features(model, images, cams), FP32, "coefficient 3")
    finally:
        model.sie_coe = 1.0


@pytest.mark.parametrize("dtype,prefix", [(torch.float16, ""), (None, "module."), (torch.float16, "module.")])
def test_fp16_and_prefixed_files_through_the_encoder(sie_olp, tmp_path, dtype, prefix):
    """`Encoder.load` on an fp16 copy gives the fp16-rounded weights' features (float32 compute); on a
    DataParallel 'module.' copy the plain file's."""
    model, _ = sie_olp
    path = tmp_path / "copy.pth"
    ref.save(model, path, dtype=dtype, prefix=prefix)
    enc = Encoder.load(path)
    assert (enc.kind, enc.image_size, (enc.mean, enc.std)) == ("clip_reid", (256, 128), common.HALF_MEAN_STD)
    rounded = ref.load_cast(ref.build(seed=10, stride=12, cameras=4), dtype) if dtype else model
    images, cams = _images(2, 4), np.array([0, 3])
    assert_close(enc.image_features(images, cams), ref.features(rounded, images, cams), FP32,
                 f"{dtype or 'fp32'} {prefix or 'unprefixed'} copy")


def test_encoder_on_both_published_settings(plain, sie_olp):
    for name, (model, path), cams, coefficient in (("plain", plain, None, None),
                                                   ("SIE-OLP", sie_olp, np.array([2, 1]), 1.0)):
        enc = Encoder.load(path, camera_coefficient=coefficient)
        images = _images(2, 6)
        assert_close(enc.image_features(images, cams), ref.features(model, images, cams), FP32,
                     f"{name} through Encoder.load")
    with pytest.raises(ValueError, match="camera"):
        enc.image_features(images)
    with pytest.raises(CheckpointError, match="no camera embedding"):
        Encoder.load(plain[1], camera_coefficient=1.0)


def test_clip_holds_both_towers_as_stored(sie_olp, monkeypatch):
    """`clip` (convert / init_checkpoint): every stored CLIP weight lands in place; the token table and logit
    scale, which CLIP-ReID does not store, are initialised, and a warning says so."""
    _, path = sie_olp
    state = read(path)
    warnings = []
    monkeypatch.setattr(clip_reid.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    c = clip_reid.clip(path, state, None, None, {})
    assert sum("token table" in w for w in warnings) == 1  # (absl.logging is shared: the stride note too)
    assert c.config.vision.grid == (21, 10) and c.config.text.context_length == 16 and c.config.embed_dim == 48
    np.testing.assert_array_equal(c.text.positional_embedding[...], state["text_encoder.positional_embedding"])
    np.testing.assert_array_equal(c.text.proj[...], state["text_encoder.text_projection"])
    np.testing.assert_array_equal(c.visual.proj[...], state["image_encoder.proj"])
    # another input size: the stored 21x10 grid is resized
    other = clip_reid.clip(path, state, (384, 128), 12, {})
    assert other.config.vision.grid == (31, 10)


def test_grid_of_no_published_setting_asks_for_the_size(tmp_path):
    model = ref.build(seed=20, image_size=(224, 224), stride=16)
    path = tmp_path / "odd.pth"
    ref.save(model, path)
    state = read(path)
    with pytest.raises(CheckpointError, match="image_size"):
        clip_reid.encoder(path, state, None, None, None)
    loaded = clip_reid.encoder(path, state, (224, 224), 16, None)  # told: it reads
    images = _images(2, 5, (224, 224))
    assert_close(_features(loaded, images), ref.features(model, images), FP32, "224x224 file")


def test_matches_only_clip_reid_files(plain):
    _, path = plain
    keys = set(read(path))
    assert clip_reid.matches(keys)
    muva_like = {k for k in keys if not k.startswith(("bottleneck", "classifier"))} | {"bnneck.weight"}
    assert not clip_reid.matches(muva_like)
    assert not clip_reid.matches({"visual.conv1.weight", "token_embedding.weight"})


def test_baseline_file_without_text_tower_is_a_clear_error(plain, tmp_path):
    _, path = plain
    state = {k: v for k, v in read(path).items() if not k.startswith(("text_encoder.", "prompt_learner."))}
    with pytest.raises(CheckpointError, match="ViT-baseline"):
        clip_reid.encoder(tmp_path / "baseline.pth", state, None, None, None)
