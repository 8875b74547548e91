"""Position-embedding grids for ReID input sizes.

CLIP is pretrained on 224x224 images (a 14x14 patch grid); ReID uses tall crops (384x128 -> 24x8 at stride 16,
256x128 -> 16x8, or 21x10 with CLIP-ReID's overlapping stride 12). The pretrained grid is resized once, at load
time, exactly as the PyTorch code of the papers does it: `F.interpolate(grid, size, mode, align_corners=False)`
without antialiasing, the CLS position kept apart. `jax.image.resize` differs from that (it antialiases when
shrinking and its cubic kernel uses a=-0.5, PyTorch's a=-0.75), so the resize is written out here as two
separable [out, in] interpolation matrices built with PyTorch's index arithmetic, in float64 numpy.
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("bilinear", "bicubic")
_TORCH_CUBIC_A = -0.75  # PyTorch's bicubic kernel constant (upsample_bicubic2d).


def grid_size(image_size: tuple[int, int], patch_size: int, stride: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of a conv with kernel `patch_size` and `stride` over an (H, W) image, no padding."""
    h, w = image_size
    if h < patch_size or w < patch_size:
        raise ValueError(f"image_size {image_size} is smaller than the patch size {patch_size}")
    return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


def _source_index(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch's `area_pixel_compute_source_index` for align_corners=False with an explicit output size: [n_out]."""
    scale = n_in / n_out
    return (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation (PyTorch clamps negative source indices to 0)."""
    src = np.maximum(_source_index(n_in, n_out), 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    return m


def _cubic_kernel(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 from floor(src): [n, 4]."""
    d = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1)
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0  # |d| <= 1
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a  # 1 < |d| < 2
    return np.where(d <= 1.0, near, far)


def _bicubic_matrix(n_in: int, n_out: int, a: float = _TORCH_CUBIC_A) -> np.ndarray:
    """[n_out, n_in] weights of 1-D bicubic interpolation; out-of-range taps read the border (PyTorch's clamp)."""
    src = _source_index(n_in, n_out)  # not clamped for cubic
    i0 = np.floor(src).astype(np.int64)
    weights = _cubic_kernel(src - i0, a)
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    for tap in range(4):
        idx = np.clip(i0 - 1 + tap, 0, n_in - 1)
        np.add.at(m, (rows, idx), weights[:, tap])
    return m


def resize_grid(grid: np.ndarray, new_hw: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resizes a [h, w, D] grid to [H, W, D] like `F.interpolate(..., align_corners=False)`."""
    if method not in METHODS:
        raise ValueError(f"posemb_interpolation must be one of {METHODS}, got {method!r}")
    build = _bilinear_matrix if method == "bilinear" else _bicubic_matrix
    h, w, _ = grid.shape
    mh, mw = build(h, new_hw[0]), build(w, new_hw[1])
    return np.einsum("Hh,hwd,Ww->HWd", mh, grid.astype(np.float64), mw)


def resize_posemb(posemb: np.ndarray, new_grid: tuple[int, int], method: str = "bilinear",
                   old_grid: tuple[int, int] | None = None) -> np.ndarray:
    """Resizes a CLIP position embedding [1 + h*w, D] to [1 + H*W, D]; the CLS row is kept as it is.

    `old_grid` defaults to the square grid a pretrained CLIP checkpoint has.
    """
    n, dim = posemb.shape
    if old_grid is None:
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            raise ValueError(f"position embedding with {n - 1} patch positions is not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n - 1:
        raise ValueError(f"position embedding has {n - 1} patch positions, not a {old_grid} grid")
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    grid = posemb[1:].reshape(old_grid[0], old_grid[1], dim)
    resized = resize_grid(grid, new_grid, method).reshape(-1, dim)
    return np.concatenate([posemb[:1], resized.astype(posemb.dtype)], axis=0)
