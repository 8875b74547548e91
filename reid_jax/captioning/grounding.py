"""MUVA's part grounding: ask a grounding MLLM for head / upper-body / legs boxes, parse, calibrate, record.

Output lines of parts.jsonl (read by every builder's --part_boxes: data_builders.common.read_part_boxes):
  {"image": "path/under/--images.png", "boxes": [[x0, y0, x1, y1]] x 3 (head, upper body, legs; normalised),
   "status": ["ok" | "trimmed" | "fallback"] x 3, "fallback": bool (any part fell back to its fixed band),
   "issues": [str], "answers": [str] x 3 (only when there are issues: the raw answers, to check by eye)}
Run `ground` with --images at the dataset's manual folder (e.g. Market-1501/) so that "image" equals the
builder's file_name, which is how read_part_boxes matches boxes to examples.

'part' asks one question per part (how Qwen-VL, CogVLM and InternVL ground best: one referring phrase each);
'joint' asks once for all three as JSON. An answer with no readable box is asked again `content_retries` times,
then that part falls back (reid_jax/data/box_calibration.py).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from PIL import Image

from reid_jax.captioning import boxes as boxes_lib
from reid_jax.captioning.client import MIME, Request, RequestError, RetryableError
from reid_jax.captioning.runner import Outcome, Stats, read_image
from reid_jax.data import box_calibration

ASK = ("part", "joint")
DIGITS = 6  # decimals kept in the written boxes


@dataclasses.dataclass(frozen=True)
class GroundConfig:
    ask: str = "part"
    part_prompt: str = "Where is the {part} of the person in this image? Answer with its bounding box."
    joint_prompt: str = ("Give the bounding boxes of the head, the upper body and the legs of the person in this "
                         'image, as JSON: {"head": [x0, y0, x1, y1], "upper body": [x0, y0, x1, y1], '
                         '"legs": [x0, y0, x1, y1]}.')
    part_names: tuple[str, ...] = box_calibration.PARTS  # the words put into part_prompt's {part}
    scale: str = "auto"  # answer coordinates: see boxes.SCALES
    content_retries: int = 1  # extra asks when an answer holds no box for the part
    retry_temperature: float = 0.7


def _image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        return img.height, img.width


def _read_boxes(answers: dict[int, str], cfg: GroundConfig, size) -> dict[int, object]:
    """{part: answer} -> {part: normalised box} for the parts whose answer holds a box."""
    out = {}
    for part, answer in answers.items():
        found = boxes_lib.pick(boxes_lib.parse(answer), part, asked_alone=cfg.ask == "part")
        if found is not None:
            out[part] = boxes_lib.to_unit(found.coords, cfg.scale, size)
    return out


def make_job(backend, root: Path, cfg: GroundConfig, calib: box_calibration.CalibrationConfig, stats: Stats):
    """The runner's job: image keys -> Outcomes with parts.jsonl records."""
    if cfg.ask not in ASK:
        raise ValueError(f"--ask {cfg.ask!r}: expected one of {ASK}")
    n_parts = len(box_calibration.PARTS)

    def asks(key: str, image: bytes, parts: list[int], attempt: int) -> list[tuple[int | None, Request]]:
        mime = MIME.get(Path(key).suffix.lower(), "image/jpeg")
        temp = cfg.retry_temperature if attempt else None
        if cfg.ask == "joint":
            return [(None, Request(cfg.joint_prompt, image, mime, temp))]
        return [(p, Request(cfg.part_prompt.format(part=cfg.part_names[p]), image, mime, temp)) for p in parts]

    def job(keys: list[str]) -> list[Outcome]:
        outcomes, todo = [], {}
        for key in keys:
            try:
                image = read_image(root / key)
                size = _image_size(image) if cfg.scale == "pixels" else None
            except OSError as e:  # PIL's UnidentifiedImageError is one
                outcomes.append(Outcome(key, error=f"unreadable image: {e}"))
                continue
            todo[key] = {"image": image, "size": size, "found": {}, "answers": [""] * n_parts,
                         "missing": list(range(n_parts))}
        for attempt in range(cfg.content_retries + 1):
            questions = [(key, part, req) for key, st in todo.items() if st["missing"]
                         for part, req in asks(key, st["image"], st["missing"], attempt)]
            if not questions:
                break
            if attempt:
                stats.add("content_retries", len({k for k, _, _ in questions}))
            try:  # one call for the whole job: the transformers backend batches it
                replies = backend.complete([r for _, _, r in questions])
            except (RetryableError, RequestError) as e:
                return outcomes + [Outcome(k, error=str(e)) for k in todo]
            for (key, part, _), reply in zip(questions, replies):
                st = todo[key]
                for p in (st["missing"] if part is None else [part]):
                    st["answers"][p] = reply
                    st["found"].update(_read_boxes({p: reply}, cfg, st["size"]))
            for st in todo.values():
                st["missing"] = [p for p in range(n_parts) if p not in st["found"]]
        return outcomes + [Outcome(key, _record(key, st, calib)) for key, st in todo.items()]

    return job


def _record(key: str, st: dict, calib: box_calibration.CalibrationConfig) -> dict:
    n_parts = len(box_calibration.PARTS)
    final, status, issues = box_calibration.calibrate([st["found"].get(p) for p in range(n_parts)], calib)
    record = {"image": key, "boxes": [[round(float(v), DIGITS) for v in b] for b in final], "status": status,
              "fallback": box_calibration.FALLBACK in status, "issues": issues}
    if issues:
        record["answers"] = st["answers"]
    return record
