"""Image transforms of the papers' PyTorch pipelines, in numpy + PIL, with part boxes carried along.

Training (IRRA / CLIP-ReID): resize (`train_interpolation`: bilinear for IRRA, bicubic for CLIP-ReID) -> flip p ->
zero-pad `pad` + random crop back to size -> to [0, 1] -> normalise (CLIP or 0.5 mean/std) -> random erasing p (area
fraction and aspect ratio ranges, filled with a constant). Part boxes (normalised x0, y0, x1, y1; -1 = absent)
follow every geometric step, so image and part masks are always flipped and cropped together (MUVA). Evaluation:
resize (`test_interpolation`, bilinear for all three methods' code) + normalise only.

Each function takes an explicit `np.random.Generator`, so a pipeline is deterministic given its seed no matter
how many worker processes run it.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
from PIL import Image

from reid_jax.errors import UserError

MEANS_STDS = {  # name -> (mean, std) per RGB channel, in [0, 1] pixel units
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # MUVA / CLIP-ReID DG setting
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def check_rgb(image: np.ndarray) -> np.ndarray:
    """`image` if it is uint8 [H, W, 3]; else a one-line error saying to rebuild the dataset (builds before the
    RGB conversion stored CMYK/RGBA/grayscale images as they were, and normalize would fail on the shape)."""
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image
    raise UserError(f"an image of shape {list(image.shape)} ({image.dtype}) reached the input pipeline, expected "
                    f"uint8 [H, W, 3]: the dataset was built by an older reid-jax that kept CMYK/RGBA/grayscale "
                    f"images as they were; rebuild it with `python -m reid_jax.data.build NAME ... --force`")


INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}  # PIL's, as torchvision's Resize on PIL


def resize(image: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [H, W, 3], as torchvision's Resize(size, interpolation) on PIL images."""
    if image.shape[:2] == tuple(size):
        return image
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"config.data.aug interpolation must be one of {sorted(INTERPOLATIONS)}, "
                         f"got {interpolation!r}")
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), INTERPOLATIONS[interpolation]))


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror image [H, W, C] and boxes [R, 4] (absent boxes, all -1, stay absent)."""
    flipped = boxes.copy()
    present = boxes[:, 0] >= 0
    flipped[present, 0], flipped[present, 2] = 1.0 - boxes[present, 2], 1.0 - boxes[present, 0]
    return image[:, ::-1], flipped


def pad_crop(image: np.ndarray, boxes: np.ndarray, pad: int, rng: np.random.Generator):
    """Zero-pad by `pad` on every side, crop a random window of the original size; boxes shifted and clipped."""
    if pad <= 0:
        return image, boxes
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    out = padded[top: top + h, left: left + w]
    shifted = boxes.copy()
    present = boxes[:, 0] >= 0
    shift = np.array([(pad - left) / w, (pad - top) / h] * 2, np.float32)
    shifted[present] = np.clip(boxes[present] + shift, 0.0, 1.0)
    return out, shifted


def normalize(image: np.ndarray, mean_std: str) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 (x / 255 - mean) / std."""
    mean, std = (np.asarray(v, np.float32) for v in MEANS_STDS[mean_std])
    return (image.astype(np.float32) / 255.0 - mean) / std


def random_erase(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float],
                 ratio: tuple[float, float], fill, attempts: int = 10) -> np.ndarray:
    """torchvision RandomErasing on a normalised float image [H, W, C]: one rectangle set to
    `fill(shape, rng)`."""
    h, w = image.shape[:2]
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):  # torchvision's rejection loop: retry until the rectangle fits
        target = h * w * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if eh < h and ew < w:
            top, left = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
            out = image.copy()
            out[top: top + eh, left: left + ew] = fill((eh, ew, image.shape[2]), rng)
            return out
    return image


ERASE_FILLS = ("mean", "zero", "random")


def erase_value(cfg: ml_collections.ConfigDict, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The erasing fill in normalised units, broadcastable to `shape` [h, w, C]:
    'mean': the mean vector itself, as IRRA's RandomErasing(value=mean) after Normalize does (TDE+NAM's code);
    'zero': the pixel mean (0 after normalising); 'random': N(0, 1) per pixel, timm's mode='pixel' (CLIP-ReID)."""
    if cfg.erase_fill == "random":
        return rng.standard_normal(shape).astype(np.float32)
    if cfg.erase_fill == "zero":
        return np.zeros(3, np.float32)
    if cfg.erase_fill == "mean":
        return np.asarray(MEANS_STDS[cfg.mean_std][0], np.float32)
    raise ValueError(f"config.erase_fill must be one of {ERASE_FILLS}, got {cfg.erase_fill!r}")


def train_transform(image: np.ndarray, boxes: np.ndarray, cfg: ml_collections.ConfigDict,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [h, w, 3], boxes [R, 4] -> float32 [H, W, 3] normalised, boxes [R, 4]; `cfg` is config.data.aug."""
    image = resize(check_rgb(image), tuple(cfg.image_size), cfg.train_interpolation)
    if rng.random() < cfg.flip_prob:
        image, boxes = hflip(image, boxes)
    image, boxes = pad_crop(image, boxes, cfg.pad, rng)
    out = normalize(image, cfg.mean_std)
    if rng.random() < cfg.erase_prob:
        out = random_erase(out, rng, tuple(cfg.erase_area), tuple(cfg.erase_ratio),
                           lambda shape, r: erase_value(cfg, shape, r))
    return out, boxes


def eval_transform(image: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
    """uint8 [h, w, 3] -> float32 [H, W, 3] resized and normalised."""
    return normalize(resize(check_rgb(image), tuple(cfg.image_size), cfg.test_interpolation), cfg.mean_std)


def default_config() -> ml_collections.ConfigDict:
    """The text-to-image recipe (IRRA / TDE+NAM); method configs override fields."""
    return ml_collections.ConfigDict({
        "image_size": (384, 128), "mean_std": "clip",
        "train_interpolation": "bilinear", "test_interpolation": "bilinear",  # torchvision's Resize default
        "flip_prob": 0.5, "pad": 10,
        "erase_prob": 0.5, "erase_area": (0.02, 0.4), "erase_ratio": (0.3, 3.3), "erase_fill": "mean"})
