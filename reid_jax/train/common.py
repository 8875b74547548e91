"""Pieces every method's task shares: dataset splits (built on demand for the built-in set), the CLIP to start
from, and encoding an evaluation stream on the mesh."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx

from reid_jax import data
from reid_jax.data import index as index_lib
from reid_jax.models import clip as clip_lib
from reid_jax.train import loop, mesh as mesh_lib


def dataset_source(spec, data_dir: Path, auto_build: bool, decode_image: bool = True):
    """(source, index) of a dataset split named by {name, split, config}; builds built-in sets on demand."""
    args = (spec.name, spec.split, data_dir, spec.get("config") or None)
    try:
        source = data.load_source(*args, decode_image=decode_image)
    except FileNotFoundError:
        if not (auto_build and spec.name == "synthetic_pedestrians"):
            raise
        from reid_jax.data import build

        build.build(spec.name, data_dir, config=args[3])
        source = data.load_source(*args, decode_image=decode_image)
    return source, index_lib.split_index(*args)


def build_model(config: ml_collections.ConfigDict) -> clip_lib.CLIP:
    """A converted / PyTorch CLIP checkpoint when config.init_checkpoint is set, else a fresh model."""
    m = config.model
    overrides = {"dtype": m.dtype, "remat": m.remat, **m.get("overrides", {}).to_dict()}
    if config.init_checkpoint:
        path = Path(config.init_checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"config.init_checkpoint={path} does not exist; convert a PyTorch CLIP checkpoint with "
                f"`python -m reid_jax.convert ViT-B-16.pt {path} --image-size={m.image_size[0]},{m.image_size[1]}`")
        return clip_lib.load_pretrained(path, image_size=tuple(m.image_size), stride=m.stride,
                                        posemb_interpolation=m.posemb_interpolation, **overrides)
    preset = getattr(clip_lib.CLIPConfig, m.preset)(image_size=tuple(m.image_size), stride=m.stride)
    return clip_lib.CLIP(preset.replace(**overrides), rngs=nnx.Rngs(config.seed))


def encode_stream(stream, key: str, encode, mesh) -> dict:
    """Runs `encode(batch)` (global arrays) over the stream on the mesh -> the valid rows of its features ('feats')
    and of every batch field but the input `key`, as numpy arrays."""
    out = {}
    for batch in stream:
        arrays = mesh_lib.global_batch(batch, mesh)
        valid = loop.gather(arrays.pop("valid"))
        feats = encode(arrays)
        arrays.pop(key)
        rows = {"feats": loop.gather(feats)} | {k: loop.gather(v) for k, v in arrays.items()}
        for k, v in rows.items():
            out.setdefault(k, []).append(v[valid])
    return {k: np.concatenate(v) for k, v in out.items()}
