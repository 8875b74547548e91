"""A config file given as `FILE[:VARIANT]`, loaded as `--config` loads it (configs/ is not a package: by path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from reid_jax import errors


def load_module(path: Path):
    """The config file at `path` as a module (its `get_config`, its `VARIANTS`)."""
    spec = importlib.util.spec_from_file_location("config_under_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(arg: str) -> ml_collections.ConfigDict:
    """`configs/tde_nam.py:pretrained_nam` -> that variant's config; a missing file or unknown variant raises
    UserError naming it."""
    path_text, _, variant = arg.partition(":")
    path = errors.expand_path(path_text)
    if path is None or not path.is_file():
        raise errors.UserError(f"{arg}: no such config file {path}; expected FILE[:VARIANT], e.g. "
                               f"configs/tde_nam.py:pretrained_nam")
    try:
        module = load_module(path)
        return module.get_config(variant) if variant else module.get_config()
    except ValueError as e:  # an unknown variant: the config's own message names the valid ones
        raise errors.UserError(f"{arg}: {e}") from None
