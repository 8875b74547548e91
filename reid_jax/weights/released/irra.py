"""IRRA's and MLLM4Text-ReID's training checkpoints (their `Checkpointer`: {'model': state dict, 'optimizer',
'scheduler', 'epoch', ...}); MLLM4Text-ReID's released TDE+NAM models are IRRA models.

The state dict holds the CLIP under 'base_model.' (OpenAI's names; the position grid already resized to the
training input, 384x128 stride 16 in every published configuration; tensors in float16, as their code converts the
model) and, depending on the losses trained, IRRA's heads under their attribute names: 'classifier.*' (ID loss),
'cross_attn.*', 'cross_modal_transformer.*', 'ln_pre_t/ln_pre_i/ln_post.*' and 'mlm_head.*' (MLM loss), which are
the names of `reid_jax.models.irra.IRRAHeads`. Test features are their `encode_image` / `encode_text`: the
projected CLS token and the projected end-of-text token, i.e. our `CLIP.image_features` / `text_features`.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
from absl import logging
from flax import nnx

from reid_jax.models.clip import CLIP
from reid_jax.weights import mapping
from reid_jax.weights.readers import CheckpointError
from reid_jax.weights.released import Loaded, common

KIND = "tde_nam"
PREFIX = "base_model."
PUBLISHED = (((384, 128), 16),)  # (image size, stride) of IRRA's and MLLM4Text-ReID's configurations


def matches(keys: Collection[str]) -> bool:
    return PREFIX + "visual.conv1.weight" in keys


def clip(path: Path, state: dict[str, np.ndarray], image_size=None, stride=None, overrides=None,
         posemb_interpolation: str = "bilinear") -> CLIP:
    clip_state = common.under(state, PREFIX)
    patch = clip_state["visual.conv1.weight"].shape[-1]
    trained = common.trained_input(path, clip_state["visual.positional_embedding"].shape[0] - 1, patch,
                                   image_size, stride, PUBLISHED)
    return common.build_clip(path, "irra", clip_state, trained, image_size, stride, posemb_interpolation,
                             overrides, optional=())


def encoder(path: Path, state: dict[str, np.ndarray], image_size=None, stride=None,
            camera_coefficient=None) -> Loaded:
    if camera_coefficient is not None:
        raise CheckpointError(f"{path}: an IRRA / MLLM4Text-ReID model has no camera embedding; drop "
                              f"camera_coefficient")
    model = clip(path, state, image_size, stride)
    v = model.config.vision
    mean, std = common.CLIP_MEAN_STD
    return Loaded(KIND, model, lambda m, images, camids=None: m.image_features(images),
                  lambda m, ids: m.text_features(ids), tuple(v.image_size), mean, std,
                  {"stride": v.stride, "grid": v.grid, "heads": sorted({k.split(".")[0] for k in state
                                                                        if not k.startswith(PREFIX)})})


def load_heads(path: Path, state: dict[str, np.ndarray], heads: nnx.Module) -> list[str]:
    """Copies IRRA's heads from `state` into `heads` (`IRRAHeads`) where the file has them and their shapes fit
    (the classifier only for the same number of identities); returns what was left at its initial value."""
    skipped, flat = [], {}
    for path_, value in nnx.to_flat_state(nnx.state(heads, nnx.Param)):
        name = mapping.openai_name(("text", *path_))  # heads sit at the top level, as the text tower does
        have = state.get(name)
        if have is None:
            skipped.append(f"{name} (not in the file)")
            continue
        have = mapping.from_torch_layout(path_, have)
        if have.shape != value[...].shape:
            skipped.append(f"{name} (file {list(have.shape)}, model {list(value[...].shape)})")
            continue
        flat[path_] = have.astype(np.float32)
    nnx.update(heads, nnx.from_flat_state(flat))
    if skipped:
        logging.warning("%s: %d head parameters keep their initial values: %s", path, len(skipped),
                        "; ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""))
    return skipped
