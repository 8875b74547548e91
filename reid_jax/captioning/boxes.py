"""Boxes in the formats grounding MLLMs answer in -> normalised (x0, y0, x1, y1).

Formats read (the first that yields a box wins, in this order):
  <box> tags  Qwen-VL `<ref>head</ref><box>(x0,y0),(x1,y1)</box>`, InternVL `<box>[[x0, y0, x1, y1]]</box>`
  JSON        `{"head": [x0, y0, x1, y1], ...}`, `[{"label": "head", "bbox_2d": [...]}]`, `{"bbox": [...]}`, a bare
              `[x0, y0, x1, y1]` (also inside a ```json fence)
  brackets    CogVLM grounding `head[[302,070,598,226]]`, Shikra `[0.30,0.07,0.60,0.23]`
Coordinates: Qwen-VL, CogVLM and InternVL use integers on 0-1000 of the image; Shikra and some JSON answers
floats on 0-1; Qwen2.5-VL absolute pixels. `scale='auto'` takes a box whose numbers are all <= 1 as 0-1 and
any other as 0-1000; pass 'pixels' (with the image size) for pixel answers, which auto cannot tell from 0-1000.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

import numpy as np

SCALES = ("auto", "1000", "1", "pixels")
# Words that name each part in a labelled answer (matched in lower case, as substrings of the label).
PART_WORDS = (("head", "face", "hair"), ("upper", "torso", "top", "chest", "shirt", "jacket", "coat"),
              ("leg", "lower", "trouser", "pant", "jean", "skirt", "short"))
BOX_KEYS = ("bbox_2d", "bbox", "box", "bounding_box", "coordinates", "position")
LABEL_KEYS = ("label", "name", "part", "object", "ref")

_NUM = r"[-+]?\d+(?:\.\d+)?"
_TAG = re.compile(r"(?:<ref>(?P<label>.*?)</ref>\s*)?<box>(?P<body>.*?)</box>", re.S | re.I)
_BRACKETS = re.compile(rf"\[\[?\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]?\]")
_NUMBERS = re.compile(_NUM)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)
_LABEL_TAIL = re.compile(r"([A-Za-z][A-Za-z \-]*)[\s:=]*$")


class Found(NamedTuple):
    label: str | None  # what the answer calls the box, lower case (None: unlabelled)
    coords: tuple[float, float, float, float]  # as written: x0, y0, x1, y1 in the answer's scale
    fmt: str  # 'json' | 'tag' | 'brackets'


def parse(text: str) -> list[Found]:
    """Every box in a model's answer, in order of appearance, from the first format that has any."""
    for finder in (_tag_boxes, _json_boxes, _bracket_boxes):
        found = finder(text)
        if found:
            return found
    return []


def _is_box(value) -> bool:
    return (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _walk(value, label: str | None, out: list[Found]) -> None:
    if _is_box(value):
        out.append(Found(label, tuple(float(v) for v in value), "json"))
    elif isinstance(value, dict):
        own = next((str(value[k]).lower() for k in LABEL_KEYS if isinstance(value.get(k), str)), label)
        box_key = next((k for k in BOX_KEYS if k in value), None)
        if box_key is not None:
            _walk(value[box_key], own, out)
            return
        for k, v in value.items():
            _walk(v, str(k).lower(), out)
    elif isinstance(value, list):
        for v in value:
            _walk(v, label, out)


def _json_boxes(text: str) -> list[Found]:
    """JSON answers: a fenced block, the whole answer, or objects inside prose ('Here: {...}', '[{...}, ...]').

    A bare list inside prose is left to _bracket_boxes, which keeps the label written before it (CogVLM).
    """
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text.strip())
    objects = re.search(r"\[\s*\{.*\}\s*\]|\{.*\}", text, re.S)
    if objects:
        candidates.append(objects.group(0))
    for chunk in candidates:
        try:
            value = json.loads(chunk)
        except ValueError:
            continue
        out: list[Found] = []
        _walk(value, None, out)
        if out:
            return out
    return []


def _tag_boxes(text: str) -> list[Found]:
    out = []
    for m in _TAG.finditer(text):
        nums = _NUMBERS.findall(m.group("body"))
        if len(nums) == 4:
            label = m.group("label")
            out.append(Found(label.strip().lower() if label else None, tuple(float(n) for n in nums), "tag"))
    return out


def _bracket_boxes(text: str) -> list[Found]:
    out, last = [], 0
    for m in _BRACKETS.finditer(text):
        tail = _LABEL_TAIL.search(text[last:m.start()])  # CogVLM writes the phrase right before its box
        label = " ".join(tail.group(1).lower().split()[-3:]) if tail else None
        out.append(Found(label or None, tuple(float(g) for g in m.groups()), "brackets"))
        last = m.end()
    return out


def to_unit(coords, scale: str = "auto", image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Answer coordinates -> float32 [4] normalised (x0, y0, x1, y1), corners ordered, clipped to [0, 1].

    image_size (H, W) is needed for scale='pixels'.
    """
    c = np.asarray(coords, np.float64)
    if scale == "auto":
        scale = "1" if np.all(np.abs(c) <= 1.0) else "1000"
    if scale == "1000":
        c = c / 1000.0
    elif scale == "pixels":
        if image_size is None:
            raise ValueError("scale='pixels' needs the image size")
        h, w = image_size
        c = c / np.array([w, h, w, h], np.float64)
    elif scale != "1":
        raise ValueError(f"box scale {scale!r}: expected one of {SCALES}")
    x0, x1 = sorted((c[0], c[2]))
    y0, y1 = sorted((c[1], c[3]))
    return np.clip(np.array([x0, y0, x1, y1]), 0.0, 1.0).astype(np.float32)


def matches(label: str | None, part: int) -> bool:
    return label is not None and any(w in label for w in PART_WORDS[part])


def pick(found: list[Found], part: int, asked_alone: bool) -> Found | None:
    """The box of `part` (0 head, 1 upper body, 2 legs) among an answer's boxes.

    A box labelled as that part wins. When the question asked for this part alone, the first box not labelled
    as another part is taken; when it asked for all three, unlabelled boxes are used only if there are exactly
    three (read top to bottom as head, upper body, legs).
    """
    for f in found:
        if matches(f.label, part):
            return f
    others = [f for f in found if not any(matches(f.label, p) for p in range(len(PART_WORDS)))]
    if asked_alone:
        return others[0] if others else None
    return others[part] if len(others) == len(PART_WORDS) and len(found) == len(PART_WORDS) else None
