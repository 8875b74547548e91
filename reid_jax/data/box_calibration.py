"""Calibration of a grounding model's part boxes (MUVA's VGE): catch the boxes that are wrong, fix or replace them.

A grounding MLLM asked for the legs often boxes the whole person (a box of nearly full image height), or answers
a sliver; head / upper body / legs must also come top to bottom. Rules, per part (head, upper body, legs):
  1. no box in the answer                         -> fallback
  2. shorter than min_height or narrower than min_width ("tiny") -> fallback
  3. taller than max_height (the whole person)   -> legs: trimmed to start at the bottom of a good upper-body
                                                    box (if trim_legs and the rest is a plausible legs box);
                                                    otherwise fallback
  4. box centres not in head < upper body < legs order (top to bottom) -> the largest set of parts that is in
     order is kept; the others fall back
A fallback is the part's fixed full-width horizontal band (`bands`, fractions of the image height), flagged in
the output's `status` so that users can drop or down-weight such images.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from reid_jax.errors import UserError

PARTS = ("head", "upper body", "legs")
OK, TRIMMED, FALLBACK = "ok", "trimmed", "fallback"


class CalibrationError(UserError, ValueError):
    """Thresholds that cannot work (the --bands / --min-height / --max-height flags)."""


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Thresholds as fractions of the image height / width; one value per part where a tuple."""

    bands: tuple[tuple[float, float], ...] = ((0.0, 0.2), (0.2, 0.55), (0.55, 1.0))  # fallback (y0, y1)
    min_height: tuple[float, ...] = (0.03, 0.08, 0.08)  # shorter = "tiny": a miss
    min_width: float = 0.05  # narrower = a miss
    max_height: tuple[float, ...] = (0.5, 0.75, 0.85)  # taller = (most of) the whole person was boxed
    trim_legs: bool = True  # fix a too-tall legs box from the upper body instead of falling back

    def validate(self) -> None:
        n = len(PARTS)
        if not (len(self.bands) == len(self.min_height) == len(self.max_height) == n):
            raise CalibrationError(f"calibration: bands, min_height and max_height need {n} values (one per part)")
        for (y0, y1), lo, hi in zip(self.bands, self.min_height, self.max_height):
            if not (0.0 <= y0 < y1 <= 1.0 and 0.0 <= lo < hi <= 1.0):
                raise CalibrationError(f"calibration: band {(y0, y1)} or heights ({lo}, {hi}) out of order or "
                                 "outside [0, 1]")


def band(part: int, cfg: CalibrationConfig) -> np.ndarray:
    y0, y1 = cfg.bands[part]
    return np.array([0.0, y0, 1.0, y1], np.float32)


def _size_problem(box: np.ndarray, part: int, cfg: CalibrationConfig) -> str | None:
    w, h = box[2] - box[0], box[3] - box[1]
    if h < cfg.min_height[part] or w < cfg.min_width:
        return f"tiny ({w:.3f} x {h:.3f} of the image)"
    if h > cfg.max_height[part]:
        return f"{h:.2f} of the image height (> {cfg.max_height[part]}): the whole person"
    return None


def _trim_legs(legs: np.ndarray, upper: np.ndarray, cfg: CalibrationConfig) -> np.ndarray | None:
    """The legs box cut to start at the upper body's bottom, if that leaves a plausible legs box."""
    trimmed = legs.copy()
    trimmed[1] = max(legs[1], upper[3])
    return trimmed if _size_problem(trimmed, 2, cfg) is None else None


def _in_order(boxes: list[np.ndarray], parts: tuple[int, ...]) -> bool:
    centres = [(boxes[p][1] + boxes[p][3]) / 2 for p in parts]
    return all(a < b for a, b in zip(centres, centres[1:]))


def calibrate(boxes: list[np.ndarray | None], cfg: CalibrationConfig = CalibrationConfig()):
    """[3] boxes (normalised x0, y0, x1, y1, or None when the answer had none) ->
    (float32 [3, 4] boxes, [3] status in {ok, trimmed, fallback}, [str] issues naming part and reason)."""
    status, issues = [OK] * len(PARTS), []
    out: list[np.ndarray | None] = [None if b is None else np.asarray(b, np.float32) for b in boxes]
    for p, box in enumerate(out):
        if box is None:
            status[p] = FALLBACK
            issues.append(f"{PARTS[p]}: no box in the answer")
            continue
        why = _size_problem(box, p, cfg)
        if why is None:
            continue
        if p == 2 and why.endswith("whole person") and cfg.trim_legs and status[1] == OK:
            trimmed = _trim_legs(box, out[1], cfg)
            if trimmed is not None:
                out[p], status[p] = trimmed, TRIMMED
                issues.append(f"{PARTS[p]}: {why}; trimmed below the upper body")
                continue
        status[p] = FALLBACK
        issues.append(f"{PARTS[p]}: {why}")
    good = tuple(p for p in range(len(PARTS)) if status[p] != FALLBACK)
    if not _in_order(out, good):
        keep = next(s for n in range(len(good), 0, -1) for s in itertools.combinations(good, n)
                    if _in_order(out, s))
        for p in good:
            if p not in keep:
                status[p] = FALLBACK
                issues.append(f"{PARTS[p]}: out of top-to-bottom order (head, upper body, legs)")
    final = np.stack([band(p, cfg) if status[p] == FALLBACK else out[p] for p in range(len(PARTS))])
    return final.astype(np.float32), status, issues
