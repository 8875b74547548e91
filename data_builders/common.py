"""What every reid-jax TFDS builder shares: one feature schema, manual-folder checks, bad-item policy.

Builders run without TensorFlow: `file_format='array_record'`, and images go in as encoded bytes or file paths
(encoding a numpy image would need TensorFlow). Every dataset has the same features, so one input pipeline reads
them all; a field a dataset lacks holds its "absent" value:

  image            uint8 [H, W, 3] when read (stored encoded)
  file_name        path relative to the manual folder (the key part-box files and captions refer to)
  pid              the dataset's own identity id (the pipeline relabels); Market-style 0 = distractor
  camid            zero-based camera, -1 without cameras
  captions         list of strings, verbatim; [] for image ReID sets
  caption_sources  one source name per caption (captioner, template), [] when not known
  domain           dataset or visual-domain name
  part_boxes       float32 [3, 4]: head, upper body, legs as normalised (x0, y0, x1, y1); -1 when absent

TFDS writes a split into a temporary folder and renames it when complete, so an interrupted build never reads
as complete. A subclass implements `_examples(manual_dir) -> {split: iterable of (key, example)}`; for an item that
breaks the dataset's rules it yields a `BadItem` (yielded, not raised, so the split can go on), which stops the
build with the file named, or with `skip_bad=True` is skipped and counted in the log. Corrupt or truncated
images are caught here, by decoding each one.
"""

from __future__ import annotations

import inspect
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from reid_jax.errors import UserError

NUM_PARTS = 3  # head, upper body, legs
NO_BOXES = np.full((NUM_PARTS, 4), -1.0, np.float32)


class BadItem(UserError, ValueError):
    """An item that breaks the dataset's rules; the message names the file (and line) and what was expected."""


class ManualDirError(UserError, FileNotFoundError):
    """The manual folder is missing or does not hold the expected layout; the message has the instructions."""


def features() -> tfds.features.FeaturesDict:
    text = tfds.features.Text()
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "file_name": text,
        "pid": np.int64,
        "camid": np.int64,
        "captions": tfds.features.Sequence(text),
        "caption_sources": tfds.features.Sequence(text),
        "domain": text,
        "part_boxes": tfds.features.Tensor(shape=(NUM_PARTS, 4), dtype=np.float32),
    })


def example(image: bytes | Path, file_name: str, pid: int, camid: int = -1, captions=(), caption_sources=(),
            domain: str = "", part_boxes: np.ndarray | None = None) -> dict[str, Any]:
    """One example in the shared schema (absent fields get their absent values)."""
    return {"image": image, "file_name": file_name, "pid": int(pid), "camid": int(camid),
            "captions": list(captions), "caption_sources": list(caption_sources), "domain": domain,
            "part_boxes": NO_BOXES if part_boxes is None else np.asarray(part_boxes, np.float32)}


def check_image(data: bytes, name: str) -> bytes:
    """Decodes the whole image to catch corrupt or truncated files; returns the bytes unchanged."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode not in ("RGB", "L", "RGBA", "P", "CMYK"):
                raise BadItem(f"{name}: unsupported image mode {img.mode}; expected an RGB image")
    except BadItem:
        raise
    except Exception as e:  # PIL raises several types for broken files
        raise BadItem(f"{name}: corrupt or truncated image ({e}); expected a readable JPEG/PNG") from None
    return data


def read_part_boxes(path: str | Path) -> dict[str, np.ndarray]:
    """parts.jsonl (the grounding output) -> {image path: [3, 4] boxes}; each line {"image", "boxes"}."""
    boxes = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                value = np.asarray(rec["boxes"], np.float32)
                if value.shape != (NUM_PARTS, 4):
                    raise ValueError(f"boxes of shape {list(value.shape)}")
            except (ValueError, KeyError, TypeError) as e:
                raise BadItem(f"{path}:{lineno}: expected a JSON object with \"image\" and \"boxes\" "
                              f"([[x0, y0, x1, y1]] x {NUM_PARTS}, normalised); {e}") from None
            boxes[rec["image"]] = value
    return boxes


def caption_records(path: Path, where: str):
    """(image, caption, source) per line {"image", "caption", "source"}; the source defaults to the file stem."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            expected = 'expected a JSON object {"image": str, "caption": str, "source": str}'
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadItem(f"{where}:{lineno}: malformed JSON ({e.msg}, column {e.colno}); {expected}")
                continue
            if (isinstance(rec, dict) and isinstance(rec.get("image"), str) and isinstance(rec.get("caption"), str)
                    and isinstance(rec.get("source", ""), str)):
                yield rec["image"], rec["caption"], rec.get("source") or path.stem
            else:
                yield BadItem(f"{where}:{lineno}: {expected}; found {line.strip()!r}")


def read_captions(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """captions.jsonl (`reid_jax.captioning caption` output) -> {image path: [(caption, source), ...]}."""
    captions: dict[str, list[tuple[str, str]]] = {}
    for record in caption_records(Path(path), str(path)):
        if isinstance(record, BadItem):
            raise record
        image, caption, source = record
        captions.setdefault(image, []).append((caption, source))
    return captions


class ReIDBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of every reid-jax builder; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    DESCRIPTION = ""
    HOMEPAGE = ""

    def __init__(self, *, skip_bad: bool = False, part_boxes: str | Path | None = None,
                 captions: str | Path | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self._skip_bad = skip_bad
        self._part_boxes_file = part_boxes
        self._captions_file = captions

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9's own lookup imports `importlib_resources`, which it only installs for Python < 3.9.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=features(),
                                     homepage=self.HOMEPAGE or None)

    # ------------------------------------------------------------------------------------------ to override
    def _examples(self, manual_dir: Path) -> dict[str, Iterable[tuple[str, dict]]]:
        raise NotImplementedError

    def _needs_manual_dir(self) -> bool:
        return True

    def _generate_examples(self, **kwargs):  # abstract in TFDS; unused: _split_generators yields examples itself
        raise NotImplementedError("subclasses implement _examples")

    # ---------------------------------------------------------------------------------------------- common
    def _manual_dir(self, dl_manager) -> Path:
        try:
            return Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS's way of saying the folder is missing or empty
            raise ManualDirError(f"{self.name}: the manual folder {dl_manager._manual_dir} is missing or empty.\n"
                                 f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}") from None

    def _split_generators(self, dl_manager):
        manual_dir = self._manual_dir(dl_manager) if self._needs_manual_dir() else None
        boxes = read_part_boxes(self._part_boxes_file) if self._part_boxes_file else {}
        captions = read_captions(self._captions_file) if self._captions_file else {}
        return {split: self._checked(split, items, boxes, captions)
                for split, items in self._examples(manual_dir).items()}

    def _checked(self, split: str, items: Iterable[tuple[str, dict] | BadItem], boxes: dict,
                 captions: dict) -> Iterator[tuple[str, dict]]:
        count = skipped = 0
        for item in items:
            try:
                if isinstance(item, BadItem):
                    raise item
                key, ex = item
                if isinstance(ex["image"], Path):
                    ex["image"] = ex["image"].read_bytes()
                check_image(ex["image"], ex["file_name"])
            except BadItem as e:
                if not self._skip_bad:
                    raise BadItem(f"{e}\n(pass --skip_bad to skip such items and count them in the log)") from None
                skipped += 1
                logging.warning("%s/%s: skipped %s", self.name, split, e)
                continue
            if ex["file_name"] in boxes:
                ex["part_boxes"] = boxes[ex["file_name"]]
            for caption, source in captions.get(ex["file_name"], ()):  # added after the dataset's own
                ex["captions"] = [*ex["captions"], caption]
                ex["caption_sources"] = [*ex["caption_sources"], source]
            count += 1
            yield key, ex
        logging.info("%s/%s: %d examples written, %d bad items skipped", self.name, split, count, skipped)
