"""Cross-attention pieces shared by the methods' heads: IRRA's cross-modal MLM head, CLIP-SCGI's CGI and CFF
modules, and MUVA's region mask predictor.

`CrossAttention` is torch.nn.MultiheadAttention with distinct queries and keys/values (batch first) and its fused
in-projection (`in_proj` [D, 3D]: q, k, v), so PyTorch weights map one to one. `CrossBlock` is the pre-LN
transformer block built on it: q + attn(ln_q(q), ln_kv(kv)), then + mlp(ln(.)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from reid_jax.models import clip as clip_lib

Array = jax.Array


class CrossAttention(nnx.Module):
    def __init__(self, width: int, heads: int, proj_std: float, dtype, *, rngs: nnx.Rngs, use_bias: bool = True):
        self.heads = heads
        init = jax.nn.initializers.normal
        self.in_proj = nnx.Linear(width, 3 * width, dtype=dtype, use_bias=use_bias, kernel_init=init(width ** -0.5),
                                  rngs=rngs)
        self.out_proj = nnx.Linear(width, width, dtype=dtype, use_bias=use_bias, kernel_init=init(proj_std),
                                   rngs=rngs)

    def __call__(self, q: Array, kv: Array, mask: Array | None = None) -> Array:
        """q: [B, L, D], kv: [B, T, D], mask: bool [B, T] (False = key ignored) -> [B, L, D]."""
        (b, lq, d), t = q.shape, kv.shape[1]
        dt = self.in_proj.dtype
        w = self.in_proj.kernel[...].astype(dt)
        queries, kv_proj = q.astype(dt) @ w[:, :d], kv.astype(dt) @ w[:, d:]
        if self.in_proj.bias is not None:
            bias = self.in_proj.bias[...].astype(dt)
            queries, kv_proj = queries + bias[:d], kv_proj + bias[d:]
        h = self.heads
        keys, values = jnp.split(kv_proj.reshape(b, t, 2 * h, d // h), 2, axis=2)
        mask = None if mask is None else mask[:, None, None, :]
        out = jax.nn.dot_product_attention(queries.reshape(b, lq, h, d // h), keys, values, mask=mask)
        return self.out_proj(out.reshape(b, lq, d))


class CrossBlock(nnx.Module):
    """Pre-LN cross-attention block with CLIP's init and QuickGELU MLP (hidden = mlp_ratio x width)."""

    def __init__(self, width: int, heads: int, depth: int, cfg: clip_lib.CLIPConfig, *, rngs: nnx.Rngs,
                 mlp_ratio: int = 4):
        proj_std = width ** -0.5 * (2 * depth) ** -0.5
        self.ln_q = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.ln_kv = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.attn = CrossAttention(width, heads, proj_std, jnp.dtype(cfg.dtype), rngs=rngs)
        self.ln_2 = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.mlp = clip_lib.MLP(width, mlp_ratio * width, proj_std, cfg, rngs=rngs)

    def __call__(self, q: Array, kv: Array, mask: Array | None = None) -> Array:
        """q: [B, L, D], kv: [B, T, D], mask: bool [B, T] -> [B, L, D]."""
        q = q + self.attn(self.ln_q(q), self.ln_kv(kv), mask)
        return q + self.mlp(self.ln_2(q))
