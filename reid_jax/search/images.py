"""Images as a user gives them (a file, bytes, a PIL image, an array) -> the uint8 RGB array a model's test
transform (`Encoder.preprocess`) takes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from reid_jax.captioning.runner import IMAGE_EXTENSIONS, read_image, scan_images  # noqa: F401 (re-exported)
from reid_jax.errors import UserError, expand_path


class ImageError(UserError, ValueError):
    """A query or gallery image that cannot be read."""


def decode(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB (palette, grey, CMYK, alpha converted)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image (Pillow knows no image format in its {len(data)} bytes); expected "
                         f"a {'/'.join(x.lstrip('.') for x in IMAGE_EXTENSIONS)} file") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: a damaged image ({type(e).__name__}: {e})") from e


def load(image, name: str = "the query image") -> np.ndarray:
    """A path, encoded bytes, a PIL image or a uint8 [H, W, 3] array -> uint8 [H, W, 3] RGB."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        try:
            data = read_image(path)
        except OSError as e:
            raise ImageError(f"{path}: cannot read it ({e.strerror or e}); expected an image file") from e
        return decode(data, str(path))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode(bytes(image), name)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"{name}: expected a path, image bytes, a PIL image or a uint8 [H, W, 3] RGB array, got "
                         f"{type(image).__name__} {list(array.shape)} {array.dtype}")
    return array


def write_split(name: str, split: str, data_dir, out, config: str | None = None, limit: int | None = None) -> int:
    """The images of a built dataset's split as files, to try search without a photo collection of one's own:
    OUT/<the record's file name> (encoded bytes as stored) and OUT/camids.csv (`relative path,camera id`). Returns the
    number of images written; files already there are kept."""
    from reid_jax import data
    from reid_jax.data.records import as_str
    from reid_jax.files import write_atomically, write_text_atomically

    try:
        source = data.load_source(name, split, expand_path(data_dir), config, decode_image=False)
    except (FileNotFoundError, KeyError) as e:
        raise UserError(str(e).strip("'\"")) from e
    out = expand_path(out)
    count = len(source) if limit is None else min(limit, len(source))
    lines = []
    for i in range(count):
        record = source[i]
        rel = "/".join(p for p in Path(as_str(record["file_name"])).parts if p not in ("/", "..", "."))
        target = out / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, lambda tmp, data=bytes(record["image"]): tmp.write_bytes(data))
        lines.append(f"{rel},{max(int(record['camid']), 0)}\n")
    write_text_atomically(out / "camids.csv", "".join(lines))
    return count

