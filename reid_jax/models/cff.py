"""CLIP-SCGI's contextual feature fusion (CFF; Han et al.): the image's CLS token attends to the pseudo-word
embeddings from CGI and to the image's own patch tokens; the fused feature is trained with the ID and triplet
losses, so the gradient that reaches the image encoder through CLS and the patches favours regions consistent with
the caption. Training only: inference uses the image encoder's own features.

Open choices (the paper describes a cross-attention fusion, no more): the query is CLS (so the fused feature is
a refined global feature), keys/values are [pseudo-words mapped to the vision width; patch tokens], `depth`
pre-LN cross-attention blocks, a final LayerNorm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from reid_jax.models import clip as clip_lib
from reid_jax.models.attention import CrossBlock

Array = jax.Array


class CFF(nnx.Module):
    """CLS [B, Dv], patch tokens [B, P, Dv], pseudo-words [B, Nq, Dt] -> fused feature [B, Dv] (float32)."""

    def __init__(self, cfg: clip_lib.CLIPConfig, depth: int, *, rngs: nnx.Rngs, head_width: int = 64):
        width = cfg.vision.width
        self.word_proj = nnx.Linear(cfg.text.width, width, dtype=jnp.dtype(cfg.dtype),
                                    kernel_init=jax.nn.initializers.normal(cfg.text.width ** -0.5), rngs=rngs)
        self.blocks = nnx.List([CrossBlock(width, max(1, width // head_width), depth, cfg, rngs=rngs)
                                for _ in range(depth)])
        self.ln_out = clip_lib.LayerNorm(width, cfg, rngs=rngs)

    def __call__(self, cls: Array, patches: Array, words: Array) -> Array:
        kv = jnp.concatenate([self.word_proj(words).astype(patches.dtype), patches], axis=1)
        q = cls[:, None].astype(patches.dtype)
        for block in self.blocks:
            q = block(q, kv)
        return self.ln_out(q[:, 0]).astype(jnp.float32)
