"""CLIP (ViT image tower + causal text tower) in Flax NNX, shaped for person re-identification.

Parameter names follow OpenAI's CLIP (`conv1`, `ln_pre`, `transformer.resblocks.{i}.attn.in_proj`, ...), so the
mapping from PyTorch checkpoints in `reid_jax.weights` is mechanical. Parameters are float32; `config.dtype` is the
compute dtype (bfloat16 on accelerators). LayerNorm always runs in float32, as in OpenAI's code.

What the three methods need beyond plain CLIP:
  * every block's token sequence (`return_layers=True`): NAM reads layer 10, MUVA and CGI work per layer;
  * an additive attention bias per layer (`attn_bias`): MUVA's AM-MSA, whose mask at layer l depends on the
    tokens of layer l-1, hence the callable form `attn_bias(layer_index, tokens)`;
  * extra learnable tokens after CLS, sharing CLS's position embedding (MUVA's part tokens);
  * ReID input sizes and CLIP-ReID's overlapping patch stride (the position grid is resized at load time);
  * text given as token embeddings instead of ids (learnable prompts, CGI's pseudo-words).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reid_jax.models import cpu_attention, dense
from reid_jax.models import posemb as posemb_lib

Array = jax.Array
# None, one bias for every layer ([B|1, heads|1, T, T]), one per layer, or a function of (layer index, tokens).
AttnBias = Array | Sequence[Array | None] | Callable[[int, Array], Array | None] | None

ACTIVATIONS = ("quick_gelu", "gelu")
ATTENTION = ("", "xla", "cudnn")


# ----------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class VisionConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    image_size: tuple[int, int] = (224, 224)  # (H, W) of the model's input
    stride: int = 16  # < patch_size gives CLIP-ReID's overlapping patches
    num_extra_tokens: int = 0  # learnable tokens after CLS (MUVA's part tokens)

    @property
    def grid(self) -> tuple[int, int]:
        return posemb_lib.grid_size(self.image_size, self.patch_size, self.stride)

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid
        return 1 + self.num_extra_tokens + gh * gw


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = 512
    activation: str = "quick_gelu"  # OpenAI weights; LAION's open_clip models use "gelu"
    ln_epsilon: float = 1e-5
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False  # rematerialise each block in the backward pass (saves activation memory)
    # Run the blocks as one lax.scan over their stacked parameters instead of unrolled: one block is compiled
    # instead of L (faster compilation of deep models), but stacking the parameters costs a copy per step and
    # XLA:CPU runs the unrolled step faster (ViT-B/16 batch 8: 6.6 s unrolled, 7.0 s scanned; the demo model
    # 0.33 s vs 0.39 s: `python -m reid_jax.bench train_step [--scan]`). Parameter names and checkpoints are
    # the same either way; a callable attn_bias always unrolls.
    scan_layers: bool = False
    # jax.nn.dot_product_attention implementation: "xla", "cudnn" (NVIDIA's fused flash kernel, 16-bit compute
    # only) or "" = cuDNN on an NVIDIA GPU (compute capability >= 8.0) with a 16-bit compute dtype, XLA elsewhere.
    attention: str = ""
    # Pad each tower's token sequence to a multiple of this, with the pad keys masked out (key_value_seq_lengths;
    # causal masking already hides them from the text's real tokens) and sliced off after the blocks: outputs are
    # unchanged. cuDNN's kernel needs it: JAX (0.10) rejects odd lengths in training (193 image tokens at
    # 384x128/16, 77 text tokens) as it would with a bias. 0 = 2 with cuDNN, no padding with XLA.
    pad_tokens_to: int = 0

    @classmethod
    def vit_b16(cls, image_size=(224, 224), stride=16, **kw) -> CLIPConfig:
        """OpenAI's ViT-B/16 CLIP at the given input size and patch stride."""
        return cls(vision=VisionConfig(image_size=tuple(image_size), stride=stride), **kw)

    @classmethod
    def tiny(cls, image_size=(32, 16), stride=4, **kw) -> CLIPConfig:
        """A few-thousand-parameter CLIP for fast tests, same structure as ViT-B/16."""
        vision = VisionConfig(width=32, layers=2, heads=2, mlp_dim=64, patch_size=4,
                              image_size=tuple(image_size), stride=stride)
        text = TextConfig(context_length=16, width=32, layers=2, heads=2, mlp_dim=64)
        return cls(vision=vision, text=text, embed_dim=24, **kw)

    def replace(self, **kw) -> CLIPConfig:
        """Copy with top-level fields or `vision={...}` / `text={...}` sub-field updates."""
        for name in ("vision", "text"):
            if isinstance(kw.get(name), dict):
                kw[name] = dataclasses.replace(getattr(self, name), **kw[name])
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        d = dict(d)
        vision = dict(d.pop("vision"))
        vision["image_size"] = tuple(vision["image_size"])
        return cls(vision=VisionConfig(**vision), text=TextConfig(**d.pop("text")), **d)

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION} ('' = cuDNN on NVIDIA GPUs with bfloat16, "
                             f"else XLA), got {self.attention!r}")
        if self.pad_tokens_to < 0:
            raise ValueError(f"pad_tokens_to must be >= 0 (0 = as the attention needs), got {self.pad_tokens_to}")
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if tower.width % tower.heads:
                raise ValueError(f"{name}.width {tower.width} is not divisible by {name}.heads {tower.heads}")
        posemb_lib.grid_size(self.vision.image_size, self.vision.patch_size, self.vision.stride)  # image >= patch


# ----------------------------------------------------------------------------------------------------- blocks
def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


def attention_implementation(cfg: CLIPConfig, head_dim: int) -> str:
    """The `jax.nn.dot_product_attention` implementation a tower uses: `cfg.attention`, or for "" cuDNN where its
    fused kernel applies (an NVIDIA GPU of compute capability >= 8.0, a 16-bit compute dtype, a head dim that is a
    multiple of 8 and <= 128) and XLA elsewhere."""
    return _choose_attention(cfg.attention, cfg.dtype, head_dim)


def _choose_attention(requested: str, dtype, head_dim: int) -> str:
    if requested:
        return requested
    device = jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in getattr(device.client, "platform_version", "").lower():
        return "xla"
    capability = tuple(int(v) for v in str(getattr(device, "compute_capability", "0.0")).split("."))
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if half and capability >= (8, 0) and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def set_compute_dtype(model: nnx.Module, dtype) -> None:
    """Sets the compute dtype of every module of `model` that has one, except LayerNorm and BatchNorm (float32 as
    in training), then chooses each attention's implementation and each tower's padding again for it: a model built
    in float32 and run in bfloat16 on a GPU then gets cuDNN's kernel as one built in bfloat16 does."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "dtype") and not isinstance(module, (nnx.LayerNorm, nnx.BatchNorm)):
            module.dtype = jnp.dtype(dtype)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Attention):
            head_dim = module.in_proj.kernel.shape[0] // module.heads
            module.implementation = _choose_attention(module.requested, dtype, head_dim)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Transformer):
            module.pad_tokens_to = module._pad()


def padded_length(tokens: int, multiple: int) -> int:
    """`tokens` rounded up to a multiple of `multiple`."""
    return -(-tokens // multiple) * multiple


def _normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


def _linear(d_in: int, d_out: int, dtype, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    """A dense layer with OpenAI's normal init, whose bfloat16 products stay on XLA:CPU's fast kernels."""
    return dense.Linear(d_in, d_out, dtype=dtype, kernel_init=_normal(std), rngs=rngs)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 whatever the compute dtype; returns the compute dtype."""

    def __init__(self, dim: int, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, epsilon=cfg.ln_epsilon, dtype=jnp.float32, rngs=rngs)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: Array) -> Array:
        return self.norm(x.astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with OpenAI's fused q/k/v projection (`in_proj`)."""

    def __init__(self, width: int, heads: int, proj_std: float, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.heads = heads
        self.requested = cfg.attention  # kept so that set_compute_dtype can choose again
        self.implementation = attention_implementation(cfg, width // heads)
        self.in_proj = _linear(width, 3 * width, dt, width ** -0.5, rngs)
        self.out_proj = _linear(width, width, dt, proj_std, rngs)

    def __call__(self, x: Array, bias: Array | None = None, is_causal: bool = False,
                 keys: int | None = None) -> Array:
        """x: [B, T, D]; bias: additive, broadcastable to [B, heads, T, T]; `keys`: only the first `keys` tokens
        are attended to (the rest is padding) -> [B, T, D]."""
        b, t, d = x.shape
        q, k, v = jnp.split(self.in_proj(x).reshape(b, t, 3 * self.heads, d // self.heads), 3, axis=2)
        if self.implementation == "xla" and jax.default_backend() == "cpu":
            out = cpu_attention.attention(q, k, v, bias, is_causal, keys)  # a faster backward on XLA:CPU
        else:
            if bias is not None:
                bias = jnp.broadcast_to(bias, (b, self.heads, t, t)).astype(q.dtype)
            lengths = None if keys is None else jnp.full((b,), keys, jnp.int32)
            out = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=is_causal,
                                               key_value_seq_lengths=lengths, implementation=self.implementation)
        return self.out_proj(out.reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, proj_std: float, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.c_fc = _linear(width, hidden, dt, (2 * width) ** -0.5, rngs)
        self.c_proj = _linear(hidden, width, dt, proj_std, rngs)
        # "gelu" is the exact erf form, as torch's nn.GELU in open_clip and HF's "gelu".
        self.act = quick_gelu if cfg.activation == "quick_gelu" else partial(jax.nn.gelu, approximate=False)

    def __call__(self, x: Array) -> Array:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, layers: int, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        proj_std = width ** -0.5 * (2 * layers) ** -0.5  # OpenAI's init, scaled by depth
        self.ln_1 = LayerNorm(width, cfg, rngs=rngs)
        self.attn = Attention(width, heads, proj_std, cfg, rngs=rngs)
        self.ln_2 = LayerNorm(width, cfg, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, proj_std, cfg, rngs=rngs)

    def __call__(self, x: Array, bias: Array | None = None, is_causal: bool = False,
                 keys: int | None = None) -> Array:
        x = x + self.attn(self.ln_1(x), bias, is_causal, keys)
        return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.resblocks = nnx.List([ResidualBlock(width, heads, mlp_dim, layers, cfg, rngs=rngs)
                                   for _ in range(layers)])
        self.remat = cfg.remat
        self.scan_layers = cfg.scan_layers
        self.requested_pad = cfg.pad_tokens_to
        self.pad_tokens_to = self._pad()

    def _pad(self) -> int:
        """cfg.pad_tokens_to, or for 0 what the blocks' attention needs (2 for cuDNN, no padding for XLA)."""
        return self.requested_pad or (2 if self.resblocks[0].attn.implementation == "cudnn" else 1)

    def __call__(self, x: Array, attn_bias: AttnBias = None, is_causal: bool = False,
                 return_layers: bool = False) -> tuple[Array, tuple[Array, ...]]:
        """x: [B, T, D] -> (last block's output [B, T, D], every block's output if return_layers else ())."""
        t = x.shape[1]
        padded = padded_length(t, self.pad_tokens_to)
        if padded != t:  # pad tokens at the end: masked as keys, never read back
            x = jnp.pad(x, ((0, 0), (0, padded - t), (0, 0)))
            attn_bias = _pad_bias(attn_bias, t, padded)
        keys = None if padded == t or is_causal else t  # causal masking already hides the pad from real tokens
        if self.scan_layers and _stackable(attn_bias):
            x, layers = self._scan(x, attn_bias, is_causal, keys, return_layers)
        else:
            x, layers = self._unrolled(x, attn_bias, is_causal, keys, return_layers)
        if padded != t:
            x, layers = x[:, :t], tuple(y[:, :t] for y in layers)
        return x, layers

    def _unrolled(self, x: Array, attn_bias, is_causal: bool, keys: int | None, return_layers: bool):
        layers = []
        for i, block in enumerate(self.resblocks):
            call = nnx.remat(type(block).__call__, static_argnums=(3, 4)) if self.remat else type(block).__call__
            x = call(block, x, _layer_bias(attn_bias, i, x), is_causal, keys)
            if return_layers:
                layers.append(x)
        return x, tuple(layers)

    def _scan(self, x: Array, attn_bias, is_causal: bool, keys: int | None, return_layers: bool):
        """The same blocks as one lax.scan: their parameters are stacked along a new leading [L] axis for the
        call (the gradient flows back to each block's own parameters), a per-layer bias list likewise."""
        graphdef, _ = nnx.split(self.resblocks[0])
        stacked = jax.tree.map(lambda *p: jnp.stack(p), *[nnx.state(b) for b in self.resblocks])
        per_layer = attn_bias is not None and not isinstance(attn_bias, jax.Array | np.ndarray)
        biases = jnp.stack([jnp.asarray(b) for b in attn_bias]) if per_layer else None

        def body(h, layer):
            state, bias = layer
            h = nnx.merge(graphdef, state)(h, bias if per_layer else attn_bias, is_causal, keys)
            return h, (h if return_layers else None)

        body = jax.checkpoint(body) if self.remat else body
        x, ys = jax.lax.scan(body, x, (stacked, biases))
        return x, tuple(ys) if return_layers else ()


def _pad_bias(attn_bias: AttnBias, t: int, padded: int) -> AttnBias:
    """An attention bias over T tokens as one over the padded sequence (zero on the pad, whose keys are masked);
    a callable bias still sees the unpadded tokens."""
    def pad(b):
        if b is None:
            return None
        b = jnp.asarray(b)
        return jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, padded - t if n == t else 0) for n in b.shape[-2:]])

    if attn_bias is None or isinstance(attn_bias, jax.Array | np.ndarray):
        return pad(attn_bias)
    if callable(attn_bias):
        return lambda i, x: pad(attn_bias(i, x[:, :t]))
    return [pad(b) for b in attn_bias]


def _stackable(attn_bias: AttnBias) -> bool:
    """Whether the scan can carry this bias: none, one for every layer, or a list with one array per layer."""
    if attn_bias is None or isinstance(attn_bias, jax.Array | np.ndarray):
        return True
    return not callable(attn_bias) and all(b is not None for b in attn_bias)


def _layer_bias(attn_bias: AttnBias, i: int, x: Array) -> Array | None:
    if attn_bias is None or isinstance(attn_bias, jax.Array | np.ndarray):
        return attn_bias
    if callable(attn_bias):
        return attn_bias(i, x)
    return attn_bias[i]


# ----------------------------------------------------------------------------------------------------- towers
class VisionTower(nnx.Module):
    """ViT: patches -> [CLS, extra tokens, patches] + position -> ln_pre -> blocks; `project` = ln_post + proj."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        v = cfg.vision
        self.cfg = v
        self.dtype = jnp.dtype(cfg.dtype)
        self.conv1 = nnx.Conv(3, v.width, (v.patch_size, v.patch_size), (v.stride, v.stride), padding="VALID",
                              use_bias=False, dtype=self.dtype, rngs=rngs)
        scale = v.width ** -0.5
        self.class_embedding = nnx.Param(_normal(scale)(rngs.params(), (v.width,)))
        gh, gw = v.grid
        self.positional_embedding = nnx.Param(_normal(scale)(rngs.params(), (1 + gh * gw, v.width)))
        if v.num_extra_tokens:
            self.extra_tokens = nnx.Param(_normal(scale)(rngs.params(), (v.num_extra_tokens, v.width)))
        self.ln_pre = LayerNorm(v.width, cfg, rngs=rngs)
        self.transformer = Transformer(v.width, v.layers, v.heads, v.mlp_dim, cfg, rngs=rngs)
        self.ln_post = LayerNorm(v.width, cfg, rngs=rngs)
        self.proj = nnx.Param(_normal(scale)(rngs.params(), (v.width, cfg.embed_dim)))

    def embed(self, images: Array, cls_offset: Array | None = None) -> Array:
        """images: [B, H, W, 3] normalised -> tokens [B, 1 + extra + gh*gw, D] after ln_pre. `cls_offset` [B, D] is
        added to the CLS token before ln_pre (CLIP-ReID's camera embedding, SIE)."""
        if tuple(images.shape[1:]) != (*self.cfg.image_size, 3):
            raise ValueError(f"images must be [B, {self.cfg.image_size[0]}, {self.cfg.image_size[1]}, 3] (NHWC) "
                             f"for this model, got {list(images.shape)}; resize them or build the model with "
                             f"image_size={tuple(images.shape[1:3])}")
        patches = self.conv1(images.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, self.cfg.width)
        pos = self.positional_embedding[...]
        cls = jnp.broadcast_to((self.class_embedding[...] + pos[0])[None, None], (b, 1, self.cfg.width))
        tokens = [cls if cls_offset is None else cls + cls_offset[:, None]]
        if self.cfg.num_extra_tokens:  # part tokens share CLS's position (MUVA)
            extra = (self.extra_tokens[...] + pos[0])[None]
            tokens.append(jnp.broadcast_to(extra, (b, *extra.shape[1:])))
        tokens.append(patches + pos[1:][None])
        return self.ln_pre(jnp.concatenate([t.astype(self.dtype) for t in tokens], axis=1))

    def __call__(self, images: Array, attn_bias: AttnBias = None, return_layers: bool = False,
                 cls_offset: Array | None = None) -> tuple[Array, tuple[Array, ...]]:
        """images: [B, H, W, 3] -> (tokens [B, T, D] before ln_post, per-block tokens if return_layers)."""
        return self.transformer(self.embed(images, cls_offset), attn_bias, return_layers=return_layers)

    def project(self, tokens: Array) -> Array:
        """[..., D] tokens (any layer) -> [..., embed_dim] through ln_post and proj."""
        return self.ln_post(tokens) @ self.proj[...].astype(self.dtype)


class TextTower(nnx.Module):
    """Causal transformer over 77 tokens; feature = the EOT token (largest id) through ln_final and proj."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        self.cfg = t
        self.dtype = jnp.dtype(cfg.dtype)
        self.token_embedding = nnx.Embed(t.vocab_size, t.width, embedding_init=_normal(0.02), rngs=rngs)
        self.positional_embedding = nnx.Param(_normal(0.01)(rngs.params(), (t.context_length, t.width)))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_dim, cfg, rngs=rngs)
        self.ln_final = LayerNorm(t.width, cfg, rngs=rngs)
        self.proj = nnx.Param(_normal(t.width ** -0.5)(rngs.params(), (t.width, cfg.embed_dim)))

    def embed(self, ids: Array, embeddings: Array | None = None) -> Array:
        """ids: int [B, L]; embeddings: optional [B, L, D] used instead of the id lookup -> [B, L, D]."""
        if ids.shape[-1] > self.cfg.context_length:
            raise ValueError(f"text has {ids.shape[-1]} tokens; this model's context_length is "
                             f"{self.cfg.context_length}")
        x = self.token_embedding(ids) if embeddings is None else embeddings
        return (x + self.positional_embedding[: x.shape[1]][None]).astype(self.dtype)

    def __call__(self, ids: Array, embeddings: Array | None = None, attn_bias: AttnBias = None,
                 return_layers: bool = False) -> tuple[Array, tuple[Array, ...]]:
        """ids: int [B, L] -> (tokens [B, L, D] before ln_final, per-block tokens if return_layers)."""
        x = self.embed(ids, embeddings)
        return self.transformer(x, attn_bias, is_causal=True, return_layers=return_layers)

    def project(self, tokens: Array) -> Array:
        """[..., D] tokens (any layer) -> [..., embed_dim] through ln_final and proj."""
        return self.ln_final(tokens) @ self.proj[...].astype(self.dtype)

    @staticmethod
    def eot_index(ids: Array) -> Array:
        """int [B, L] -> [B]: position of the end-of-text token, the largest id in OpenAI's layout."""
        return jnp.argmax(ids, axis=-1)


class CLIP(nnx.Module):
    """Both towers. `image_features` / `text_features` are traceable; `encode_*` are their jitted entry points."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.config = cfg
        self.visual = VisionTower(cfg, rngs=rngs)
        self.text = TextTower(cfg, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))

    def image_features(self, images: Array) -> Array:
        """[B, H, W, 3] -> [B, embed_dim]: projected CLS, not normalised, float32."""
        tokens, _ = self.visual(images)
        return self.visual.project(tokens[:, 0]).astype(jnp.float32)

    def text_features(self, ids: Array, embeddings: Array | None = None) -> Array:
        """int [B, L] (optionally with [B, L, D] embeddings) -> [B, embed_dim]: projected EOT, float32."""
        tokens, _ = self.text(ids, embeddings)
        return self.text_features_of(tokens, ids)

    def text_features_of(self, tokens: Array, ids: Array) -> Array:
        """The text tower's output tokens [B, L, D] of captions `ids` -> [B, embed_dim]: projected EOT, float32."""
        eot = jnp.take_along_axis(tokens, TextTower.eot_index(ids)[:, None, None], axis=1)[:, 0]
        return self.text.project(eot).astype(jnp.float32)

    def __call__(self, images: Array, ids: Array) -> tuple[Array, Array]:
        return self.image_features(images), self.text_features(ids)

    def encode_image(self, images) -> Array:
        """Jitted `image_features`; accepts numpy. float32 [B, H, W, 3] -> [B, embed_dim]."""
        return _encode_image(self, jnp.asarray(images, jnp.float32))

    def encode_text(self, ids) -> Array:
        """Jitted `text_features`; accepts numpy. int [B, L] -> [B, embed_dim]."""
        return _encode_text(self, jnp.asarray(ids, jnp.int32))


@nnx.jit
def _encode_image(model: CLIP, images: Array) -> Array:
    return model.image_features(images)


@nnx.jit
def _encode_text(model: CLIP, ids: Array) -> Array:
    return model.text_features(ids)
