"""Part boxes -> patch masks on a ViT's patch grid (MUVA's pseudo masks for the region-mask loss).

A patch (i, j) of a conv with kernel `patch_size` and `stride` covers the pixels [j*s, j*s + p) x [i*s, i*s + p)
of the (H, W) input, so with stride < patch size (CLIP-ReID's 12 on 16) neighbouring patches overlap and a pixel
lies in up to four patches. Which patches belong to a box is therefore a rule, not a given:

  'centre'   (default) the patch's centre (j*s + p/2, i*s + p/2) lies in the box, half-open [x0, x1) x [y0, y1):
             every patch gets one answer, and boxes that tile the image give masks that tile the grid.
  'overlap'  at least `min_overlap` of the patch's area lies in the box.

Boxes are normalised (x0, y0, x1, y1) of the input; a box with x0 < 0 is absent and its mask is all False.
Grids: 256x128 at stride 16 -> 16x8; 384x128 at 16 -> 24x8; 256x128 at 12 -> 21x10.
"""

from __future__ import annotations

import numpy as np

RULES = ("centre", "overlap")


def grid_size(image_size: tuple[int, int], patch_size: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid (the same formula as reid_jax.models.posemb.grid_size, no padding)."""
    h, w = image_size
    if h < patch_size or w < patch_size or stride < 1:
        raise ValueError(f"image {image_size} with patch {patch_size} and stride {stride}: no patch grid")
    return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


def _patch_spans(n: int, patch_size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    start = np.arange(n, dtype=np.float64) * stride
    return start, start + patch_size


def boxes_to_masks(boxes, image_size: tuple[int, int], patch_size: int = 16, stride: int = 16,
                   rule: str = "centre", min_overlap: float = 0.5) -> np.ndarray:
    """float [..., R, 4] normalised boxes -> bool [..., R, rows, cols] patch masks (see the module docstring).

    Flatten the last two axes ([..., R, rows * cols], row-major) for a token-aligned target.
    """
    if rule not in RULES:
        raise ValueError(f"mask rule {rule!r}: expected one of {RULES}")
    boxes = np.asarray(boxes, np.float64)
    h, w = image_size
    rows, cols = grid_size(image_size, patch_size, stride)
    px = boxes[..., [0, 2]] * w  # [..., R, 2] pixel x0, x1
    py = boxes[..., [1, 3]] * h
    ys, ye = _patch_spans(rows, patch_size, stride)
    xs, xe = _patch_spans(cols, patch_size, stride)
    if rule == "centre":
        cy, cx = ys + patch_size / 2, xs + patch_size / 2
        in_y = (cy >= py[..., :1]) & (cy < py[..., 1:])  # [..., R, rows]
        in_x = (cx >= px[..., :1]) & (cx < px[..., 1:])  # [..., R, cols]
        mask = in_y[..., :, None] & in_x[..., None, :]
    else:
        oy = np.clip(np.minimum(ye, py[..., 1:]) - np.maximum(ys, py[..., :1]), 0, None)  # [..., R, rows]
        ox = np.clip(np.minimum(xe, px[..., 1:]) - np.maximum(xs, px[..., :1]), 0, None)
        mask = oy[..., :, None] * ox[..., None, :] >= min_overlap * patch_size * patch_size
    absent = boxes[..., 0] < 0
    return mask & ~absent[..., None, None]
