"""What every released-checkpoint module needs: the keys under a prefix, the trained input size behind a stored
position grid, and a CLIP built from an OpenAI-named state at any input size."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from reid_jax.models import posemb as posemb_lib
from reid_jax.models.clip import CLIP
from reid_jax.weights import mapping
from reid_jax.weights.readers import CheckpointError

# the text tower's keys a released image model may lack (CLIP-ReID keeps no token table); initialised when absent
TEXT_KEYS = ("token_embedding.weight",)
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # CLIP-ReID's and MUVA's input normalisation


def under(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries of `state` whose key starts with `prefix`, the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def trained_input(path: Path, num_patches: int, patch_size: int, image_size, stride,
                  published: Sequence[tuple[tuple[int, int], int]]) -> tuple[tuple[int, int], int]:
    """(image_size, stride) the file was trained at, told by the number of patch rows of its position grid.

    A ReID grid is not square, so the count alone does not give it: the caller's `image_size` / `stride` (when
    they give `num_patches` patches) come first, then the method's `published` settings in order.
    """
    candidates = list(published)
    if image_size is not None:
        candidates.insert(0, (tuple(image_size), stride or patch_size))
    for size, s in candidates:
        rows, cols = posemb_lib.grid_size(size, patch_size, s)
        if rows * cols == num_patches:
            return tuple(size), s
    raise CheckpointError(
        f"{path}: its position grid holds {num_patches} patches, which none of "
        f"{', '.join(f'{h}x{w} stride {s}' for (h, w), s in candidates)} gives; pass the image_size and stride it "
        f"was trained with (Encoder.load(..., image_size=(H, W), stride=S))")


def build_clip(path: Path, kind: str, state: dict[str, np.ndarray], trained: tuple[tuple[int, int], int],
               image_size, stride, posemb_interpolation: str = "bilinear", overrides: dict | None = None,
               optional: Collection[str] = TEXT_KEYS) -> CLIP:
    """Our CLIP from an OpenAI-named `state` whose position grid was trained at `trained` = (image_size, stride),
    for inputs of `image_size` cut every `stride` pixels (None = as trained): the grid is resized when they
    differ. Keys in `optional` may be absent (their parameters are initialised)."""
    (size, s), patch = trained, state["visual.conv1.weight"].shape[-1]
    grid = posemb_lib.grid_size(size, patch, s)
    arch, _ = mapping.infer_arch(path, state, optional)
    cfg = mapping.model_config(arch, image_size or size, stride or s, overrides or {})
    source = mapping.Source(path, kind, state, arch, grid)
    return mapping.with_params(cfg, mapping.map_params(source, cfg, posemb_interpolation, optional))
