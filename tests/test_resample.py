"""PIL's resize run from tables on the device (`reid_jax.data.resample`, `device.resample`) against PIL itself:
byte for byte, alone and with the training flip and pad + crop folded in."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from reid_jax.data import device, resample, transforms

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _on_device(sources: list[np.ndarray], out_hw, interpolation, flip=False, shift=(0, 0)) -> np.ndarray:
    """`device.resample` of a batch of sources, each at the top-left of an out_hw row, as the pipeline sends it."""
    tables = [resample.tables(s.shape[:2], out_hw, interpolation, flip, shift) for s in sources]
    padded = np.zeros((len(sources), *out_hw, 3), np.uint8)
    for row, s in zip(padded, sources):
        row[: s.shape[0], : s.shape[1]] = s
    rows, cols = (jnp.asarray(np.stack(t)) for t in zip(*tables))
    return np.asarray(device.resample(jnp.asarray(padded), rows, cols))


def _pil(source: np.ndarray, out_hw, interpolation) -> np.ndarray:
    return np.asarray(Image.fromarray(source).resize(out_hw[::-1], PIL_FILTERS[interpolation]))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_device_resize_is_pils_byte_for_byte(interpolation):
    """Batches of sources of mixed sizes (the same size, 1 x 1, random) per output size."""
    rng = np.random.default_rng(0)
    for out_hw in [(384, 128), (7, 5), (9, 4), (31, 31), (47, 23), (2, 2)]:
        sizes = [out_hw, (1, 1), (out_hw[0], 1), (1, out_hw[1])]
        sizes += [(int(rng.integers(1, out_hw[0] + 1)), int(rng.integers(1, out_hw[1] + 1))) for _ in range(8)]
        sources = [rng.integers(0, 256, (*hw, 3), np.uint8) for hw in sizes]
        for s in sources:  # extremes next to each other: bicubic overshoots and clips
            s[0, 0], s[-1, -1] = 0, 255
        got = _on_device(sources, out_hw, interpolation)
        for g, s in zip(got, sources):
            np.testing.assert_array_equal(g, _pil(s, out_hw, interpolation), err_msg=f"{s.shape[:2]} -> {out_hw}")


@pytest.mark.parametrize("flip", [False, True])
def test_flip_and_crop_folded_into_the_tables(flip):
    """The tables' flip and shift equal PIL's resize, then `transforms.hflip` and the zero-pad + crop."""
    rng = np.random.default_rng(1)
    source, out_hw, pad = rng.integers(0, 256, (20, 9, 3), np.uint8), (32, 16), 4
    resized = _pil(source, out_hw, "bicubic")
    if flip:
        resized = resized[:, ::-1]
    padded = np.pad(resized, ((pad, pad), (pad, pad), (0, 0)))
    for dy, dx in [(0, 0), (-4, 3), (4, -4), (2, 2), (-1, -3)]:
        want = padded[pad + dy: pad + dy + out_hw[0], pad + dx: pad + dx + out_hw[1]]
        np.testing.assert_array_equal(_on_device([source], out_hw, "bicubic", flip, (dy, dx))[0], want,
                                      err_msg=f"shift {(dy, dx)}")


def test_tables_have_one_shape_per_filter_and_refuse_downsampling():
    for interpolation in ("bilinear", "bicubic"):
        rows, cols = resample.tables((13, 7), (40, 20), interpolation)
        k = resample.num_taps(interpolation)
        assert rows.shape == (40, 2, k) and cols.shape == (20, 2, k) and rows.dtype == np.int32
        one = 1 << resample.PRECISION_BITS  # the weights sum to one, up to each weight's rounding
        assert np.abs(rows[:, 1].sum(1) - one).max() <= k and np.abs(cols[:, 1].sum(1) - one).max() <= k
    with pytest.raises(ValueError, match="larger than 32x16; resize it on the host first"):
        resample.tables((33, 10), (32, 16), "bilinear")
    with pytest.raises(ValueError, match="interpolation must be one of"):
        resample.taps(10, 20, "nearest")


def test_device_source_decodes_small_images_and_resizes_large_ones():
    rng = np.random.default_rng(2)
    small, large = rng.integers(0, 256, (20, 10, 3), np.uint8), rng.integers(0, 256, (50, 30, 3), np.uint8)
    png = io.BytesIO()
    Image.fromarray(small).save(png, format="PNG")
    np.testing.assert_array_equal(transforms.device_source(png.getvalue(), (32, 16), "bilinear"), small)
    assert transforms.device_source(small, (32, 16), "bilinear") is small
    np.testing.assert_array_equal(transforms.device_source(large, (32, 16), "bicubic"),
                                  _pil(large, (32, 16), "bicubic"))
    tall = rng.integers(0, 256, (40, 10, 3), np.uint8)  # larger in one axis only: the host resizes it
    np.testing.assert_array_equal(transforms.device_source(tall, (32, 16), "bilinear"),
                                  _pil(tall, (32, 16), "bilinear"))
