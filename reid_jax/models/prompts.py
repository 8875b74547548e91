"""Text prompts with learnable slots, encoded by CLIP's text tower from token embeddings: CLIP-SCGI's
"A photo of a * person." (CGI's pseudo-words) and MUVA's / CLIP-ReID's "A photo of a X X X X person." (learnable
per-identity context words). The prompt is trimmed after its EOT: the text tower is causal, so the padding after
EOT never changes the EOT feature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax import tokenizer
from reid_jax.models import clip as clip_lib

Array = jax.Array
SLOT = "*"


def prompt_ids(template: str, num_slots: int, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The prompt's token ids [L] (trimmed after EOT) and the positions [num_slots] of its learned-word slots.

    `template` holds one '*', expanded to `num_slots` slots ("A photo of a * * * * person.").
    """
    if template.count(SLOT) != 1:
        raise ValueError(f"a prompt must hold exactly one {SLOT!r} (where the learned words go), got {template!r}")
    ids = tokenizer.tokenize([template.replace(SLOT, " ".join([SLOT] * num_slots))], context_length)[0]
    slot_id = tokenizer.tokenize([SLOT], 3)[0, 1]
    slots = np.flatnonzero(ids == slot_id)
    if len(slots) != num_slots:
        raise ValueError(f"the prompt {template!r} does not leave room for {num_slots} learned words in "
                         f"{context_length} tokens")
    return ids[: int(np.argmax(ids)) + 1], slots


def prompt_features(clip: clip_lib.CLIP, words: Array, ids: np.ndarray, slots: np.ndarray) -> Array:
    """The prompt with its slots filled by `words` [B, Nq, Dt] through the text tower -> [B, E] (EOT feature)."""
    b = words.shape[0]
    batch_ids = jnp.broadcast_to(jnp.asarray(ids), (b, len(ids)))
    embeddings = clip.text.token_embedding(batch_ids)
    embeddings = embeddings.at[:, jnp.asarray(slots)].set(words.astype(embeddings.dtype))
    return clip.text_features(batch_ids, embeddings)
