"""Position-embedding resize against PyTorch's F.interpolate (align_corners=False), the papers' code path."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid_jax.models import posemb
from tests.numerics import assert_close


def _torch_resize(pe: np.ndarray, old, new, mode) -> np.ndarray:
    grid = torch.from_numpy(pe[1:]).reshape(1, *old, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=new, mode=mode, align_corners=False)
    return np.concatenate([pe[:1], out.permute(0, 2, 3, 1).reshape(-1, pe.shape[1]).numpy()])


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("old,new", [((14, 14), (24, 8)), ((14, 14), (16, 8)), ((14, 14), (21, 10)),
                                     ((14, 14), (28, 28)), ((7, 7), (3, 5)), ((24, 8), (14, 14))])
def test_resize_matches_torch(mode, old, new):
    rng = np.random.default_rng(0)
    pe = rng.normal(size=(1 + old[0] * old[1], 16)).astype(np.float32)
    ours = posemb.resize_posemb(pe, new, mode, old_grid=old if old[0] != old[1] else None)
    ref = _torch_resize(pe, old, new, mode)
    assert ours.shape == (1 + new[0] * new[1], 16)
    np.testing.assert_array_equal(ours[0], pe[0])  # CLS kept apart
    assert_close(ours, ref, 1e-5, "resized position embedding")  # relative to the largest value


def test_same_grid_is_identity_and_errors():
    pe = np.random.default_rng(0).normal(size=(197, 4)).astype(np.float32)
    assert posemb.resize_posemb(pe, (14, 14)) is pe
    with pytest.raises(ValueError, match="not a square grid"):
        posemb.resize_posemb(pe[:-1], (24, 8))
    with pytest.raises(ValueError, match="posemb_interpolation"):
        posemb.resize_posemb(pe, (24, 8), "nearest")


@pytest.mark.parametrize("size,patch,stride,grid", [((384, 128), 16, 16, (24, 8)), ((256, 128), 16, 16, (16, 8)),
                                                    ((256, 128), 16, 12, (21, 10)), ((224, 224), 16, 16, (14, 14))])
def test_grid_size(size, patch, stride, grid):
    assert posemb.grid_size(size, patch, stride) == grid
