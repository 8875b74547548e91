"""The folder `python -m reid_jax.convert` writes: `config.json` (format, model config, source) + `params/` (orbax).

The pretrained position grid is stored beside the resized one, so that loading at another input size or stride
resizes from the original rather than from an already resized grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from reid_jax.models import posemb as posemb_lib
from reid_jax.models.clip import CLIP, CLIPConfig
from reid_jax.weights import mapping
from reid_jax.weights.readers import CONFIG_FILE, CheckpointError

FORMAT = "reid_jax.clip/v1"
PARAMS_DIR = "params"


def is_converted(path: Path) -> bool:
    """Whether `path` is a folder this module wrote (its config.json names `FORMAT`)."""
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):  # no config.json, unreadable, or not JSON: not ours
        return False
    return path.is_dir() and isinstance(meta, dict) and meta.get("format") == FORMAT


def _tree(params: dict[tuple, np.ndarray], source_posemb: np.ndarray) -> dict:
    return {"params": traverse_util.unflatten_dict({tuple(map(str, k)): v for k, v in params.items()}),
            "source_posemb": source_posemb}


def write(folder: Path, source: mapping.Source, cfg: CLIPConfig, posemb_interpolation: str) -> None:
    """Writes `source` mapped for `cfg` into the existing, empty `folder`."""
    params = mapping.map_params(source, cfg, posemb_interpolation)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(folder / PARAMS_DIR, _tree(params, source.state["visual.positional_embedding"]))
    ckptr.wait_until_finished()
    meta = {"format": FORMAT, "model": cfg.to_dict(), "posemb_interpolation": posemb_interpolation,
            "source": {"path": str(source.path), "kind": source.kind, "posemb_grid": list(source.posemb_grid)}}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def load(path: Path, image_size, stride: int, posemb_interpolation: str, overrides: dict) -> CLIP:
    """The CLIP stored in `path` at `image_size` / `stride` (the grid resized from the pretrained one when it or
    the interpolation differs from the stored), with `overrides` (CLIPConfig fields)."""
    meta = json.loads((path / CONFIG_FILE).read_text())
    stored = CLIPConfig.from_dict(meta["model"])
    cfg = mapping.model_config(mapping.architecture(stored), image_size, stride or stored.vision.stride, overrides)
    if not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path}: {PARAMS_DIR}/ is missing: the conversion did not complete. Convert again "
                              f"with `python -m reid_jax.convert SRC {path} --overwrite`")
    source_positions = 1 + int(np.prod(meta["source"]["posemb_grid"]))
    target = _tree({k: v for k, v in mapping.abstract_params(stored).items() if k not in mapping.NEW_PARAMS},
                   jax.ShapeDtypeStruct((source_positions, stored.vision.width), np.float32))
    try:
        tree = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
    except Exception as e:
        raise CheckpointError(f"{path}: could not restore the converted parameters ({type(e).__name__}: {e}). "
                              f"The folder is incomplete or damaged: convert again with "
                              f"`python -m reid_jax.convert SRC {path} --overwrite`") from e
    params = {tuple(int(p) if p.isdigit() else p for p in k): np.asarray(v)
              for k, v in traverse_util.flatten_dict(tree["params"]).items()}
    if (cfg.vision.grid, posemb_interpolation) != (stored.vision.grid, meta["posemb_interpolation"]):
        params[mapping.POSEMB] = posemb_lib.resize_posemb(np.asarray(tree["source_posemb"]), cfg.vision.grid,
                                                          posemb_interpolation, tuple(meta["source"]["posemb_grid"]))
    return mapping.with_params(cfg, params)
