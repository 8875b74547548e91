"""The authors' released training checkpoints (IRRA / MLLM4Text-ReID, CLIP-ReID, MUVA), read as they are saved.

Each method has one module here that knows its authors' key names:

  irra       IRRA's and MLLM4Text-ReID's `Checkpointer` files: {'model': {'base_model.*' CLIP, IRRA heads}, ...}
  clip_reid  CLIP-ReID's stage-2 `model.state_dict()`: 'image_encoder.*', BNNecks, classifiers, 'cv_embed', ...
  muva       MUVA's trainer output: 'image_encoder.*', 'local_token', 'residual_mask_predictor.*', 'bnneck.*', ...

and exposes the same four names:

  KIND                 the `reid_jax.inference.Encoder.kind` of its models
  matches(keys)        whether a (prefix-free) state dict is one of its files
  encoder(path, state, image_size, stride, camera_coefficient) -> Loaded
                       the method's test-time model with the file's weights (arguments None = the file's own)
  clip(path, state, image_size, stride, overrides) -> CLIP
                       the file's CLIP alone (for `reid_jax.convert` and `config.init_checkpoint`)

`detect(path)` reads a file and names its module; anything unrecognised is None (the caller then tries the plain
CLIP layouts of `reid_jax.weights.readers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from flax import nnx

MODULES = ("irra", "clip_reid", "muva")


@dataclasses.dataclass
class Loaded:
    """A method's test-time model, ready for `reid_jax.inference.Encoder`.

    `image_fn(model, images [B, H, W, 3] float32 normalised, camids int32 [B] or None) -> [B, D]` and
    `text_fn(model, ids int32 [B, L]) -> [B, E]` (None for image-only models) are traceable: the Encoder jits them.
    """
    kind: str  # 'clip' | 'tde_nam' | 'clip_reid' | 'scgi' | 'muva'
    model: nnx.Module
    image_fn: Callable[..., Any]
    text_fn: Callable[..., Any] | None
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    info: dict = dataclasses.field(default_factory=dict)  # what was read: stride, grid, camera count, ...


def module(name: str) -> ModuleType:
    import importlib

    return importlib.import_module(f"reid_jax.weights.released.{name}")


def detect(state: dict[str, np.ndarray]) -> ModuleType | None:
    """The module whose files look like `state` (keys without 'module.'), or None."""
    for name in MODULES:
        m = module(name)
        if m.matches(state.keys()):
            return m
    return None


def strip_module(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`state` without DataParallel's 'module.' prefix (on every key, or on none)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def read(path: Path) -> tuple[ModuleType | None, dict[str, np.ndarray]]:
    """(the module of the released file at `path` or None, the file's state dict with 'module.' stripped)."""
    from reid_jax.weights import readers

    state = strip_module(readers.read_state_file(Path(path)))
    return detect(state), state
