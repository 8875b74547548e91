"""MUVA's prototype memory: one unit vector per training identity, updated with the hardest instance of the batch
(docs/muva.md, 'Stage 2'): for each identity in the batch, the instance least similar to its memory row replaces
m <- momentum m + (1 - momentum) f, renormalised. Identities absent from the batch keep their rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reid_jax.losses import l2_normalize


def update_hard(memory: jax.Array, feats: jax.Array, labels: jax.Array, momentum: float = 0.2) -> jax.Array:
    """memory [C, D] unit rows, feats [B, D] (normalised here), labels int [B] -> the new memory [C, D]."""
    f = l2_normalize(feats.astype(jnp.float32))
    sims = jnp.sum(f * memory[labels], axis=-1)  # [B]: each instance against its own identity's row
    mine = labels[None, :] == jnp.arange(memory.shape[0])[:, None]  # [C, B]
    hard = jnp.argmin(jnp.where(mine, sims[None, :], jnp.inf), axis=1)  # [C]: least similar instance per identity
    updated = l2_normalize(momentum * memory + (1.0 - momentum) * f[hard])
    return jnp.where(jnp.any(mine, axis=1)[:, None], updated, memory)
