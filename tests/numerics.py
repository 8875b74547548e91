"""The one numerical comparison of the test suite: errors measured against the magnitude of what is compared.

An absolute tolerance means something different on an array whose values reach 50 than on one of unit scale, and
a per-element relative tolerance fails on any element that came out near zero by cancellation. Here every element
of `actual` may differ from `expected` by at most `rtol * scale`, the scale being max |expected| over the whole
array unless the caller names a better one (a parameter's movement rather than its value, say). Float32 rounding
and a different summation order (XLA's CPU kernels differ with the instruction set) change results by a small
multiple of 1.2e-7 of that scale; a real bug changes them by far more.

Set REID_NUMERICS_LOG=<file> to append `<test id>\t<name>\t<error / tolerance>` for every comparison made, to see
how much margin each tolerance leaves.
"""

from __future__ import annotations

import os

import numpy as np


def _arrays(actual, expected) -> tuple[np.ndarray, np.ndarray]:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape {a.shape} != expected shape {e.shape}")
    return a, e


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    a, e = _arrays(actual, expected)
    return float(np.abs(a - e).max() / np.abs(e).max())


def _log(name: str, ratio: float) -> None:
    path = os.environ.get("REID_NUMERICS_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{name}\t{ratio:.4g}\n")


def assert_close(actual, expected, rtol: float, name: str = "", scale: float | None = None) -> float:
    """Asserts |actual - expected| <= rtol * scale for every element; scale defaults to max |expected|.

    `name` says which array failed; the message gives the worst element, both values and the margin. Shapes must
    be equal and non-finite values fail; all-zero expected values must come out exactly zero unless a scale is
    given. Returns the worst error as a fraction of the tolerance."""
    a, e = _arrays(actual, expected)
    label = name or "array"
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        raise AssertionError(f"{label}: non-finite values (actual {np.isfinite(a).mean():.0%} finite, "
                             f"expected {np.isfinite(e).mean():.0%} finite)")
    if scale is None:
        scale = float(np.abs(e).max()) if e.size else 0.0
    err = np.abs(a - e)
    worst = np.unravel_index(int(np.argmax(err)), err.shape) if err.size else ()
    tol = rtol * scale
    if not err.size or not err[worst]:
        ratio = 0.0  # equal, all-zero expected values included
    elif not scale > 0:
        raise AssertionError(f"{label}: expected all zeros, got {a[worst]:.3g} at {worst}; if that is rounding, "
                             "pass the scale it is relative to")
    else:
        ratio = float(err[worst] / tol)
    _log(label, ratio)
    if ratio > 1.0:
        where = f" at {tuple(int(i) for i in worst)}" if err.ndim else ""
        raise AssertionError(
            f"{label}: |actual - expected| = {err[worst]:.3g}{where} (actual {a[worst]:.7g}, expected "
            f"{e[worst]:.7g}) exceeds {rtol:g} x scale {scale:.4g} = {tol:.3g} ({ratio:.2f}x the tolerance)")
    return ratio
