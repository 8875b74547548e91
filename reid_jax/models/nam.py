"""Noise-aware masking (NAM, TDE+NAM paper): mask the caption words that match the image least.

Per training step (docs/tde_nam.md, 'Noise-aware masking (NAM)'):
  1. `token_similarity`: the unmasked caption and the image go through the encoders; at layer l (10 of 12) the
     text tokens and the image patch tokens (CLS and extra tokens dropped) pass through their tower's final LN and
     projection, are L2-normalised, and sim[token] = max over patches of the cosine similarity. No gradient.
  2. The similarities are stored per training example and used at the NEXT epoch (`masking_probs`; the first
     epoch, marked by UNSEEN in the table, masks uniformly): r = 1 - sim over real tokens, r' = clip(r - mean(r) +
     p, 0, 1), so the mean masking probability is p and dissimilar tokens are masked more.
  3. `mask_tokens`: each real token (0 < id < MASK_ID) is chosen with probability r'; a chosen token becomes
     MASK_ID 80%, a random id 10%, itself 10% (BERT). If none is chosen, the first word becomes MASK_ID.
  4. The training loss (SDM) uses the EOT feature of the masked caption.
`mode='uniform'` masks every real token with probability p (the paper's EM ablation); `'none'` masks nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reid_jax import tokenizer
from reid_jax.losses import l2_normalize

MODES = ("nam", "uniform", "none")
UNSEEN = -2.0  # similarity-table value of a token not seen yet (a cosine similarity is >= -1). Not NaN: a
               # multi-process device_put checks that every process holds the same values, and NaN != NaN.


def token_similarity(image_layers, text_layers, model, layer: int, num_prefix_tokens: int) -> jax.Array:
    """Per text token, its best cosine similarity to an image patch at `layer` (1-based): [B, L], no gradient.

    image_layers / text_layers: the towers' per-block outputs (`return_layers=True`), each [B, T, D];
    num_prefix_tokens: CLS + extra tokens before the patches.
    """
    img = l2_normalize(model.visual.project(image_layers[layer - 1][:, num_prefix_tokens:]).astype(jnp.float32))
    txt = l2_normalize(model.text.project(text_layers[layer - 1]).astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.max(jnp.einsum("bld,bpd->blp", txt, img), axis=-1))


def real_tokens(ids: jax.Array) -> jax.Array:
    """Maskable positions [B, L]: word ids, not SOT / EOT / pad / the mask id itself."""
    return tokenizer.is_word(ids)


def masking_probs(ids: jax.Array, sim_prev: jax.Array, p: float, mode: str) -> jax.Array:
    """Masking probability per token [B, L] from last epoch's similarities [B, L] (UNSEEN rows: not seen yet)."""
    if mode not in MODES:
        raise ValueError(f"config.nam.mode must be one of {MODES}, got {mode!r}")
    real = real_tokens(ids)
    uniform = jnp.where(real, p, 0.0)
    if mode != "nam":
        return uniform if mode == "uniform" else jnp.zeros(ids.shape)
    r = 1.0 - sim_prev.astype(jnp.float32)
    mean = jnp.sum(jnp.where(real, r, 0.0), axis=1, keepdims=True) / jnp.maximum(real.sum(1, keepdims=True), 1)
    probs = jnp.where(real, jnp.clip(r - mean + p, 0.0, 1.0), 0.0)
    seen = ~jnp.any(real & (sim_prev < -1.0), axis=1, keepdims=True)
    return jnp.where(seen, probs, uniform)


def mask_tokens(ids: jax.Array, probs: jax.Array, rng: jax.Array, *, mask_prob: float = 0.8,
                random_prob: float = 0.1, ensure_one: bool = True) -> tuple[jax.Array, jax.Array]:
    """BERT-style replacement of chosen tokens: ids int [B, L] -> (masked ids [B, L], labels [B, L]).

    labels hold the original id where a token was chosen and 0 elsewhere (the MLM target).
    """
    k_choose, k_kind, k_rand = jax.random.split(rng, 3)
    real = real_tokens(ids)
    chosen = (jax.random.uniform(k_choose, ids.shape) < probs) & real
    kind = jax.random.uniform(k_kind, ids.shape)
    random_ids = jax.random.randint(k_rand, ids.shape, 1, tokenizer.MASK_ID)  # IRRA: ids 1..49404
    out = jnp.where(chosen & (kind < mask_prob), tokenizer.MASK_ID, ids)
    out = jnp.where(chosen & (kind >= mask_prob) & (kind < mask_prob + random_prob), random_ids, out)
    if ensure_one:  # none drawn: the first word becomes the mask token (not the 80 / 10 / 10 draw), as the code
        first = jnp.argmax(real, axis=1)
        force = (~chosen.any(axis=1) & real.any(axis=1))[:, None] & (jnp.arange(ids.shape[1])[None] == first[:, None])
        out, chosen = jnp.where(force, tokenizer.MASK_ID, out), chosen | force
    return out, jnp.where(chosen, ids, 0)
