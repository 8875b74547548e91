"""IRRA's training-only heads (Jiang & Ye, CVPR 2023), TDE+NAM's fine-tuning recipe (docs/tde_nam.md, 'Fine-tuning').

  * `classifier`: one linear layer over the projected image CLS and caption EOT features (the ID loss);
  * the cross-modal MLM head ("implicit relation reasoning"): the masked caption's projected tokens attend to
    the image's projected tokens (one cross-attention, *no* residual, as IRRA's `cross_former`), then a
    bidirectional transformer of `depth` blocks, `ln_post`, and `mlm_head` (dense, QuickGELU, LayerNorm, fc to
    the vocabulary).

Attribute names follow IRRA's (`cross_attn`, `cross_modal_transformer`, `ln_pre_t`, `ln_pre_i`, `ln_post`,
`mlm_head`, `classifier`), so its parameter groups ('cross', 'classifier', 'mlm_head' at 5x lr) are the same
regular expressions here. Initialisation is IRRA's: normal with std width^-0.5 (attention in-projections),
width^-0.5 (2 depth)^-0.5 (out-projections, mlm fc), (2 width)^-0.5 (MLP in, mlm dense), 0.001 (classifier).
Neither head runs at inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from reid_jax.models import clip as clip_lib
from reid_jax.models.attention import CrossAttention

Array = jax.Array


class MLMHead(nnx.Module):
    """dense -> QuickGELU -> LayerNorm -> fc: [B, L, D] -> logits [B, L, vocab]."""

    def __init__(self, width: int, vocab_size: int, proj_std: float, cfg: clip_lib.CLIPConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        init = jax.nn.initializers.normal
        self.dense = nnx.Linear(width, width, dtype=dt, kernel_init=init((2 * width) ** -0.5), rngs=rngs)
        self.ln = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.fc = nnx.Linear(width, vocab_size, dtype=dt, kernel_init=init(proj_std), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc(self.ln(clip_lib.quick_gelu(self.dense(x)))).astype(jnp.float32)


class IRRAHeads(nnx.Module):
    """ID classifier and cross-modal MLM head over a CLIP of `cfg` (width = cfg.embed_dim, heads = width / 64)."""

    def __init__(self, cfg: clip_lib.CLIPConfig, num_classes: int, depth: int, *, rngs: nnx.Rngs,
                 head_width: int = 64):
        width = cfg.embed_dim
        heads = max(1, width // head_width)
        dt = jnp.dtype(cfg.dtype)
        proj_std = width ** -0.5 * (2 * depth) ** -0.5
        self.classifier = nnx.Linear(width, num_classes, kernel_init=jax.nn.initializers.normal(0.001), rngs=rngs)
        self.cross_attn = CrossAttention(width, heads, proj_std, dt, rngs=rngs)
        self.cross_modal_transformer = clip_lib.Transformer(width, depth, heads, 4 * width, cfg, rngs=rngs)
        self.ln_pre_t = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.ln_pre_i = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.ln_post = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.mlm_head = MLMHead(width, cfg.text.vocab_size, proj_std, cfg, rngs=rngs)

    def id_logits(self, feats: Array) -> Array:
        """[B, embed_dim] -> [B, num_classes], float32."""
        return self.classifier(feats.astype(jnp.float32))

    def mlm_logits(self, text_tokens: Array, image_tokens: Array) -> Array:
        """Projected tokens of the masked caption [B, L, E] and of the image [B, T, E] -> logits [B, L, vocab]."""
        x = self.cross_attn(self.ln_pre_t(text_tokens), self.ln_pre_i(image_tokens))
        x, _ = self.cross_modal_transformer(x)
        return self.mlm_head(self.ln_post(x))
