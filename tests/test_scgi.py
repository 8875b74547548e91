"""CLIP-SCGI: its modules (CGI, CFF, the CLIP-ReID image model, BNNeck) against written-out references, its
losses against numpy, the trainer's step (frozen text tower, sharded == single device), and inference that never
touches the text tower."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from reid_jax import losses, tokenizer
from reid_jax.data import device
from reid_jax.models import cgi as cgi_lib
from reid_jax.models import prompts
from reid_jax.models import clip as clip_lib
from reid_jax.models.attention import CrossAttention
from reid_jax.models.cff import CFF
from reid_jax.models.clip_reid import CLIPReID
from reid_jax.models.heads import BatchNorm1d
from reid_jax import mesh as mesh_lib
from reid_jax.train import loop
from reid_jax.train.writer import read_records
from tests import configs, logged_metrics, sharding
from tests.numerics import assert_close, rel_err
from tests.params import perturb

CFG = clip_lib.CLIPConfig.tiny(image_size=(32, 16), stride=4)  # 8x4 grid, width 32, text width 32, embed 24
# Tolerances relative to the largest value of each compared array (tests/numerics.py)
TORCH = 1e-5  # against PyTorch / float64 numpy: float32 rounding in other kernels
SAME_MATH = 1e-5  # the same computation arranged differently (jitted / eager, by hand, masked): rounding only
CHANGED = 1e-3  # an output that must change differs from the old one by more than this: far above rounding


def tiny_config(data_dir, variant: str = "demo"):
    """configs/scgi.py's variant on the `small` synthetic set with a tiny model."""
    module = configs.load("scgi")
    c = configs.tiny_image_reid(module.get_config(variant), data_dir)
    c.data.train = module._dataset("synthetic_pedestrians", "train", "small")
    c.eval.datasets = [module._test_set("synthetic_pedestrians", "small", label="synthetic")]
    # Adam eps 1e-3 (the TDE paper's): parameters whose true gradient is exactly 0 (the key part of an attention
    # in-projection bias; a shift that a BatchNorm removes) would turn reduction-order noise into +-lr steps
    c.optim.update({"lr": 1e-3, "warmup_epochs": 0.0, "eps": 1e-3})
    return c


def _ids(texts, length=16):
    return jnp.asarray(tokenizer.tokenize(texts, length))


# ------------------------------------------------------------------------------------------------- modules
def test_cross_attention_matches_torch_with_a_key_mask():
    """torch.nn.MultiheadAttention (fused in_proj, batch first) with key_padding_mask as the reference."""
    rng = np.random.default_rng(0)
    ours = perturb(CrossAttention(16, 4, 0.1, jnp.float32, rngs=nnx.Rngs(0)), seed=1)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.from_numpy(np.asarray(ours.in_proj.kernel[...]).T))
        ref.in_proj_bias.copy_(torch.from_numpy(np.asarray(ours.in_proj.bias[...])))
        ref.out_proj.weight.copy_(torch.from_numpy(np.asarray(ours.out_proj.kernel[...]).T))
        ref.out_proj.bias.copy_(torch.from_numpy(np.asarray(ours.out_proj.bias[...])))
    q, kv = rng.normal(size=(3, 5, 16)).astype(np.float32), rng.normal(size=(3, 7, 16)).astype(np.float32)
    keep = np.ones((3, 7), bool)
    keep[0, 4:], keep[2, 1:] = False, False
    want = ref(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv),
               key_padding_mask=torch.from_numpy(~keep), need_weights=False)[0].detach().numpy()
    got = ours(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(keep))
    assert_close(got, want, TORCH, "attention output")


def test_batchnorm1d_matches_torch_in_training_and_eval():
    rng = np.random.default_rng(1)
    ours, ref = BatchNorm1d(6), torch.nn.BatchNorm1d(6)
    ours.scale[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.asarray(ours.scale[...])))
        ref.bias.zero_()
    for i in range(3):
        x = rng.normal(2.0, 3.0, size=(8, 6)).astype(np.float32)
        assert_close(ours(jnp.asarray(x)), ref(torch.from_numpy(x)).detach().numpy(), TORCH, f"training batch {i}")
    assert_close(ours.mean[...], ref.running_mean.numpy(), TORCH, "running mean")
    assert_close(ours.var[...], ref.running_var.numpy(), TORCH, "running variance")  # unbiased, as torch
    ours.eval()
    ref.eval()
    x = rng.normal(size=(4, 6)).astype(np.float32)
    assert_close(ours(jnp.asarray(x)), ref(torch.from_numpy(x)).detach().numpy(), TORCH, "eval output")


def test_triplet_hard_matches_numpy():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(12, 5)).astype(np.float32)
    pids = np.repeat(np.arange(3), 4)
    losses_ = []
    for i in range(12):
        d = np.sqrt(((feats[i] - feats) ** 2).sum(1))
        d_ap, d_an = d[pids == pids[i]].max(), d[pids != pids[i]].min()
        losses_.append(max(0.0, d_ap - d_an + 0.3))
    got = losses.triplet_hard(jnp.asarray(feats), jnp.asarray(pids), 0.3)
    assert_close(float(got), np.mean(losses_), TORCH, "triplet loss")
    assert float(got) > 0  # the random batch has violations: the check is not vacuous


def test_clip_reid_features_and_camera_embedding():
    model = perturb(CLIPReID(clip_lib.CLIP(CFG, rngs=nnx.Rngs(0)), num_cameras=3, rngs=nnx.Rngs(1)), seed=2)
    images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 16, 3)), jnp.float32)
    cams = jnp.asarray([0, 2])
    f = model.encode(images, cams)
    visual = model.clip.visual
    pos = visual.positional_embedding[...]
    patches = visual.conv1(images).reshape(2, -1, CFG.vision.width) + pos[1:]
    cls = visual.class_embedding[...] + pos[0] + model.cam_embed[...][cams]  # the camera row joins CLS only
    x = visual.ln_pre(jnp.concatenate([cls[:, None], patches], axis=1))
    tokens, layers = visual.transformer(x, return_layers=True)
    assert_close(f["tokens"], tokens, SAME_MATH, "tokens")
    assert_close(f["last"], layers[-2][:, 0], SAME_MATH, "last block's input CLS")
    cls = visual.ln_post(tokens[:, 0])
    assert_close(f["cls"], cls, SAME_MATH, "cls")
    assert_close(f["proj"], cls @ visual.proj[...], SAME_MATH, "proj")
    assert_close(model.image_features(images, cams), np.concatenate([f["cls"], f["proj"]], 1), SAME_MATH,
                 "image features")
    other = model.image_features(images, jnp.asarray([1, 1]))  # both images' cameras changed
    assert all(rel_err(other[i], model.image_features(images, cams)[i]) > CHANGED for i in range(2))


def test_inference_never_touches_the_text_tower():
    """Every text-tower parameter set to NaN: the image features stay finite and unchanged."""
    model = perturb(CLIPReID(clip_lib.CLIP(CFG, rngs=nnx.Rngs(0)), num_cameras=2, rngs=nnx.Rngs(1)), seed=4)
    images = jnp.asarray(np.random.default_rng(5).normal(size=(3, 32, 16, 3)), jnp.float32)
    cams = jnp.asarray([0, 1, 0])
    before = np.asarray(model.image_features(images, cams))
    text = nnx.state(model.clip.text, nnx.Param)
    nnx.update(model.clip.text, jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), text))
    model.clip.logit_scale[...] = jnp.nan
    after = np.asarray(jax.jit(lambda m, x, c: m.image_features(x, c))(model, images, cams))
    assert np.isfinite(after).all()
    assert_close(after, before, SAME_MATH, "image features, jitted")  # jitted vs eager rounding only


def test_cgi_shapes_gradients_and_caption_guidance():
    cgi = perturb(cgi_lib.CGI(CFG, num_queries=3, depth=2, rngs=nnx.Rngs(0)), seed=1)
    rng = np.random.default_rng(6)
    img = jnp.asarray(rng.normal(size=(2, 9, CFG.embed_dim)), jnp.float32)
    ids = _ids(["a man in a red coat", "a woman with black hair"])
    cap = jnp.asarray(rng.normal(size=(2, 16, CFG.embed_dim)), jnp.float32)
    mask = cgi_lib.caption_mask(ids)
    np.testing.assert_array_equal(mask, np.asarray(ids) > 0)  # SOT..EOT are the non-pad positions
    words = cgi(img, cap, mask)
    assert words.shape == (2, 3, CFG.text.width)
    # padding after EOT is ignored; a real caption token is not
    eot = int(np.argmax(np.asarray(ids)[0]))
    assert_close(cgi(img, cap.at[0, eot + 1:].set(7.0), mask), words, SAME_MATH, "padding changed")
    changed = cgi(img, cap.at[0, 2].set(7.0), mask)
    assert rel_err(changed[0], words[0]) > CHANGED
    assert_close(changed[1], words[1], SAME_MATH, "another sample's caption changed")
    # gradients reach the queries, every block and the image tokens
    grads = nnx.grad(lambda m: jnp.sum(m(img, cap, mask) ** 2))(cgi)
    for path, g in nnx.to_flat_state(grads):
        assert np.isfinite(g[...]).all() and np.abs(g[...]).max() > 0, path
    g_img = jax.grad(lambda x: jnp.sum(cgi(x, cap, mask) ** 2))(img)
    assert np.abs(g_img).max() > 0
    unguided = cgi_lib.CGI(CFG, num_queries=3, depth=2, guidance="none", rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(unguided(img, cap, mask), unguided(img, cap * 2, mask))


def test_prompt_slots_hold_the_pseudo_words():
    """Filling the slots with the '*' token's own embedding gives the plain prompt's text feature."""
    clip = perturb(clip_lib.CLIP(CFG, rngs=nnx.Rngs(0)), seed=7)
    ids, slots = prompts.prompt_ids("A photo of a * person.", 3, CFG.text.context_length)
    assert len(slots) == 3 and np.all(np.diff(slots) == 1) and ids[-1] == np.max(ids)  # trimmed after EOT
    star = clip.text.token_embedding(jnp.asarray(ids[slots]))  # [3, Dt]
    words = jnp.broadcast_to(star, (2, 3, CFG.text.width))
    want = clip.text_features(jnp.asarray(tokenizer.tokenize(["A photo of a * * * person."],
                                                             CFG.text.context_length)))
    got = prompts.prompt_features(clip, words, ids, slots)
    assert_close(got, np.repeat(np.asarray(want), 2, 0), SAME_MATH, "prompt features")
    other = prompts.prompt_features(clip, words.at[1].multiply(2.0), ids, slots)
    assert rel_err(other[1], got[1]) > CHANGED
    with pytest.raises(ValueError, match="exactly one"):
        prompts.prompt_ids("A photo of a person.", 3, 16)


def test_cff_shapes_and_gradients():
    cff = perturb(CFF(CFG, depth=2, rngs=nnx.Rngs(0)), seed=2)
    rng = np.random.default_rng(8)
    cls = jnp.asarray(rng.normal(size=(2, CFG.vision.width)), jnp.float32)
    patches = jnp.asarray(rng.normal(size=(2, 32, CFG.vision.width)), jnp.float32)
    words = jnp.asarray(rng.normal(size=(2, 3, CFG.text.width)), jnp.float32)
    fused = cff(cls, patches, words)
    assert fused.shape == (2, CFG.vision.width) and fused.dtype == jnp.float32
    for i, g in enumerate(jax.grad(lambda *a: jnp.sum(cff(*a) ** 2), argnums=(0, 1, 2))(cls, patches, words)):
        assert np.isfinite(g).all() and np.abs(g).max() > 0, i
    # each sample fuses its own words only
    assert_close(cff(cls, patches, words.at[1].set(0.0))[0], fused[0], SAME_MATH, "other sample's words changed")


# ------------------------------------------------------------------------------------------------ trainer
def _step(task, ts_state, graphdef, batch):
    @jax.jit
    def step(state, batch):
        ts = nnx.merge(graphdef, state)
        metrics = task.train_step(ts, device.prepare_images(batch, task.config.data.aug, jax.random.key(0)),
                                  jax.random.key(0))
        return nnx.state(ts), metrics

    return step(ts_state, batch)


def test_paper_step_freezes_the_text_tower_and_trains_cgi_and_cff(data_dir, tmp_path):
    """The paper's recipe (frozen text tower, per-identity text prototypes) on a tiny model: one step."""
    from reid_jax.data.pipeline import Shard
    from reid_jax.train import scgi

    c = tiny_config(data_dir, "market1501_sie_olp")  # with the camera embedding (the tiny model keeps stride 16)
    task = scgi.Task(c, tmp_path)
    ts = task.init_state()
    task.prepare(ts, mesh_lib.make_mesh(c.mesh))
    assert ts.text_protos.shape == (task.num_classes, 24) and np.abs(ts.text_protos[...]).min() > 0
    graphdef, state = nnx.split(ts)
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(ts, nnx.Param))}
    batch = next(iter(task.train_stream(Shard())))
    assert batch["text"].shape == (16, 48) and len(np.unique(batch["pid"])) == 4
    state, metrics = _step(task, state, graphdef, batch)
    parts = {k: float(v) for k, v in metrics.items() if k.startswith("loss_")}
    assert set(parts) == {"loss_id", "loss_triplet", "loss_i2t", "loss_cgi", "loss_cff"}
    assert_close(float(metrics["loss"]), sum(parts.values()), SAME_MATH, "loss = sum of its parts")
    after = dict(nnx.to_flat_state(nnx.state(nnx.merge(graphdef, state), nnx.Param)))
    moved = {".".join(map(str, k)) for k, v in before.items() if not np.array_equal(v, after[k][...])}
    assert not any(name.startswith("model.clip.text.") for name in moved)
    for prefix in ("model.clip.visual.", "model.cam_embed", "heads.cgi.", "heads.cff.", "heads.neck_fuse."):
        assert any(name.startswith(prefix) for name in moved), prefix
    opt = nnx.to_flat_state(nnx.state(nnx.merge(graphdef, state).optimizer))
    assert not any("text" in ".".join(map(str, k)) for k, _ in opt)  # no optimizer state for frozen parameters


def test_text_prototypes_are_mean_caption_features(data_dir, tmp_path):
    from reid_jax import data
    from reid_jax.train import scgi

    task = scgi.Task(tiny_config(data_dir, "market1501"), tmp_path)
    clip = task.init_state().model.clip
    source = data.load_source("synthetic_pedestrians", "train", data_dir, "small", decode_image=False)
    by_pid = {}
    for rec in source:
        for cap in rec["captions"]:
            by_pid.setdefault(int(rec["pid"]), []).append(cap.decode())
    want = [np.mean(clip.encode_text(tokenizer.tokenize(caps, 48)), axis=0) for _, caps in sorted(by_pid.items())]
    got = task._text_prototypes(clip, mesh_lib.make_mesh(task.config.mesh))
    assert_close(got, np.stack(want), SAME_MATH, "text prototypes")


def sharded_config(data_dir):
    """tiny_config at the paper's base lr scale (1e-4 here; CGI/CFF 10x, biases 2x): parameters move by up to
    ~1e-3 per step, the scale the sharded and single-device parameters are compared on."""
    c = tiny_config(data_dir)
    c.optim.lr = 1e-4
    return c


def test_sharded_step_equals_single_device_step(data_dir, tmp_path):
    """CGI and CFF train at 10x the base lr (1e-3 a step): their parameters differ by up to 1.4e-3 of the largest
    movement (measured, also with XLA limited to SSE4.2): 0.14 of the tolerance."""
    sharding.assert_sharded_step_equals_single("tests.test_scgi", "sharded_config", "scgi", data_dir, tmp_path,
                                               rtol=1e-2)


def test_demo_recipe_runs_and_evaluates(data_dir, tmp_path):
    """The demo's recipe (text tower trained along, i2t against the batch's captions) through loop.fit: metrics
    and re-ranked metrics of the final model, the retrieval picture, the best checkpoint."""
    from reid_jax.train import scgi

    c = tiny_config(data_dir, "demo")
    c.eval.rerank.enabled = True
    task = scgi.Task(c, tmp_path)
    model = loop.fit(c, tmp_path, task)
    last = logged_metrics.assert_logged_metrics_are_the_final_models(
        c, tmp_path, task, model, lambda m, b: m.image_features(b["image"], b["camid"] if task.num_cameras else None))
    # features that tell people apart: random ones score 7.0 mAP on this split (mean of 50 draws, at most 10.9);
    # measured 25.6 after the 9 steps in the plain setting with the identity walk (19.2 with the camera embedding
    # and random P x K batches; the untrained model's 23.4: so few steps barely move it)
    assert last["eval/synthetic/mAP"] > 12
    assert any("train/loss_cff" in r for r in read_records(tmp_path / "metrics.jsonl"))
    assert list(tmp_path.glob("retrieval_synthetic_*.png")) and (tmp_path / "best" / "synthetic").exists()
    # the run as `Encoder.load` reads it (config.json + checkpoint): the trained model's test feature
    from reid_jax.inference import Encoder

    images = np.random.default_rng(0).normal(size=(2, *c.model.image_size, 3)).astype(np.float32)
    cams = np.array([0, 1], np.int32) if task.num_cameras else None
    for path in (tmp_path, tmp_path / "best" / "synthetic"):
        enc = Encoder.load(path)
        assert (enc.kind, enc.image_size, enc.mean) == ("scgi", tuple(c.model.image_size), (0.5, 0.5, 0.5))
        assert_close(enc.image_features(images, cams), model.image_features(jnp.asarray(images), cams), SAME_MATH,
                     f"Encoder of {path.name}")


# ------------------------------------------------------------------------------------- from a CLIP-ReID file
def test_variants_are_clip_reids_published_settings():
    """The default is CLIP-ReID's vit_clipreid.yml (stride 16, no camera embedding); `_sie_olp` its SIE-OLP."""
    module = configs.load("scgi")
    plain, sie = module.get_config("msmt17"), module.get_config("msmt17_sie_olp")
    assert (plain.model.stride, plain.model.sie) == (16, False)
    assert (sie.model.stride, sie.model.sie, sie.model.sie_coe) == (12, True, 1.0)


def test_a_file_run_at_another_stride_is_warned_about(monkeypatch):
    """An SIE-OLP file (21 x 10 grid) under the plain variant: its grid would be resized, which the log says."""
    import ml_collections

    from reid_jax.train import scgi

    state = {"image_encoder.positional_embedding": np.zeros((211, 8)),
             "image_encoder.conv1.weight": np.zeros((8, 3, 16, 16))}
    model_cfg = ml_collections.ConfigDict({"image_size": (256, 128), "stride": 16})
    lines = []
    monkeypatch.setattr(scgi.logging, "warning", lambda msg, *a: lines.append(msg % a))
    scgi.warn_if_resized("f.pth", state, model_cfg)
    assert len(lines) == 1 and "stride 12" in lines[0] and "sie_olp" in lines[0]
    model_cfg.stride = 12
    scgi.warn_if_resized("f.pth", state, model_cfg)
    assert len(lines) == 1


def _clip_reid_files(task, tmp_path, classes):
    """A CLIP-ReID stage-2 file at the tiny config's input (64x32, stride 16) with `classes` identities and the
    training set's cameras, its BN shifts at 0 as their training leaves them; and an OpenAI-layout CLIP with the
    token table it lacks."""
    from tests import torch_clip_reid, torch_refs

    model = torch_clip_reid.build(seed=30, image_size=(64, 32), stride=16, cameras=task.num_cameras, classes=classes,
                                  width=64, embed=24, text_width=64, context=48)
    with torch.no_grad():
        model.bottleneck.bias.zero_()
        model.bottleneck_proj.bias.zero_()
    torch_clip_reid.save(model, tmp_path / "clipreid.pth")
    donor = torch_refs.openai_clip(seed=31, image_resolution=32, patch=16, width=64, layers=1, embed_dim=24)
    torch.save(donor.state_dict(), tmp_path / "openai.pt")
    return model, donor, tmp_path / "clipreid.pth", tmp_path / "openai.pt"


def _from_file_config(data_dir, files=None):
    c = tiny_config(data_dir, "market1501_sie_olp")
    c.model.overrides = {}  # the architecture is the file's
    if files:
        c.init_checkpoint, c.init_text_checkpoint = str(files[0]), str(files[1])
    return c


def test_training_starts_from_a_clip_reid_file(data_dir, tmp_path, monkeypatch):
    """Image tower, camera embedding, BNNecks and classifiers from the file: the model's test feature and its
    BNNeck outputs (eval) are the file's under their forward; the token table is the donor CLIP's; a step trains."""
    from reid_jax.data.pipeline import Shard
    from reid_jax.train import scgi
    from tests import torch_clip_reid

    task = scgi.Task(_from_file_config(data_dir), tmp_path)
    ref, donor, path, donor_path = _clip_reid_files(task, tmp_path, task.num_classes)
    task = scgi.Task(_from_file_config(data_dir, (path, donor_path)), tmp_path)
    lines = []
    monkeypatch.setattr(scgi.logging, "info", lambda msg, *a: lines.append(msg % a))
    ts = task.init_state()
    line = next(x for x in lines if "CLIP-ReID" in x)
    assert "camera embedding" in line and "classifier_proj" in line and line.endswith("skipped nothing")

    images = np.random.default_rng(9).normal(size=(4, 64, 32, 3)).astype(np.float32)
    cams = np.arange(4) % task.num_cameras
    feats = ts.model.image_features(jnp.asarray(images), jnp.asarray(cams))
    assert_close(feats, torch_clip_reid.features(ref, images, cams), TORCH * 10, "test feature from the file")
    heads = ts.heads
    heads.eval()
    dv = ts.model.clip.config.vision.width
    after = np.concatenate([heads.neck.bn(feats[:, :dv]), heads.neck_proj.bn(feats[:, dv:])], 1)
    assert_close(after, torch_clip_reid.features(ref, images, cams, "after"), TORCH * 10, "BNNecks (eval)")
    heads.train()
    np.testing.assert_array_equal(heads.neck_proj.classifier.kernel[...], ref.classifier_proj.weight.detach().numpy().T)
    np.testing.assert_array_equal(ts.model.clip.text.token_embedding.embedding[...],
                                  donor.token_embedding.weight.detach().numpy())

    task.prepare(ts, mesh_lib.make_mesh(task.config.mesh))
    graphdef, state = nnx.split(ts)
    _, metrics = _step(task, state, graphdef, next(iter(task.train_stream(Shard()))))
    assert np.isfinite(float(metrics["loss"]))


def test_clip_reid_file_that_does_not_fit_is_reported(data_dir, tmp_path, monkeypatch):
    """Another identity count: the classifiers are skipped and the log line says so; without
    config.init_text_checkpoint the file evaluates (--mode=eval), and training with captions is a one-line config
    error before the first step."""
    from reid_jax import errors
    from reid_jax.train import scgi

    task = scgi.Task(_from_file_config(data_dir), tmp_path)
    _, _, path, donor_path = _clip_reid_files(task, tmp_path, task.num_classes + 3)
    lines = []
    monkeypatch.setattr(scgi.logging, "info", lambda msg, *a: lines.append(msg % a))
    ts = scgi.Task(_from_file_config(data_dir, (path, donor_path)), tmp_path).init_state()
    line = next(x for x in lines if "CLIP-ReID" in x)
    skipped = line.split("; skipped ")[1]
    assert f"classifier ({task.num_classes + 3} identities in the file, {task.num_classes} here)" in skipped
    assert "classifier_proj" in skipped and "bottleneck" not in skipped
    assert ts.heads.neck.classifier.kernel.shape[1] == task.num_classes
    c = _from_file_config(data_dir, (path, donor_path))
    c.init_text_checkpoint = ""
    task = scgi.Task(c, tmp_path / "eval")
    results = loop.evaluate_checkpoint(c, tmp_path / "eval", task)  # no checkpoint: the file, as step 0
    assert results["eval/synthetic/mAP"] > 0
    with pytest.raises(errors.ConfigError, match="init_text_checkpoint"):
        task.prepare(task.init_state(), mesh_lib.make_mesh(c.mesh))
