"""MUVA's released checkpoints: a file saved as the authors' trainer saves it (tests/torch_muva.py, every parameter
and buffer perturbed) gives, through `weights.released.muva`, the authors' test feature (the BNNeck output with the
model's own masks), the same masks, the same CLIP, and a MUVA run started from it holds its weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from reid_jax.weights import released
from reid_jax.weights.readers import CheckpointError
from reid_jax.weights.released import muva as released_muva
from tests import torch_muva
from tests.numerics import assert_close
from tests.torch_refs import nchw

FP32 = 1e-4  # the bound for a released model against the torch forward of the same weights
SIZE, PATCH = (24, 12), 4


def _saved(tmp_path, seed=0, name="muva.pth", **kw):
    torch.manual_seed(seed)
    model = torch_muva.perturb_(torch_muva.MUVA(image_size=SIZE, patch=PATCH, stride=PATCH, **kw), seed + 1)
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return model, path


def _images(n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *SIZE, 3)).astype(np.float32)


def _gate_margin(model, images) -> float:
    """How far the torch model's mask probabilities lie from its threshold (a tie would flip on rounding)."""
    with torch.no_grad():
        _, probs = model.forward_image(nchw(images))
    return float((probs - model.threshold).abs().min())


@pytest.mark.parametrize("classes,heads", [(5, 2), (released_muva.MSMT17_IDENTITIES, 8)])
def test_released_file_gives_the_authors_test_feature(tmp_path, classes, heads):
    model, path = _saved(tmp_path, classes=classes, rmp_heads=heads)
    module, state = released.read(path)
    assert module is released_muva
    loaded = released_muva.encoder(path, state, SIZE, PATCH, None)
    assert loaded.kind == "muva" and loaded.info["rmp_heads"] == heads and loaded.image_size == SIZE
    assert (loaded.mean, loaded.std) == released.common.HALF_MEAN_STD
    images = _images()
    assert _gate_margin(model, images) > 1e-4  # far above float32 rounding of a probability near 0.5
    got = np.asarray(nnx.jit(loaded.image_fn)(loaded.model, jnp.asarray(images), None))
    want = model.infer_image(nchw(images)).numpy()
    assert_close(got, want, FP32, "test feature after the BNNeck")

    # the same masks in every block, mixed (not all open or all shut)
    _, logits = loaded.model.encode(jnp.asarray(images))
    ours = np.asarray(loaded.model.mask_probs(logits) > loaded.model.threshold)
    with torch.no_grad():
        theirs = (model.forward_image(nchw(images))[1] > model.threshold).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert 0.1 < theirs.mean() < 0.9
    # before the BNNeck, and with given masks (their gt_mask: 0 = in the part, -inf = out)
    assert_close(loaded.model.image_features(jnp.asarray(images), after_bn=False),
                 model.infer_image(nchw(images), after_bn=False).numpy(), FP32, "feature before the BNNeck")
    given = np.random.default_rng(1).random((4, 3, model.grid[0] * model.grid[1])) < 0.5
    additive = torch.from_numpy(np.where(given, 0.0, -np.inf).astype(np.float32))
    assert_close(loaded.model.image_features(jnp.asarray(images), jnp.asarray(given)),
                 model.infer_image(nchw(images), additive).numpy(), FP32, "feature with given masks")


def test_released_clip_has_the_files_weights_and_part_tokens(tmp_path):
    model, path = _saved(tmp_path, seed=3)
    _, state = released.read(path)
    with pytest.raises(CheckpointError, match="pass the image_size and stride"):  # not the published 256x128
        released_muva.clip(path, state, None, None, {})
    clip = released_muva.clip(path, state, SIZE, PATCH, {})
    assert clip.config.vision.image_size == SIZE and clip.config.vision.num_extra_tokens == 3
    images = _images(seed=2)
    tokens, _ = clip.visual(jnp.asarray(images))  # full attention: every token sees every token
    with torch.no_grad():
        want = model.forward_image(nchw(images), full_attention=True)[0][:, :4].numpy()
    assert_close(clip.visual.project(tokens[:, :4]), want, FP32, "CLS and part tokens, full attention")
    t = model.text_encoder
    np.testing.assert_array_equal(np.asarray(clip.text.positional_embedding[...]), t.positional_embedding.detach())
    plain = released_muva.clip(path, state, SIZE, PATCH, {"vision": {"num_extra_tokens": 0}})
    assert not hasattr(plain.visual, "extra_tokens")


def test_released_file_at_another_grid_and_a_broken_file_are_one_line_errors(tmp_path, monkeypatch):
    _, path = _saved(tmp_path, seed=4)
    _, state = released.read(path)
    with pytest.raises(CheckpointError, match="its position grid holds 18 patches"):
        released_muva.build(path, state, (32, 12), PATCH)
    # trained at a published size, asked for another grid: the CLIP could be resized, the RMP cannot
    monkeypatch.setattr(released_muva, "PUBLISHED", ((SIZE, PATCH),))
    with pytest.raises(CheckpointError, match="mask predictor maps onto the 18 patches it was trained with"):
        released_muva.build(path, state, (32, 12), PATCH)
    assert released_muva.build(path, state).clip.config.vision.image_size == SIZE
    broken = {k: v for k, v in state.items() if k != "residual_mask_predictor.blocks.1.mlp.2.weight"}
    with pytest.raises(CheckpointError, match="lacks 1 keys: residual_mask_predictor.blocks.1.mlp.2.weight"):
        released_muva.build(path, broken, SIZE, PATCH)


def test_muva_training_started_from_a_released_file_holds_its_weights(data_dir, tmp_path):
    """--config.init_checkpoint=FILE: the model the run starts from gives the file's test feature (CLIP, part tokens,
    RMP, BNNeck), and its classifier is the file's when the identities match."""
    from reid_jax.train import muva
    from tests.params import TINY_MODEL
    from tests.test_muva import tiny_config

    c = tiny_config(data_dir)
    classes = muva.Task(c, tmp_path / "probe").num_classes
    v, t = TINY_MODEL["vision"], TINY_MODEL["text"]
    torch.manual_seed(7)
    model = torch_muva.perturb_(torch_muva.MUVA(
        image_size=tuple(c.model.image_size), patch=v["patch_size"], stride=c.model.stride, width=v["width"],
        layers=v["layers"], heads=v["heads"], mlp=v["mlp_dim"], embed_dim=TINY_MODEL["embed_dim"],
        text_width=t["width"], text_layers=t["layers"], text_heads=t["heads"], text_mlp=t["mlp_dim"],
        context=t["context_length"], classes=classes, rmp_heads=c.muva.rmp.heads), 8)
    path = tmp_path / "ViT-B-16_stage2_60.pth"
    torch.save(model.state_dict(), path)
    c.init_checkpoint = str(path)
    ts = muva.Task(c, tmp_path / "run").init_state()
    images = np.random.default_rng(3).normal(size=(4, *c.model.image_size, 3)).astype(np.float32)
    assert _gate_margin(model, images) > 1e-4
    assert_close(ts.model.image_features(jnp.asarray(images)), model.infer_image(nchw(images)).numpy(), FP32,
                 "the starting model's test feature")
    np.testing.assert_array_equal(np.asarray(ts.heads.classifier.kernel[...]), model.fc.weight.detach().numpy().T)


def test_a_reid_jax_muva_run_loads_with_its_rmp_and_bnneck(data_dir, tmp_path):
    """Encoder.load of a MUVA training run: the checkpoint's model gives the trained model's test feature, BNNeck
    (running statistics and frozen shift) and RMP included."""
    from reid_jax.inference import Encoder
    from reid_jax.train import muva
    from reid_jax.train.checkpoint import Checkpointer
    from tests.params import perturb
    from tests.test_muva import tiny_config

    c = tiny_config(data_dir)
    ts = muva.Task(c, tmp_path / "run").init_state()
    perturb(ts.model, 9)
    ts.model.bnneck.mean[...] = jnp.full(ts.model.bnneck.mean.shape, 0.1)
    ts.model.bnneck.bias[...] = jnp.full(ts.model.bnneck.bias.shape, -0.2)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", keep=1)
    ckpt.save(3, nnx.state(ts), None, {})
    ckpt.wait()
    (tmp_path / "run" / "config.json").write_text(c.to_json())  # as loop.fit writes it
    enc = Encoder.load(tmp_path / "run")
    assert enc.kind == "muva"
    images = np.random.default_rng(5).normal(size=(2, *c.model.image_size, 3)).astype(np.float32)
    assert_close(enc.image_features(images), ts.model.image_features(jnp.asarray(images)), 1e-6,
                 "the run's test feature")


def test_rmp_switches_match_the_authors_options(tmp_path):
    """Their RMP_USE_LAYER_NORM / RMP_USE_INNER_SHORTCUT off, another tau and threshold: `RMPConfig` gives their
    forward (a file does not record these, so they are passed as the run's config would)."""
    model, path = _saved(tmp_path, seed=11, layer_norm=False, shortcut=False, tau=2.0, threshold=0.4)
    _, state = released.read(path)
    ours = released_muva.build(path, state, SIZE, PATCH, settings=released_muva.RMPConfig(
        heads=2, layer_norm=False, inner_shortcut=False, tau=2.0, threshold=0.4))
    assert ours.rmp[0].ln_q is None
    images = _images(seed=6)
    assert _gate_margin(model, images) > 1e-4
    assert_close(ours.image_features(jnp.asarray(images)), model.infer_image(nchw(images)).numpy(), FP32,
                 "test feature, RMP without LayerNorms and shortcut, tau 2, threshold 0.4")


@pytest.mark.parametrize("variant", ["plain", "fp16_module"])
def test_encoder_loads_a_released_file(tmp_path, variant):
    """Encoder.load(FILE): detected as MUVA, the authors' feature; a DataParallel ('module.') file saved in fp16
    gives the feature of its fp16 weights."""
    from reid_jax.inference import Encoder

    model, path = _saved(tmp_path, seed=13)
    if variant == "fp16_module":
        with torch.no_grad():
            for t in list(model.parameters()) + [model.bnneck.running_mean, model.bnneck.running_var]:
                t.copy_(t.half().float())
        torch.save({f"module.{k}": v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
                   path)
    enc = Encoder.load(path, image_size=SIZE, stride=PATCH)
    assert enc.kind == "muva" and (enc.mean, enc.std) == released.common.HALF_MEAN_STD
    images = _images(seed=7)
    assert _gate_margin(model, images) > 1e-4
    assert_close(enc.image_features(images), model.infer_image(nchw(images)).numpy(), FP32, f"Encoder, {variant}")
