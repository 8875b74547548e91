"""Image transforms of the papers' PyTorch pipelines, in numpy + PIL, with part boxes carried along.

Training (IRRA / CLIP-ReID): resize (`train_interpolation`: bilinear for IRRA, bicubic for CLIP-ReID) -> flip p ->
zero-pad `pad` + random crop back to size -> to [0, 1] -> normalise (CLIP or 0.5 mean/std) -> random erasing p (area
fraction and aspect ratio ranges, filled with a constant). Part boxes (normalised x0, y0, x1, y1; -1 = absent)
follow every geometric step, so image and part masks are always flipped and cropped together (MUVA). Evaluation:
resize (`test_interpolation`, bilinear for all three methods' code) + normalise only.

Where the steps run (`config.data.aug.on_device`, `resize_on_device`):
  * both True (default): the host decodes the image and draws the flip, the crop window and the erasing rectangle;
    it sends the source image with PIL's resize weights as tables, the flip and crop folded in
    (`train_transform_source`, `reid_jax.data.resample`), and the jitted step resizes, flips, crops, normalises and
    paints the rectangle on the accelerator (`reid_jax.data.device.prepare_images`), PIL's bytes exactly. Images
    larger than `image_size` are resized on the host first (`device_source`).
  * on_device only: the host does the integer steps (resize, flip, pad + crop) and hands uint8 images on, each with
    the rectangle random erasing drew (`train_transform_uint8`); the device normalises and paints the rectangle. A
    quarter of the bytes to copy and send, and the host's float work gone.
  * False: everything on the host, float32 images out (`train_transform`, `eval_transform`).
All draw the same random numbers in the same order, so a seed gives the same geometry, erasing rectangles and
captions either way; the images agree to float32 rounding (fills 'mean' and 'zero'), the 'random' fill's noise
values come from jax.random on the device.

Each function takes an explicit `np.random.Generator`, so a pipeline is deterministic given its seed no matter
how many worker processes run it.
"""

from __future__ import annotations

import io
import math

import ml_collections
import numpy as np
from PIL import Image

from reid_jax.data import resample
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
    raise _not_rgb(f"an image of shape {list(image.shape)} ({image.dtype})")


def _not_rgb(what: str) -> UserError:
    return UserError(f"{what} reached the input pipeline, expected uint8 [H, W, 3]: the dataset was built by an "
                     f"older reid-jax that kept CMYK/RGBA/grayscale images as they were; rebuild it with "
                     f"`python -m reid_jax.data.build NAME ... --force`")


def is_encoded(image) -> bool:
    """Whether a record's image is the stored file's bytes (a source opened with `decode_image=False`)."""
    return isinstance(image, bytes)


def as_pil(image) -> Image.Image:
    """A record's image as an RGB PIL image: decoded uint8 [h, w, 3], or the stored PNG / JPEG bytes, which PIL
    decodes itself. The training streams read encoded bytes: one decode straight into PIL, without the TFDS
    decoder's numpy array and the copy back into PIL that resizing it would take."""
    if not is_encoded(image):
        return Image.fromarray(check_rgb(image))
    decoded = Image.open(io.BytesIO(image))
    if decoded.mode != "RGB":
        raise _not_rgb(f"a {decoded.format} image of mode {decoded.mode}")
    return decoded


INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}  # PIL's, as torchvision's Resize on PIL


def resize(image, size: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """uint8 [h, w, 3] or encoded bytes (`as_pil`) -> uint8 [H, W, 3], as torchvision's Resize(size,
    interpolation) on PIL images."""
    _check_interpolation(interpolation)
    if not is_encoded(image) and check_rgb(image).shape[:2] == tuple(size):
        return image
    return _resize_pil(as_pil(image), size, interpolation)


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"config.data.aug interpolation must be one of {sorted(INTERPOLATIONS)}, "
                         f"got {interpolation!r}")


def _resize_pil(pil: Image.Image, size: tuple[int, int], interpolation: str) -> np.ndarray:
    if pil.size != (size[1], size[0]):
        pil = pil.resize((size[1], size[0]), INTERPOLATIONS[interpolation])
    return np.asarray(pil)


def device_source(image, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """What the device resizes (`resize_on_device`): the decoded image uint8 [h, w, 3] itself when it fits in
    `size` (h <= H and w <= W: the device upsamples), else `resize`d to `size` here."""
    _check_interpolation(interpolation)
    if not is_encoded(image):
        h, w = check_rgb(image).shape[:2]
        return image if h <= size[0] and w <= size[1] else resize(image, size, interpolation)
    pil = as_pil(image)
    return np.asarray(pil) if pil.height <= size[0] and pil.width <= size[1] else _resize_pil(pil, size, interpolation)


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror image [H, W, C] and boxes [R, 4] (absent boxes, all -1, stay absent)."""
    return image[:, ::-1], flip_boxes(boxes)


def flip_boxes(boxes: np.ndarray) -> np.ndarray:
    flipped = boxes.copy()
    present = boxes[:, 0] >= 0
    flipped[present, 0], flipped[present, 2] = 1.0 - boxes[present, 2], 1.0 - boxes[present, 0]
    return flipped


def crop_corner(pad: int, rng: np.random.Generator) -> tuple[int, int]:
    """The random crop window's corner (dy, dx) in the image, in [-pad, pad] (negative = in the zero padding)."""
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return int(top) - pad, int(left) - pad


def shift_boxes(boxes: np.ndarray, corner: tuple[int, int], hw: tuple[int, int]) -> np.ndarray:
    """Boxes [R, 4] of an h x w image, in the crop window at `corner` (dy, dx): shifted and clipped."""
    (dy, dx), (h, w) = corner, hw
    shifted = boxes.copy()
    present = boxes[:, 0] >= 0
    shifted[present] = np.clip(boxes[present] - np.array([dx / w, dy / h] * 2, np.float32), 0.0, 1.0)
    return shifted


def pad_crop(image: np.ndarray, boxes: np.ndarray, pad: int, rng: np.random.Generator,
             out: np.ndarray | None = None):
    """Zero-pad by `pad` on every side, crop a random window of the original size; boxes shifted and clipped.

    Cropped first: only the part of the window inside the image is copied (into `out` [H, W, C] when given, e.g.
    a row of the batch), the rest zeroed; the same pixels as padding the whole image and cropping.
    """
    if pad <= 0:
        if out is None:
            return image, boxes
        _copy(out, image)
        return out, boxes
    h, w = image.shape[:2]
    dy, dx = crop_corner(pad, rng)
    out = np.zeros_like(image) if out is None else out
    y0, y1, x0, x1 = max(dy, 0), min(dy + h, h), max(dx, 0), min(dx + w, w)
    if dy or dx:
        out[...] = 0
    _copy(out[y0 - dy: y1 - dy, x0 - dx: x1 - dx], image[y0:y1, x0:x1])
    return out, shift_boxes(boxes, (dy, dx), (h, w))


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src for images [h, w, C]. A mirrored view (`hflip`) is copied one channel at a time: numpy copies
    it 3 bytes at a time otherwise, 5x slower."""
    if src.strides[1] < 0:
        for c in range(src.shape[2]):
            dst[..., c] = src[..., c]
    else:
        dst[...] = src


def normalize(image: np.ndarray, mean_std: str) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 (x / 255 - mean) / std."""
    mean, std = (np.asarray(v, np.float32) for v in MEANS_STDS[mean_std])
    return (image.astype(np.float32) / 255.0 - mean) / std


def erase_box(h: int, w: int, rng: np.random.Generator, area: tuple[float, float], ratio: tuple[float, float],
              attempts: int = 10) -> tuple[int, int, int, int] | None:
    """torchvision RandomErasing's rectangle on an h x w image: (top, left, height, width), or None when no
    attempt fits."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):  # torchvision's rejection loop: retry until the rectangle fits
        target = h * w * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if eh < h and ew < w:
            top, left = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
            return int(top), int(left), eh, ew
    return None


def random_erase(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float],
                 ratio: tuple[float, float], fill, attempts: int = 10) -> np.ndarray:
    """torchvision RandomErasing on a normalised float image [H, W, C]: one rectangle set to
    `fill(shape, rng)`."""
    box = erase_box(*image.shape[:2], rng, area, ratio, attempts)
    if box is None:
        return image
    top, left, eh, ew = box
    out = image.copy()
    out[top: top + eh, left: left + ew] = fill((eh, ew, image.shape[2]), rng)
    return out


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


def train_transform(image, boxes: np.ndarray, cfg: ml_collections.ConfigDict,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [h, w, 3] or encoded bytes, boxes [R, 4] -> float32 [H, W, 3] normalised, boxes [R, 4]; `cfg` is
    config.data.aug."""
    image = resize(image, tuple(cfg.image_size), cfg.train_interpolation)
    if rng.random() < cfg.flip_prob:
        image, boxes = hflip(image, boxes)
    image, boxes = pad_crop(image, boxes, cfg.pad, rng)
    out = normalize(image, cfg.mean_std)
    if rng.random() < cfg.erase_prob:
        out = random_erase(out, rng, tuple(cfg.erase_area), tuple(cfg.erase_ratio),
                           lambda shape, r: erase_value(cfg, shape, r))
    return out, boxes


def train_transform_uint8(image, boxes: np.ndarray, cfg: ml_collections.ConfigDict,
                          rng: np.random.Generator, out: np.ndarray | None = None, draws_follow: bool = True):
    """`train_transform` without its float steps: uint8 [h, w, 3] or encoded bytes, boxes [R, 4] -> uint8 [H, W, 3]
    (written into `out` when given), boxes [R, 4], and the erasing rectangle int32 [4] = (top, left, height,
    width), all 0 when the example is not erased; `reid_jax.data.device.prepare_images` normalises and erases on
    the device.

    The same draws from `rng` in the same order as `train_transform`. For the 'random' fill that includes the
    noise the host would have drawn (then thrown away), so that whatever is drawn from `rng` afterwards (a
    caption) is the host path's too; `draws_follow=False` skips that when nothing follows.
    """
    image = resize(image, tuple(cfg.image_size), cfg.train_interpolation)
    if rng.random() < cfg.flip_prob:
        image, boxes = hflip(image, boxes)
    out, boxes = pad_crop(image, boxes, cfg.pad, rng, out=out if out is not None else np.empty_like(image))
    return out, boxes, _erase_draws(out.shape, cfg, rng, draws_follow)


def train_transform_source(image, boxes: np.ndarray, cfg: ml_collections.ConfigDict, rng: np.random.Generator,
                           out: np.ndarray, draws_follow: bool = True):
    """`train_transform_uint8` with the resize, flip and crop left to the device (`config.data.aug.
    resize_on_device`): writes `device_source`'s pixels to the top-left of `out` (uint8 [H, W, 3], zeros
    elsewhere) and returns boxes [R, 4], the erasing rectangle int32 [4] and the resampling tables rows int32
    [H, 2, K], cols int32 [W, 2, K] (`reid_jax.data.resample.tables`). The same draws in the same order, so the
    device's images are `train_transform_uint8`'s, byte for byte."""
    size = tuple(cfg.image_size)
    source = device_source(image, size, cfg.train_interpolation)
    _copy(out[: source.shape[0], : source.shape[1]], source)
    flip = bool(rng.random() < cfg.flip_prob)
    if flip:
        boxes = flip_boxes(boxes)
    corner = (0, 0)
    if cfg.pad > 0:
        corner = crop_corner(cfg.pad, rng)
        boxes = shift_boxes(boxes, corner, size)
    erase = _erase_draws((*size, out.shape[2]), cfg, rng, draws_follow)
    rows, cols = resample.tables(source.shape[:2], size, cfg.train_interpolation, flip, corner)
    return boxes, erase, rows, cols


def _erase_draws(shape: tuple[int, int, int], cfg: ml_collections.ConfigDict, rng: np.random.Generator,
                 draws_follow: bool) -> np.ndarray:
    """The erasing rectangle of an image of `shape` [H, W, C] as `train_transform`'s draws make it: int32 [4]
    (top, left, height, width), all 0 when not erased."""
    erase = np.zeros(4, np.int32)
    if rng.random() < cfg.erase_prob:
        box = erase_box(*shape[:2], rng, tuple(cfg.erase_area), tuple(cfg.erase_ratio))
        if box is not None:
            erase[:] = box
            if draws_follow and cfg.erase_fill == "random":
                rng.standard_normal((box[2], box[3], shape[2]))  # as erase_value's draw: keeps rng in step
    return erase


def eval_resize(image, cfg: ml_collections.ConfigDict) -> np.ndarray:
    """uint8 [h, w, 3] or encoded bytes -> uint8 [H, W, 3]: evaluation's host part when the device normalises."""
    return resize(image, tuple(cfg.image_size), cfg.test_interpolation)


def eval_transform(image, cfg: ml_collections.ConfigDict) -> np.ndarray:
    """uint8 [h, w, 3] or encoded bytes -> float32 [H, W, 3] resized and normalised."""
    return normalize(eval_resize(image, cfg), cfg.mean_std)


def default_config() -> ml_collections.ConfigDict:
    """The text-to-image recipe (IRRA / TDE+NAM); method configs override fields."""
    return ml_collections.ConfigDict({
        "image_size": (384, 128), "mean_std": "clip",
        "train_interpolation": "bilinear", "test_interpolation": "bilinear",  # torchvision's Resize default
        "flip_prob": 0.5, "pad": 10,
        "erase_prob": 0.5, "erase_area": (0.02, 0.4), "erase_ratio": (0.3, 3.3), "erase_fill": "mean",
        # where normalising and erasing run: True = on the accelerator, inside the jitted step, from uint8 images
        # (a quarter of the bytes, no float work on the host); False = on the host, float32 images as before.
        # The same images either way (module docstring); no paper default depends on it
        "on_device": True,
        # with on_device: the resize, flip and crop run on the accelerator too, from the decoded source image and
        # PIL's own integer weights (`reid_jax.data.resample`), for sources no larger than image_size (larger ones
        # are resized on the host first). The same bytes as PIL's resize; the host only decodes
        "resize_on_device": True})
