"""`reid_jax.inference.Encoder` on plain CLIP sources (a PyTorch file, a conversion) and its errors; the authors'
releases are in tests/test_released_*.py, reid-jax runs in test_train / test_scgi / test_muva."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_jax import convert
from reid_jax.inference import Encoder
from reid_jax.weights.readers import CheckpointError
from tests import numerics, torch_refs

TOL = 1e-4


@pytest.fixture(scope="module")
def openai(tmp_path_factory):
    model = torch_refs.openai_clip(seed=3)
    path = tmp_path_factory.mktemp("clip") / "ViT-tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _check(enc, model, size):
    rng = np.random.default_rng(0)
    images, ids = rng.normal(size=(2, *size, 3)).astype(np.float32), torch_refs.random_ids(2, rng)
    with torch.no_grad():
        ref_img = model.encode_image(torch_refs.nchw(images)).numpy()
        ref_txt = model.encode_text(torch.from_numpy(ids)).numpy()
    numerics.assert_close(enc.image_features(images), ref_img, TOL, "image")
    numerics.assert_close(enc.text_features(ids), ref_txt, TOL, "text")


def test_a_clip_file_and_its_conversion(openai, tmp_path):
    model, path = openai
    enc = Encoder.load(path, image_size=(32, 32))
    assert (enc.kind, enc.image_size, enc.mean) == ("clip", (32, 32), (0.48145466, 0.4578275, 0.40821073))
    _check(enc, model, (32, 32))
    out = tmp_path / "converted"
    assert convert.main([str(path), str(out), "--image-size=32,32"]) == 0
    enc = Encoder.load(out)  # the conversion records its input size
    assert enc.image_size == (32, 32)
    _check(enc, model, (32, 32))


def test_bad_input_is_named(openai, tmp_path):
    _, path = openai
    with pytest.raises(CheckpointError, match="no such file or folder"):
        Encoder.load(tmp_path / "missing.pth")
    enc = Encoder.load(path, image_size=(32, 32))
    with pytest.raises(ValueError, match=r"images must be float32 \[B, 32, 32, 3\].*got \[2, 3, 32, 32\]"):
        enc.image_features(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(CheckpointError, match="no camera embedding"):
        Encoder.load(path, camera_coefficient=1.0)
    run = tmp_path / "run" / "checkpoints" / "4" / "state"
    run.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="without config.json"):
        Encoder.load(tmp_path / "run")
