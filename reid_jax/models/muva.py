"""MUVA (Li, Gong, Zhang): CLIP's image tower with part tokens, adaptively masked self-attention (AM-MSA), a
region mask predictor (RMP) in every block and a BNNeck (docs/muva.md, 'Region mask predictor (RMP) and AM-MSA').

Tokens: [CLS, R part tokens (head, upper body, legs), L patches]; the part tokens share CLS's position embedding
(`clip.VisionConfig.num_extra_tokens`). In block l:
  1. RMP_l reads the block's input tokens: LN(part tokens) cross-attend to LN(patches) (q/k/v without bias, the
     output projection with one), plus the part tokens (the inner shortcut), then MLP(LN): width -> L -> L with
     QuickGELU gives per-patch logits [B, R, L] (`RMPConfig` switches the LayerNorms and the shortcut);
  2. the logits accumulate over the blocks; mask_l = sigmoid(accumulated logits / tau) > threshold, a hard gate
     that passes no gradient (the RMP learns from the mask loss on its logits only);
  3. the block's self-attention gets the AM-MSA additive mask of mask_l (`am_msa_bias`).
Image feature f: CLS and the part tokens, each through ln_post and proj, concatenated: [B, (1 + R) E]; the test
feature is BN(f) with the running statistics (`image_features`), as the authors' `infer_image(after_bn=True)`.

Masks can also be given (`masks=`, bool [B, R, L]) instead of predicted: the pseudo masks in stage 1 and the
memory rebuild, or fixed horizontal bands (the "part tokens with fixed masks" ablation). R = 0 is plain CLIP.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reid_jax.models import clip as clip_lib
from reid_jax.models import posemb
from reid_jax.models.heads import BatchNorm1d

Array = jax.Array
# Additive attention bias of a pair that may not attend. The authors use -inf; every row keeps CLS open, so the
# softmax of either is the same (exp(-1e9 - max) is 0 in float32) and a finite value keeps gradients finite.
BLOCKED = -1e9


def am_msa_bias(mask: Array) -> Array:
    """Part-to-patch mask bool [B, R, L] -> additive attention bias float32 [B, 1, T, T], T = 1 + R + L.

    Every token sees CLS and CLS sees every token; a part token sees itself (not the other parts) and the patches
    of its mask; a patch sees every patch and the parts whose mask holds it.
    """
    b, r, num_patches = mask.shape
    part_patch = jnp.where(mask, 0.0, BLOCKED)  # [B, R, L]
    parts = jnp.where(np.eye(r, dtype=bool), 0.0, BLOCKED)  # [R, R], a constant (ONNX has no boolean EyeLike)
    cls_col = lambda n: jnp.zeros((b, n, 1))  # noqa: E731
    rows = [jnp.zeros((b, 1, 1 + r + num_patches)),  # CLS row
            jnp.concatenate([cls_col(r), jnp.broadcast_to(parts, (b, r, r)), part_patch], axis=2),
            jnp.concatenate([cls_col(num_patches), part_patch.transpose(0, 2, 1),
                             jnp.zeros((b, num_patches, num_patches))], axis=2)]
    return jnp.concatenate(rows, axis=1)[:, None]


def boxes_to_masks(boxes: Array, image_size: tuple[int, int], patch_size: int, stride: int) -> Array:
    """Normalised part boxes float [B, R, 4] (x0, y0, x1, y1; x0 < 0 = absent) -> bool [B, R, L] patch masks,
    row-major over the grid. Patch (i, j) belongs to a box when its centre (j*s + p/2, i*s + p/2) lies in it,
    half-open [x0, x1) x [y0, y1): with a stride below the patch size patches overlap, and the centre still gives
    each patch one answer, so boxes that tile the image give masks that tile the grid. In jnp: it runs in the
    step, on the boxes as augmented with their image."""
    h, w = image_size
    rows, cols = posemb.grid_size(image_size, patch_size, stride)
    cy = (jnp.arange(rows) * stride + patch_size / 2) / h
    cx = (jnp.arange(cols) * stride + patch_size / 2) / w
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))
    in_y = (cy >= y0) & (cy < y1)  # [B, R, rows]
    in_x = (cx >= x0) & (cx < x1)  # [B, R, cols]
    mask = (in_y[..., :, None] & in_x[..., None, :]).reshape(*boxes.shape[:-1], rows * cols)
    return mask & (boxes[..., 0, None] >= 0)


def band_masks(bands, grid: tuple[int, int]) -> np.ndarray:
    """Fixed horizontal bands ((y0, y1) fractions per part) -> bool [R, rows * cols] by patch centre."""
    rows, cols = grid
    cy = (np.arange(rows) + 0.5) / rows
    return np.stack([np.repeat((cy >= y0) & (cy < y1), cols) for y0, y1 in bands])


@dataclasses.dataclass(frozen=True)
class RMPConfig:
    """The mask predictor's settings (config.muva.rmp); defaults are the authors' published configs."""
    heads: int = 2  # 2 for MA -> MS, 8 for MS -> MA
    layer_norm: bool = True  # LN on the part tokens, the patches and before the MLP
    inner_shortcut: bool = True  # the part tokens added back after the cross-attention
    tau: float = 1.0  # mask probability = sigmoid(logits / tau)
    threshold: float = 0.5  # a patch is in a part's mask when its probability exceeds this


def _torch_linear(din: int, dout: int, use_bias: bool, dt, rngs: nnx.Rngs, zero_bias: bool = True) -> nnx.Linear:
    """Linear with weights N(0, 0.02) (the authors' trunc_normal_ with absolute bounds +-2 never truncates at this
    std); the bias 0, or torch's default U(+-1/sqrt(din)) where the authors leave it (`zero_bias=False`)."""
    bound = din ** -0.5
    bias_init = jax.nn.initializers.zeros if zero_bias else (
        lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound))
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dt, kernel_init=jax.nn.initializers.normal(0.02),
                      bias_init=bias_init, rngs=rngs)


class RMPAttention(nnx.Module):
    """Multi-head cross-attention of the RMP: q from the parts [B, R, D], k/v from the patches [B, L, D] -> [B, R, D].
    Separate q/k/v projections without bias and an output projection with bias, as the authors' module."""

    def __init__(self, width: int, heads: int, dt, *, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"the RMP's width {width} is not divisible by its {heads} heads")
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (_torch_linear(width, width, False, dt, rngs) for _ in range(3))
        self.to_out = _torch_linear(width, width, True, dt, rngs, zero_bias=False)

    def __call__(self, parts: Array, patches: Array) -> Array:
        (b, r, d), h = parts.shape, self.heads
        split = lambda x: x.reshape(b, x.shape[1], h, d // h)  # noqa: E731
        out = jax.nn.dot_product_attention(split(self.to_q(parts)), split(self.to_k(patches)),
                                           split(self.to_v(patches)))
        return self.to_out(out.reshape(b, r, d))


class RMP(nnx.Module):
    """Region mask predictor of one block: part tokens [B, R, D], patches [B, L, D] -> logits [B, R, L]."""

    def __init__(self, width: int, num_patches: int, settings: RMPConfig, cfg: clip_lib.CLIPConfig, *,
                 rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        norm = (lambda: clip_lib.LayerNorm(width, cfg, rngs=rngs)) if settings.layer_norm else (lambda: None)
        self.ln_q, self.ln_kv, self.ln_mlp = norm(), norm(), norm()
        self.attn = RMPAttention(width, settings.heads, dt, rngs=rngs)
        self.fc1 = _torch_linear(width, num_patches, True, dt, rngs)
        self.fc2 = _torch_linear(num_patches, num_patches, True, dt, rngs)
        self.inner_shortcut = settings.inner_shortcut

    def __call__(self, parts: Array, patches: Array) -> Array:
        ln = lambda m, x: x if m is None else m(x)  # noqa: E731
        x = self.attn(ln(self.ln_q, parts), ln(self.ln_kv, patches))
        if self.inner_shortcut:
            x = x + parts
        return self.fc2(clip_lib.quick_gelu(self.fc1(ln(self.ln_mlp, x)))).astype(jnp.float32)


class MUVAModel(nnx.Module):
    """`clip` must have `vision.num_extra_tokens` = the number of parts R (0 = CLS only, no RMP). `bnneck` is the
    BatchNorm of the image feature (its shift kept frozen): in the model because the test feature is its output."""

    def __init__(self, clip: clip_lib.CLIP, rmp: RMPConfig = RMPConfig(), *, rngs: nnx.Rngs):
        self.clip = clip
        v = clip.config.vision
        self.num_parts = v.num_extra_tokens
        self.tau, self.threshold = rmp.tau, rmp.threshold
        gh, gw = v.grid
        self.rmp = nnx.List([RMP(v.width, gh * gw, rmp, clip.config, rngs=rngs) for _ in range(v.layers)]
                            if self.num_parts else [])
        self.bnneck = BatchNorm1d((1 + self.num_parts) * clip.config.embed_dim, bias=True)

    def mask_probs(self, logits: Array) -> Array:
        """Accumulated RMP logits -> mask probabilities sigmoid(logits / tau), same shape."""
        return jax.nn.sigmoid(logits / self.tau)

    def encode(self, images: Array, masks: Array | None = None) -> tuple[Array, Array | None]:
        """images [B, H, W, 3] -> (feature f [B, (1 + R) E] float32 before the BNNeck, accumulated RMP logits
        [layers, B, R, L] or None when `masks` (bool [B, R, L]) are given or R = 0)."""
        r = self.num_parts
        if r == 0:
            bias, logits = None, []
        elif masks is not None:
            bias, logits = am_msa_bias(masks), []
        else:
            logits = []

            def bias(i: int, x: Array) -> Array:  # called by the transformer before block i
                step = self.rmp[i](x[:, 1: 1 + r], x[:, 1 + r:])
                logits.append(step if not logits else logits[-1] + step)
                return am_msa_bias(jax.lax.stop_gradient(self.mask_probs(logits[-1]) > self.threshold))
        tokens, _ = self.clip.visual(images, attn_bias=bias)
        feats = self.clip.visual.project(tokens[:, : 1 + r]).astype(jnp.float32)  # [B, 1 + R, E]
        return feats.reshape(feats.shape[0], -1), (jnp.stack(logits) if logits else None)

    def image_features(self, images: Array, masks: Array | None = None, after_bn: bool = True) -> Array:
        """The test feature [B, (1 + R) E]: BN(f) with the running statistics (`after_bn`, the authors' default)
        or f itself, with the RMP's own masks unless given."""
        feats = self.encode(images, masks)[0]
        return self.bnneck(feats, use_running_average=True) if after_bn else feats
