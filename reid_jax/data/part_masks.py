"""MUVA's released pseudo masks (the authors' `blobs/*.pkl`), stored with a built dataset and read back for training.

The authors' file is a pickled dict {image file name (basename): float array [R, L]}: R = 3 parts (head, upper
body, legs), L = the patch grid row by row (128 = 16 x 8 at 256 x 128, stride 16). It is an additive attention
mask: 0 where the patch belongs to the part, anything else (their -inf) where it does not; their loader reads it by
the image's basename, and their mask loss's target is `mask == 0`. Training flips a mask with its image by
mirroring the grid's columns.

`python -m reid_jax.data.build NAME ... --part_masks=FILE.pkl` keeps, beside the build (`FILE_NAME` in its version
folder), the boolean masks (True = in the part) of the train split's images, keyed by their file_name.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from reid_jax.errors import UserError

FILE_NAME = "part_masks.npz"
SPLIT = "train"  # the authors' masks cover the training images


def read_pkl(path: Path) -> dict[str, np.ndarray]:
    """{basename: bool [R, L]} (True = in the part) from the authors' pkl; one-line UserError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f)
    except Exception as e:  # noqa: BLE001  pickle raises many types on a file that is not one
        raise UserError(f"--part_masks={path} could not be read as a pickle ({type(e).__name__}: {e}); expected "
                        f"the authors' pseudo-mask file ({{image name: [R, L] array}})") from None
    expected = "expected a dict {image file name: [R, L] array, 0 = in the part} as the authors' blobs/*.pkl"
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"--part_masks={path} holds {type(raw).__name__}"
                        f"{' (empty)' if isinstance(raw, dict) else ''}; {expected}")
    out, shape = {}, None
    for name, value in raw.items():
        array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
        if not isinstance(name, str) or array.ndim != 2 or not np.issubdtype(array.dtype, np.number) and \
                array.dtype != bool:
            raise UserError(f"--part_masks={path}: entry {name!r} is {type(value).__name__} of shape "
                            f"{list(array.shape)}; {expected}")
        if shape is not None and array.shape != shape:
            raise UserError(f"--part_masks={path}: entry {name!r} has shape {list(array.shape)}, others "
                            f"{list(shape)}; {expected}")
        shape = array.shape
        out[name] = array == 0
    return out


def store(version_dir: Path, pkl: Path, file_names: Sequence[str]) -> int:
    """Writes the masks of `file_names` (the train split's, relative paths) from the pkl into `version_dir`;
    every image must have one (UserError naming the file and some that lack one). Returns the count."""
    masks = read_pkl(pkl)
    missing = [n for n in file_names if Path(n).name not in masks]
    if missing:
        raise UserError(f"--part_masks={pkl} has no mask for {len(missing)} of the {len(file_names)} training "
                        f"images (e.g. {', '.join(Path(n).name for n in missing[:3])}); it is keyed by image file "
                        f"name: pass the authors' file for this dataset (or their multi-source one)")
    stacked = np.stack([masks[Path(n).name] for n in file_names])
    np.savez(Path(version_dir) / FILE_NAME, names=np.asarray(list(file_names)), masks=stacked)
    return len(file_names)


def load(version_dir: Path) -> dict[str, np.ndarray] | None:
    """{file_name: bool [R, L]} stored with a build, or None when it was built without --part_masks."""
    path = Path(version_dir) / FILE_NAME
    if not path.is_file():
        return None
    with np.load(path) as f:
        return dict(zip(f["names"].tolist(), f["masks"]))


def training_table(train_specs, data_dir: Path, file_names: Iterable[str]) -> np.ndarray:
    """bool [N, R, L]: the stored masks of the training records (their `file_names`, in record order), from the
    builds of every training spec; a ConfigError-like UserError when a build has none or lacks an image."""
    from reid_jax import data
    from reid_jax.data import specs as specs_lib
    from reid_jax.data.records import as_str

    stored: dict[str, np.ndarray] = {}
    for spec in (train_specs if isinstance(train_specs, (list, tuple)) else [train_specs]):
        spec = specs_lib._as_spec(spec)
        folder = Path(data.builder(spec.name, data_dir, spec.get("config") or None).data_dir)
        masks = load(folder)
        if masks is None:
            raise UserError(f"{folder} holds no part masks (config.muva.pseudo_masks='stored'): build "
                            f"{spec.name} with `python -m reid_jax.data.build {spec.name} ... --part_masks=FILE.pkl` "
                            f"(the authors' pseudo masks), or set --config.muva.pseudo_masks=boxes")
        stored.update(masks)
    names = [as_str(n) for n in file_names]
    missing = [n for n in names if n not in stored]
    if missing:
        raise UserError(f"the stored part masks lack {len(missing)} of the {len(names)} training images (e.g. "
                        f"{missing[0]}); rebuild the dataset with --part_masks")
    return np.stack([stored[n] for n in names])
