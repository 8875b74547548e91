"""IRRA / MLLM4Text-ReID training checkpoints (`weights.released.irra`) against a PyTorch model of their structure
(tests/torch_irra.py): `Encoder` features, heads for fine-tuning, `load_clip` / `model_for` and the converter."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from reid_jax import convert, weights
from reid_jax.inference import Encoder
from reid_jax.models import irra as irra_lib
from reid_jax.weights.readers import CheckpointError
from reid_jax.weights.released import irra
from tests import numerics, torch_refs
from tests.torch_irra import IRRARef

SIZE, STRIDE = (32, 16), 8  # a 4 x 2 grid of 8-pixel patches: not square, as 384x128 (24 x 8)
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return IRRARef(image_size=SIZE, stride=STRIDE).round_to_half_()


@pytest.fixture(scope="module")
def pth(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("irra") / "best.pth"
    ref.save(path)
    return path


def _inputs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *SIZE, 3)).astype(np.float32), torch_refs.random_ids(n, rng)


def test_encoder_matches_their_encode_image_and_text(ref, pth):
    enc = Encoder.load(pth, image_size=SIZE, stride=STRIDE)
    images, ids = _inputs()
    assert enc.kind == "tde_nam" and enc.image_size == SIZE
    assert (enc.mean, enc.std) == ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    numerics.assert_close(enc.image_features(images), ref.encode_image(images), TOL, "irra image")
    numerics.assert_close(enc.text_features(ids), ref.encode_text(ids), TOL, "irra text")


@pytest.mark.parametrize("variant", ["module_prefix", "float32"])
def test_ddp_prefix_and_float32_files(ref, tmp_path, variant):
    path = tmp_path / "m.pth"
    ref.save(path, half=variant != "float32", prefix="module." if variant == "module_prefix" else "")
    images, _ = _inputs(2, seed=1)
    enc = Encoder.load(path, image_size=SIZE, stride=STRIDE)
    numerics.assert_close(enc.image_features(images), ref.encode_image(images), TOL, variant)


def test_an_unpublished_grid_needs_the_training_size(pth):
    with pytest.raises(CheckpointError, match=r"holds 8 patches.*pass the image_size and stride"):
        Encoder.load(pth)


def test_heads_for_fine_tuning_match_their_mlm_head(ref, pth):
    """`model_for` with the file as init_checkpoint gives its CLIP; `load_heads` its classifier and MLM head."""
    module, state = weights.released.read(pth)
    assert module is irra
    clip = weights.load_clip(pth, image_size=SIZE, stride=STRIDE)
    heads = irra_lib.IRRAHeads(clip.config, num_classes=7, depth=1, rngs=nnx.Rngs(0))
    assert irra.load_heads(pth, state, heads) == []
    images, ids = _inputs(2, seed=2)
    img_tokens, _ = clip.visual(images)
    txt_tokens, _ = clip.text(ids)
    ours = heads.mlm_logits(clip.text.project(txt_tokens), clip.visual.project(img_tokens))
    numerics.assert_close(ours, ref.mlm_logits(images, ids), TOL, "mlm logits")
    numerics.assert_close(heads.id_logits(clip.image_features(images)),
                          ref.classifier(torch_refs.torch.from_numpy(ref.encode_image(images))).detach().numpy(),
                          TOL, "id logits")
    other = irra_lib.IRRAHeads(clip.config, num_classes=5, depth=1, rngs=nnx.Rngs(0))
    skipped = irra.load_heads(pth, state, other)  # another set's identities: the classifier starts afresh
    assert [s.split(" ")[0] for s in skipped] == ["classifier.bias", "classifier.weight"]


def test_convert_writes_its_clip_at_the_training_size(ref, pth, tmp_path):
    out = tmp_path / "converted"
    assert convert.main([str(pth), str(out), "--image-size=32,16", "--stride=8"]) == 0
    enc = Encoder.load(out)
    images, ids = _inputs(2, seed=3)
    assert enc.kind == "clip" and enc.image_size == SIZE
    numerics.assert_close(enc.image_features(images), ref.encode_image(images), TOL, "converted image")
    numerics.assert_close(enc.text_features(ids), ref.encode_text(ids), TOL, "converted text")


def test_a_release_as_init_checkpoint_trains_and_evaluates(ref, pth, data_dir, tmp_path):
    """The TDE Task starts from the file (CLIP and the heads that fit), and `--mode=eval` without a checkpoint
    evaluates it as it is, as step 0."""
    from reid_jax.train import loop, tde_nam
    from tests.cli_config import tiny_config

    config = tiny_config(data_dir)
    config.init_checkpoint = str(pth)
    config.model.update({"image_size": SIZE, "stride": STRIDE})
    config.model.overrides = {"vision": {"width": 64, "layers": 2, "heads": 1, "mlp_dim": 256, "patch_size": 8},
                              "text": {"width": 64, "layers": 2, "heads": 1, "mlp_dim": 256,
                                       "context_length": 77}, "embed_dim": 64}
    config.data.context_length = 77
    config.loss.update({"id_weight": 1.0, "mlm_weight": 1.0, "mlm_depth": 1})
    task = tde_nam.Task(config, tmp_path)
    ts = task.init_state()
    images, ids = _inputs(2, seed=4)
    numerics.assert_close(ts.model.image_features(images), ref.encode_image(images), TOL, "task model")
    mlm = ref.mlm_head.fc.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(ts.heads.mlm_head.fc.kernel[...]), mlm)  # the heads came along
    results = loop.evaluate_checkpoint(config, tmp_path, task)
    assert {"eval/synthetic/R1", "eval/synthetic/mAP"} <= set(results)
    assert (tmp_path / "metrics.jsonl").read_text().count('"step": 0') == 1
