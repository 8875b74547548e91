"""CLIP-ReID's released ViT models: the `torch.save(model.state_dict())` of its stage-2 model, read as saved.

A file holds (prefix-free; docs/scgi.md, 'CLIP-ReID's released checkpoints'):
  image_encoder.*            CLIP's image tower (OpenAI names under `visual.`), position grid as trained
  cv_embed [N, Dv]           the camera embedding (SIE), only in files trained with it
  bottleneck.*, bottleneck_proj.*    the BNNecks on ln_post(CLS) [Dv] and its projection [E]
  classifier.weight [C, Dv], classifier_proj.weight [C, E]
  prompt_learner.*           stage 1's per-identity context words and the prompt's token embeddings
  text_encoder.*             the (frozen) text tower without its token table and logit scale

Two ViT-B/16 settings are published: plain (256x128, stride 16, no camera embedding) and SIE-OLP (stride 12,
camera embedding added with coefficient 1.0, which the file does not store). The test-time feature is their
`NECK_FEAT: before` one: ln_post(CLS) ++ its projection [B, Dv + E], not normalised (`CLIPReID.image_features`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from reid_jax.models.clip import CLIP
from reid_jax.models.clip_reid import CLIPReID
from reid_jax.weights.readers import CheckpointError
from reid_jax.weights.released import Loaded, common

KIND = "clip_reid"
# (input size, patch stride) of the published configurations, persons first (configs/person, configs/veri and
# configs/VehicleID); with SIE-OLP the same sizes at stride 12
PUBLISHED = (((256, 128), 16), ((256, 128), 12), ((256, 256), 16), ((256, 256), 12))
RELEASED_SIE_COE = 1.0  # the README's SIE-OLP command line; the file does not record it
# the CLIP keys their model keeps nowhere: the token table (the prompt learner only copies some of its rows) and
# the logit scale
OPTIONAL = (*common.TEXT_KEYS, "logit_scale")
_MARKERS = ("image_encoder.conv1.weight", "bottleneck_proj.running_mean", "classifier_proj.weight")


def matches(keys: Iterable[str]) -> bool:
    """An image tower under `image_encoder.` with the two BNNecks of CLIP-ReID (MUVA's files have one `bnneck`)."""
    keys = set(keys)
    return all(k in keys for k in _MARKERS)


def openai_state(path: Path, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The file's CLIP under OpenAI's names: image_encoder.* -> visual.*, text_encoder.* as OpenAI's text keys."""
    if not any(k.startswith("text_encoder.") for k in state):
        raise CheckpointError(
            f"{path}: has CLIP-ReID's image model but no 'text_encoder.*' keys: this is their ViT-baseline "
            f"(train.py) file, which reid-jax does not read; use a CLIP-ReID (train_clipreid.py) file")
    out = {f"visual.{k}": v for k, v in common.under(state, "image_encoder.").items()}
    out.update(common.under(state, "text_encoder."))
    return out


def trained_input(path: Path, state: dict[str, np.ndarray], image_size=None, stride=None
                  ) -> tuple[tuple[int, int], int]:
    """(image_size, stride) the file was trained at, from its position grid (see `common.trained_input`)."""
    patches = state["image_encoder.positional_embedding"].shape[0] - 1
    patch = state["image_encoder.conv1.weight"].shape[-1]
    return common.trained_input(path, patches, patch, image_size, stride, PUBLISHED)


def _build(path: Path, state: dict[str, np.ndarray], image_size, stride, overrides
           ) -> tuple[CLIP, tuple[tuple[int, int], int]]:
    openai = openai_state(path, state)
    trained = trained_input(path, state, image_size, stride)
    return common.build_clip(path, KIND, openai, trained, image_size, stride, overrides=overrides,
                             optional=OPTIONAL), trained


def clip(path: Path, state: dict[str, np.ndarray], image_size, stride, overrides) -> CLIP:
    """The file's CLIP (image tower and text tower; the token table and logit scale it lacks are initialised)."""
    logging.warning("%s: CLIP-ReID files store no token table nor logit scale: both are initialised at random, so "
                    "its text features mean nothing until they come from the CLIP it was trained from (SCGI: "
                    "config.init_text_checkpoint)", path)
    return _build(path, state, image_size, stride, overrides)[0]


def camera_table(path: Path, state: dict[str, np.ndarray], width: int) -> np.ndarray | None:
    """`cv_embed` [N, Dv] (None without SIE). One row per training camera in the person configurations; with
    SIE_VIEW (vehicles) row camera * views + view, which is then the id to pass."""
    table = state.get("cv_embed")
    if table is not None and (table.ndim != 2 or table.shape[1] != width):
        raise CheckpointError(f"{path}: cv_embed has shape {list(table.shape)}, expected [cameras, {width}] "
                              f"(the image tower's width); the file is not a CLIP-ReID ViT model")
    return table


def encoder(path: Path, state: dict[str, np.ndarray], image_size, stride, camera_coefficient) -> Loaded:
    """The test-time model: CLIPReID with the file's image tower and camera embedding (coefficient
    `camera_coefficient`, None = the release's 1.0), at `image_size` / `stride` (None = as trained)."""
    clip_model, trained = _build(path, state, image_size, stride, {})
    table = camera_table(path, state, clip_model.config.vision.width)
    if table is None and camera_coefficient is not None:
        raise CheckpointError(f"{path}: this CLIP-ReID file has no camera embedding (cv_embed: it was trained "
                              f"without SIE); drop camera_coefficient")
    coefficient = RELEASED_SIE_COE if camera_coefficient is None else float(camera_coefficient)
    cameras = 0 if table is None else table.shape[0]
    model = CLIPReID(clip_model, cameras, coefficient, rngs=nnx.Rngs(0))
    if table is not None:
        model.cam_embed[...] = jnp.asarray(table, jnp.float32)
    model.eval()
    v = clip_model.config.vision
    info = {"stride": v.stride, "grid": tuple(v.grid), "num_cameras": cameras,
            "camera_coefficient": coefficient if cameras else None,
            "trained": trained,
            "num_classes": int(state["classifier_proj.weight"].shape[0])}
    mean, std = common.HALF_MEAN_STD  # INPUT.PIXEL_MEAN / PIXEL_STD 0.5 in every published ViT config
    return Loaded(KIND, model, image_features, None, tuple(v.image_size), mean, std, info)


def image_features(model: CLIPReID, images, camids):
    """images [B, H, W, 3] normalised, camids int [B] (zero-based; None without SIE) -> [B, Dv + E]."""
    return model.image_features(images, camids)
