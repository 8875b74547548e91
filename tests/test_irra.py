"""IRRA's fine-tuning heads against IRRA's own module structure in PyTorch (OpenAI's Transformer and LayerNorm
from clip-anytorch, torch.nn.MultiheadAttention), and the fine-tuning step that uses them."""

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from flax import traverse_util

from reid_jax.data import device
from reid_jax.models import clip as clip_lib
from reid_jax.models import irra
from reid_jax.weights import mapping
from tests import torch_refs
from tests.numerics import assert_close

TORCH = 1e-5  # against IRRA's PyTorch modules, relative to the largest logit (tests/numerics.py)


class TorchIRRAHeads(torch.nn.Module):
    """IRRA's `cross_former` + `mlm_head` + `classifier` (model/build.py), written as IRRA builds them."""

    def __init__(self, width: int, depth: int, vocab: int, num_classes: int):
        super().__init__()
        m = torch_refs.openai_model_module()
        self.cross_attn = torch.nn.MultiheadAttention(width, width // 64, batch_first=True)
        self.cross_modal_transformer = m.Transformer(width=width, layers=depth, heads=width // 64)
        self.ln_pre_t, self.ln_pre_i, self.ln_post = m.LayerNorm(width), m.LayerNorm(width), m.LayerNorm(width)
        self.mlm_head = torch.nn.Sequential(OrderedDict([
            ("dense", torch.nn.Linear(width, width)), ("gelu", m.QuickGELU()), ("ln", m.LayerNorm(width)),
            ("fc", torch.nn.Linear(width, vocab))]))
        self.classifier = torch.nn.Linear(width, num_classes)

    def mlm_logits(self, q, kv):
        x = self.cross_attn(self.ln_pre_t(q), self.ln_pre_i(kv), self.ln_pre_i(kv), need_weights=False)[0]
        x = self.cross_modal_transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD
        return self.mlm_head(self.ln_post(x))


def _load_into(heads: irra.IRRAHeads, ref: torch.nn.Module) -> None:
    """Copies IRRA's state dict into our heads (same names; kernels transposed)."""
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(heads, nnx.Param)))
    new = {}
    for path, value in ours.items():
        key = mapping.openai_name(("heads", *path))  # the leading tower name is dropped
        assert state[key].size == value.size, key
        new[path] = mapping.from_torch_layout(path, state.pop(key))
    assert not state, f"unused reference weights: {sorted(state)}"
    nnx.update(heads, nnx.State(traverse_util.unflatten_dict(new)))


def test_heads_match_irra_modules():
    width, depth, classes = 128, 2, 11
    ref = torch_refs.perturb_(TorchIRRAHeads(width, depth, 49408, classes), seed=3)
    cfg = clip_lib.CLIPConfig.tiny().replace(embed_dim=width)
    heads = irra.IRRAHeads(cfg, classes, depth, rngs=nnx.Rngs(0))
    _load_into(heads, ref)
    rng = np.random.default_rng(0)
    text = rng.normal(size=(3, 9, width)).astype(np.float32)
    image = rng.normal(size=(3, 13, width)).astype(np.float32)
    with torch.no_grad():
        want = ref.mlm_logits(torch.from_numpy(text), torch.from_numpy(image)).numpy()
        want_id = ref.classifier(torch.from_numpy(text[:, 0])).numpy()
    got = heads.mlm_logits(jnp.asarray(text), jnp.asarray(image))
    assert got.shape == (3, 9, 49408)
    assert_close(got, want, TORCH, "MLM logits")
    assert_close(heads.id_logits(jnp.asarray(text[:, 0])), want_id, TORCH, "ID logits")


def test_heads_start_with_irra_initialisation():
    cfg = clip_lib.CLIPConfig.tiny().replace(embed_dim=256)
    heads = irra.IRRAHeads(cfg, 500, 4, rngs=nnx.Rngs(0))
    width, depth = 256, 4
    expect = {"classifier": 0.001, "cross_attn.in_proj": width ** -0.5,
              "cross_attn.out_proj": width ** -0.5 * (2 * depth) ** -0.5, "mlm_head.dense": (2 * width) ** -0.5,
              "mlm_head.fc": width ** -0.5 * (2 * depth) ** -0.5}
    for name, std in expect.items():
        module = heads
        for part in name.split("."):
            module = getattr(module, part)
        kernel = np.asarray(module.kernel[...])
        assert abs(kernel.std() / std - 1) < 0.05, name
        assert np.all(np.asarray(module.bias[...]) == 0), name


def test_finetune_step_trains_heads_and_reports_each_loss(tmp_path):
    """The `finetune` variant's step on a tiny model: SDM + ID + MLM, every head parameter moves."""
    from tests.test_train import tiny_config
    from reid_jax.data import build
    from reid_jax.train import tde_nam

    build.build("synthetic_pedestrians", tmp_path / "tfds", config="small")
    c = tiny_config(tmp_path / "tfds")
    c.nam.mode = "none"
    c.loss.update({"id_weight": 1.0, "mlm_weight": 1.0, "mlm_depth": 1, "itc_weight": 0.0})  # the finetune terms
    task = tde_nam.Task(c, tmp_path)
    graphdef, state = nnx.split(task.init_state())
    before = nnx.state(nnx.merge(graphdef, state).heads, nnx.Param)
    batch = next(iter(task.train_stream(__import__("reid_jax.data.pipeline", fromlist=["Shard"]).Shard())))

    @jax.jit
    def step(state, batch):
        ts = nnx.merge(graphdef, state)
        metrics = task.train_step(ts, device.prepare_images(batch, c.data.aug, jax.random.key(0)),
                                  jax.random.key(0))
        return nnx.state(ts), metrics

    state, metrics = step(state, batch)
    assert set(metrics) >= {"loss", "loss_sdm", "loss_id", "loss_mlm"}
    assert_close(float(metrics["loss"]), sum(float(metrics[k]) for k in ("loss_sdm", "loss_id", "loss_mlm")), 1e-6,
                 "loss = sum of its parts")
    # ID loss at initialisation: classifier std 0.001 gives near-uniform logits, CE ~ log(classes)
    classes = len(np.unique(task.index.pids))
    assert abs(float(metrics["loss_id"]) - np.log(classes)) < 0.05
    after = nnx.state(nnx.merge(graphdef, state).heads, nnx.Param)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after)
    assert all(jax.tree.leaves(moved))
