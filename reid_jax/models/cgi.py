"""CLIP-SCGI's caption-guided inversion (CGI; Han et al.): the image, guided by its caption, becomes pseudo-word
token embeddings that the frozen text tower reads in a prompt such as "A photo of a * person."

The paper gives the idea and two hyper-parameters (the number of learnable queries and the module's depth, its
Fig. 4) but no code; how each choice here follows from its description, and which are open (config fields, in
`config.cgi` of configs/scgi.py):

  * learnable queries [Nq, E] "turn the image into pseudo-words": `num_queries` (the paper's sweep), each query
    one pseudo-word;
  * depth: `depth` blocks (the paper's other sweep);
  * "under the guidance of the caption" (open how): in each block the queries first attend to the caption's
    tokens (real tokens up to EOT), then to the image's tokens, so the caption says what to look for and the image
    supplies it. `guidance='none'` drops the caption step (an ablation);
  * working space (open): CLIP's joint space E, both towers' tokens through their final LayerNorm and projection,
    where caption and image tokens are comparable; a linear map E -> text width turns the queries into
    pseudo-word embeddings;
  * the prompt (the paper's example): `prompt`, whose '*' is expanded to the Nq pseudo-word slots; it is encoded by
    the text tower from embeddings, trimmed after its EOT (the causal tower makes that exact);
  * the alignment losses (open form; configs/scgi.py `loss.cgi_*`): the pseudo-prompt's text feature is matched to
    the caption's text feature and to the image's projected feature, identity-aware (SDM, as TDE+NAM);
  * gradients (open): the text tower is frozen (CLIP-ReID's second stage) but passes gradients to the pseudo-words;
    the image tokens feed CGI with their gradient unless `detach_image`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from reid_jax.models import clip as clip_lib
from reid_jax.models.attention import CrossBlock

Array = jax.Array


class CGI(nnx.Module):
    """image tokens [B, T, E] (+ caption tokens [B, L, E], mask [B, L]) -> pseudo-words [B, Nq, text width]."""

    def __init__(self, cfg: clip_lib.CLIPConfig, num_queries: int, depth: int, guidance: str = "cross_attention",
                 *, rngs: nnx.Rngs, head_width: int = 64):
        if guidance not in ("cross_attention", "none"):
            raise ValueError(f"config.cgi.guidance must be 'cross_attention' or 'none', got {guidance!r}")
        width = cfg.embed_dim
        heads = max(1, width // head_width)
        self.guidance = guidance
        self.queries = nnx.Param(jax.random.normal(rngs.params(), (num_queries, width)) * width ** -0.5)
        block = lambda: CrossBlock(width, heads, depth, cfg, rngs=rngs)  # noqa: E731
        self.caption_blocks = nnx.List([block() for _ in range(depth)]) if guidance != "none" else None
        self.image_blocks = nnx.List([block() for _ in range(depth)])
        self.ln_out = clip_lib.LayerNorm(width, cfg, rngs=rngs)
        self.to_word = nnx.Linear(width, cfg.text.width, dtype=jnp.dtype(cfg.dtype),
                                  kernel_init=jax.nn.initializers.normal(width ** -0.5), rngs=rngs)

    def __call__(self, image_tokens: Array, caption_tokens: Array | None = None,
                 caption_mask: Array | None = None) -> Array:
        q = jnp.broadcast_to(self.queries[...].astype(image_tokens.dtype),
                             (image_tokens.shape[0], *self.queries.shape))
        for i, image_block in enumerate(self.image_blocks):
            if self.caption_blocks is not None:
                q = self.caption_blocks[i](q, caption_tokens, caption_mask)
            q = image_block(q, image_tokens)
        return self.to_word(self.ln_out(q))


def caption_mask(ids: Array) -> Array:
    """int [B, L] -> bool [B, L]: SOT, the words and EOT (positions up to the EOT, the largest id)."""
    eot = clip_lib.TextTower.eot_index(ids)
    return jnp.arange(ids.shape[1])[None] <= eot[:, None]
