"""MUVA (Li, Gong, Zhang): CLIP's image tower with part tokens, adaptively masked self-attention (AM-MSA) and a
region mask predictor (RMP) in every block (docs/muva.md, 'Region mask predictor (RMP) and AM-MSA').

Tokens: [CLS, R part tokens (head, upper body, legs), L patches]; the part tokens share CLS's position embedding
(`clip.VisionConfig.num_extra_tokens`). In block l:
  1. RMP_l reads the block's input tokens: LN(part tokens) cross-attend (2 heads, no bias) to LN(patches), plus a
     residual, then MLP(LN): width -> L -> L with QuickGELU gives per-patch logits [B, R, L];
  2. the logits accumulate over the blocks; mask_l = sigmoid(accumulated logits) > 0.5, a hard gate that passes no
     gradient (the RMP learns from the mask loss on its logits only);
  3. the block's self-attention gets the AM-MSA additive mask of mask_l (`am_msa_bias`).
Image feature: CLS and the part tokens, each through ln_post and proj, concatenated: [B, (1 + R) E].

Masks can also be given (`masks=`, bool [B, R, L]) instead of predicted: the pseudo masks of the part boxes in
stage 1, or fixed horizontal bands (the "part tokens with fixed masks" ablation). R = 0 is plain CLIP (CLS only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reid_jax.models import clip as clip_lib
from reid_jax.models import posemb
from reid_jax.models.attention import CrossAttention

Array = jax.Array
BLOCKED = -1e9  # additive attention bias of a pair that may not attend (finite: a fully masked row stays finite)


def am_msa_bias(mask: Array) -> Array:
    """Part-to-patch mask bool [B, R, L] -> additive attention bias float32 [B, 1, T, T], T = 1 + R + L.

    Every token sees CLS and CLS sees every token; a part token sees itself (not the other parts) and the patches
    of its mask; a patch sees every patch and the parts whose mask holds it.
    """
    b, r, num_patches = mask.shape
    part_patch = jnp.where(mask, 0.0, BLOCKED)  # [B, R, L]
    parts = jnp.where(jnp.eye(r, dtype=bool), 0.0, BLOCKED)  # [R, R]
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


class RMP(nnx.Module):
    """Region mask predictor of one block: part tokens [B, R, D], patches [B, L, D] -> logits [B, R, L]."""

    def __init__(self, width: int, num_patches: int, heads: int, cfg: clip_lib.CLIPConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        init = jax.nn.initializers.normal
        self.ln_q = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.ln_kv = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.attn = CrossAttention(width, heads, width ** -0.5, dt, rngs=rngs, use_bias=False)
        self.ln_mlp = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.fc1 = nnx.Linear(width, num_patches, dtype=dt, kernel_init=init(width ** -0.5), rngs=rngs)
        self.fc2 = nnx.Linear(num_patches, num_patches, dtype=dt, kernel_init=init(num_patches ** -0.5),
                              rngs=rngs)

    def __call__(self, parts: Array, patches: Array) -> Array:
        x = parts + self.attn(self.ln_q(parts), self.ln_kv(patches))
        return self.fc2(clip_lib.quick_gelu(self.fc1(self.ln_mlp(x)))).astype(jnp.float32)


class MUVAModel(nnx.Module):
    """`clip` must have `vision.num_extra_tokens` = the number of parts R (0 = CLS only, no RMP)."""

    def __init__(self, clip: clip_lib.CLIP, rmp_heads: int = 2, *, rngs: nnx.Rngs):
        self.clip = clip
        v = clip.config.vision
        self.num_parts = v.num_extra_tokens
        gh, gw = v.grid
        self.rmp = nnx.List([RMP(v.width, gh * gw, rmp_heads, clip.config, rngs=rngs) for _ in range(v.layers)]
                            if self.num_parts else [])

    def encode(self, images: Array, masks: Array | None = None) -> tuple[Array, Array | None]:
        """images [B, H, W, 3] -> (feature [B, (1 + R) E] float32, accumulated RMP logits [layers, B, R, L] or
        None when `masks` (bool [B, R, L]) are given or R = 0)."""
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
                return am_msa_bias(jax.lax.stop_gradient(jax.nn.sigmoid(logits[-1]) > 0.5))
        tokens, _ = self.clip.visual(images, attn_bias=bias)
        feats = self.clip.visual.project(tokens[:, : 1 + r]).astype(jnp.float32)  # [B, 1 + R, E]
        return feats.reshape(feats.shape[0], -1), (jnp.stack(logits) if logits else None)

    def image_features(self, images: Array, masks: Array | None = None) -> Array:
        """The test feature [B, (1 + R) E] (before the BNNeck), with the RMP's own masks unless given."""
        return self.encode(images, masks)[0]
