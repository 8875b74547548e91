"""PIL's resize as lookup tables, so that the accelerator can run it exactly (`config.data.aug.resize_on_device`).

PIL resizes an 8-bit image in two passes, columns then rows. Each output pixel of a pass is a weighted sum of a
few neighbouring input pixels; the weights are the filter (bilinear: a triangle of half-width 1; bicubic: Keys'
cubic with a = -0.5, half-width 2) sampled around the output pixel's centre mapped into the input, normalised to
sum 1, stored as integers with 22 fractional bits. A pass adds 2^21 to the integer sum, shifts it right by 22 and
clips to [0, 255]; the second pass reads the first pass's rounded bytes. The weights depend only on the input and
output lengths, so `taps` computes them once per length (the same double-precision arithmetic in the same order,
so the same integers), and the device's integer sums reproduce PIL's bytes exactly.

The training augmentation's horizontal flip and pad + crop only move or blank whole output rows and columns, so
`tables` folds them in: output column x reads the taps of resized column x + dx (mirrored when flipped), and an
output row or column that falls in the zero padding gets all-zero weights (its sum rounds to 0).

Only upsampling (the source no larger than the output in either axis) runs on the device: the number of taps per
output pixel is then fixed by the filter (3 bilinear, 5 bicubic), so every image of a batch has tables of one
shape. Larger sources are resized by PIL on the host first and get identity tables (`transforms.device_source`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

PRECISION_BITS = 22  # fractional bits of the fixed-point weights: 32 - 8 - 2, as PIL's 8-bit resampler
SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}  # the filter's half-width in input pixels (at scale 1)


def _filter(interpolation: str, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if interpolation == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Keys' cubic convolution as PIL's BICUBIC
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def num_taps(interpolation: str) -> int:
    """The taps per output pixel when upsampling (or keeping the size): 2 * ceil(support) + 1."""
    return int(math.ceil(SUPPORT[interpolation])) * 2 + 1


@functools.lru_cache(maxsize=4096)
def taps(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """PIL's fixed-point resampling weights along one axis: index int32 [out, K] (input pixels, clipped into
    range where unused) and weight int32 [out, K] (0 where unused), K = 2 * ceil(support * max(in / out, 1)) + 1.
    Cached: a dataset has few distinct image sizes."""
    if interpolation not in SUPPORT:
        raise ValueError(f"config.data.aug interpolation must be one of {sorted(SUPPORT)}, got {interpolation!r}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT[interpolation] * filterscale
    k = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C's (int): toward zero
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    used = np.arange(k)[None, :] < count[:, None]
    at = first[:, None] + np.arange(k)[None, :]
    w = np.where(used, _filter(interpolation, (at - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = w[:, 0].copy()
    for j in range(1, k):  # summed left to right, as PIL does
        total += w[:, j]
    w = w / np.where(total == 0.0, 1.0, total)[:, None]  # normalised to sum 1 (an all-zero row stays zero)
    scaled = w * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, -0.5 + scaled, 0.5 + scaled)).astype(np.int32)
    return np.minimum(at, in_size - 1).astype(np.int32), fixed


@functools.lru_cache(maxsize=1024)
def axis_table(in_size: int, out_size: int, interpolation: str, shift: int = 0, flip: bool = False) -> np.ndarray:
    """One axis's table, int32 [out, 2, K] (index, weight): output pixel i reads the taps of resized pixel
    i + shift, counted from the far end when `flip`; all-zero weights where that is outside the resized image.
    Cached (read-only, at most 1024 x 15 KB): a dataset's few source sizes times the flip and the crop's
    2 * pad + 1 shifts make a few hundred tables, and building an image's two took a tenth of its host work."""
    index, weight = taps(in_size, out_size, interpolation)
    at = np.arange(out_size) + shift
    if flip:
        at = out_size - 1 - at
    inside = (at >= 0) & (at < out_size)
    at = np.clip(at, 0, out_size - 1)
    table = np.stack([index[at], np.where(inside[:, None], weight[at], 0)], axis=1)
    table.flags.writeable = False
    return table


def tables(src_hw: tuple[int, int], out_hw: tuple[int, int], interpolation: str, flip: bool = False,
           shift: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """The tables that turn a source image [h, w, C] into resize -> flip -> crop, for `device.resample`:
    rows int32 [H, 2, K] and cols int32 [W, 2, K] (index, weight), read-only. `shift` = (dy, dx): output pixel
    (y, x) is pixel (y + dy, x + dx) of the (flipped) resized image, zero outside it (the pad + crop window's
    corner)."""
    (h, w), (out_h, out_w) = src_hw, out_hw
    if h > out_h or w > out_w:
        raise ValueError(f"resample.tables upsamples only: a {h}x{w} source is larger than {out_h}x{out_w}; resize "
                         f"it on the host first")
    dy, dx = shift
    return (axis_table(int(h), int(out_h), interpolation, int(dy)),
            axis_table(int(w), int(out_w), interpolation, int(dx), bool(flip)))
