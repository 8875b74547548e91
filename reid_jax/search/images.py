"""Images as a user gives them (a file, bytes, a PIL image, an array) -> the uint8 RGB array a model's test
transform (`Encoder.preprocess`) takes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from reid_jax.captioning.runner import IMAGE_EXTENSIONS, read_image, scan_images  # noqa: F401 (re-exported)
from reid_jax.errors import UserError


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
