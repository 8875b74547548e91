"""PIL's resize run from tables on the device (`reid_jax.data.resample`, `device.resample`) against PIL itself:
byte for byte, alone and with the training flip and pad + crop folded in."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from reid_jax.data import device, resample, transforms

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _on_device(source: np.ndarray, out_hw, interpolation, flip=False, shift=(0, 0)) -> np.ndarray:
    """`device.resample` of one source placed at the top-left of an out_hw array, as the pipeline sends it."""
    rows, cols = resample.tables(source.shape[:2], out_hw, interpolation, flip, shift)
    padded = np.zeros((*out_hw, 3), np.uint8)
    padded[: source.shape[0], : source.shape[1]] = source
    return np.asarray(device.resample(jnp.asarray(padded[None]), jnp.asarray(rows[None]), jnp.asarray(cols[None])))[0]


def _pil(source: np.ndarray, out_hw, interpolation) -> np.ndarray:
    return np.asarray(Image.fromarray(source).resize(out_hw[::-1], PIL_FILTERS[interpolation]))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_device_resize_is_pils_byte_for_byte(interpolation):
    rng = np.random.default_rng(0)
    cases = [((128, 64), (384, 128)), ((7, 5), (7, 5)), ((1, 1), (9, 4)), ((30, 31), (31, 31))]
    cases += [((int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))), (h, w))
              for h, w in rng.integers(2, 48, (40, 2))]
    for src_hw, out_hw in cases:
        source = rng.integers(0, 256, (*src_hw, 3), np.uint8)
        source[0, 0] = 0 if src_hw[0] > 1 else source[0, 0]  # extremes: bicubic overshoots and clips
        source[-1, -1] = 255
        np.testing.assert_array_equal(_on_device(source, out_hw, interpolation),
                                      _pil(source, out_hw, interpolation), err_msg=f"{src_hw} -> {out_hw}")


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
        np.testing.assert_array_equal(_on_device(source, out_hw, "bicubic", flip, (dy, dx)), want,
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
    np.testing.assert_array_equal(transforms.device_source(large, (32, 16), "bicubic"), _pil(large, (32, 16), "bicubic"))
    tall = rng.integers(0, 256, (40, 10, 3), np.uint8)  # larger in one axis only: the host resizes it
    np.testing.assert_array_equal(transforms.device_source(tall, (32, 16), "bilinear"), _pil(tall, (32, 16), "bilinear"))
