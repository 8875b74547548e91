"""A stand-in for a grounding MLLM on the synthetic pedestrians, whose part boxes are exact: the boxes a real
model would answer, then the same calibration the real answers get (`box_calibration.calibrate`). MUVA's training
applies it to its training set (`config.muva.simulate_grounding`).

Per image (deterministic in its seed): every box edge moves by N(0, jitter) of the box's size; with probability
`whole_person` the legs box covers the whole person (the failure the MUVA paper shows), with `tiny` it shrinks to
a sliver, with `missing` a part gets no box at all.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from reid_jax.data import box_calibration
from reid_jax.data.box_calibration import CalibrationConfig


@dataclasses.dataclass(frozen=True)
class GroundingNoise:
    jitter: float = 0.1  # std of each edge's shift, as a fraction of the box's width / height
    whole_person: float = 0.1  # probability that the legs box spans head to feet
    tiny: float = 0.05  # probability that the legs box shrinks to a sliver (over-splitting)
    missing: float = 0.02  # probability, per part, that the answer has no box


def simulate(boxes: np.ndarray, rng: np.random.Generator, noise: GroundingNoise,
             cfg: CalibrationConfig = CalibrationConfig()) -> tuple[np.ndarray, list[str]]:
    """Exact boxes float [3, 4] (normalised; x0 < 0 = absent) -> (calibrated noisy boxes [3, 4], status [3])."""
    boxes = np.asarray(boxes, np.float64)
    out: list[np.ndarray | None] = []
    for b in boxes:
        if b[0] < 0:
            out.append(None)
            continue
        size = np.array([b[2] - b[0], b[3] - b[1]] * 2)
        out.append(np.clip(b + rng.normal(0.0, noise.jitter, 4) * size, 0.0, 1.0))
    legs = out[2]
    if legs is not None:
        draw = rng.random()
        if draw < noise.whole_person:
            top = min(b[1] for b in out if b is not None)
            legs = np.array([min(b[0] for b in out if b is not None), top, max(b[2] for b in out if b is not None),
                             legs[3]])
        elif draw < noise.whole_person + noise.tiny:
            legs = np.array([legs[0], legs[3] - 0.02, legs[2], legs[3]])
        out[2] = legs
    out = [None if b is None or rng.random() < noise.missing else b for b in out]
    for b in out:  # keep boxes well-formed after the jitter
        if b is not None:
            b[[0, 2]], b[[1, 3]] = np.sort(b[[0, 2]]), np.sort(b[[1, 3]])
    final, status, _ = box_calibration.calibrate(out, cfg)
    return final, status


def simulate_table(boxes: np.ndarray, seed: int, noise: GroundingNoise) -> tuple[np.ndarray, np.ndarray]:
    """Every record's boxes [N, 3, 4] -> (calibrated noisy boxes [N, 3, 4], fallback count per part [3])."""
    out = np.empty_like(np.asarray(boxes, np.float32))
    fallbacks = np.zeros(3, np.int64)
    for i, b in enumerate(boxes):
        out[i], status = simulate(b, np.random.default_rng([seed, i]), noise)
        fallbacks += np.asarray([s == box_calibration.FALLBACK for s in status])
    return out, fallbacks
