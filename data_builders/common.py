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
build with the file named, or with `skip_bad=True` is skipped and counted in the log. Every image is decoded
here: a corrupt or truncated one is a BadItem, and one that is not 8-bit RGB (CMYK JPEG, RGBA/grayscale/palette
/16-bit PNG) is stored as PIL's `.convert('RGB')` of it (alpha dropped), as PIL-based ReID loaders read it.
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
    """The manual folder is missing or does not hold the expected layout.

    `message` is the one-line error, `instructions` the dataset's MANUAL_DOWNLOAD_INSTRUCTIONS (where to get the
    data, the layout expected); str() holds both, a CLI prints the message as its error line and the layout after.
    """

    def __init__(self, message: str, instructions: str = ""):
        super().__init__(message)
        self.message, self.instructions = message, instructions

    def __str__(self) -> str:
        return f"{self.message}\n{self.instructions}" if self.instructions else self.message


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


def rgb_image(data: bytes, name: str) -> bytes:
    """Decodes the whole image (catching corrupt or truncated files); returns 8-bit RGB JPEG/PNG bytes: `data`
    itself when it already is one, else PNG (lossless) of PIL's `.convert('RGB')` of it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode == "RGB" and img.format in ("JPEG", "PNG") and not _wide_png(data):
                return data
            try:
                rgb = img.convert("RGB")
            except ValueError as e:  # modes PIL cannot turn into RGB (e.g. 'La')
                raise BadItem(f"{name}: image mode {img.mode} cannot be converted to RGB ({e}); expected an RGB, "
                              f"grayscale, palette, RGBA or CMYK JPEG/PNG") from None
    except BadItem:
        raise
    except Exception as e:  # PIL raises several types for broken files
        raise BadItem(f"{name}: corrupt or truncated image ({e}); expected a readable JPEG/PNG") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:  # unreadable (permissions, a folder named like an image): the item is bad, not the build
        raise BadItem(f"{name}: cannot read the image ({e.strerror}); expected a readable JPEG/PNG file") from None


def _wide_png(data: bytes) -> bool:
    """A PNG with 16 bits per channel (IHDR bit depth, byte 24): PIL reads it as 'RGB' but other decoders (OpenCV,
    which TFDS prefers when installed) keep 16 bits, so it is re-encoded at 8 like every other conversion."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[24] != 8


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
            if not (isinstance(rec, dict) and isinstance(rec.get("image"), str) and isinstance(rec.get("caption"), str)
                    and isinstance(rec.get("source", ""), str)):
                yield BadItem(f"{where}:{lineno}: {expected}; found {line.strip()!r}")
            elif not rec["caption"].strip():
                yield BadItem(f"{where}:{lineno}: empty caption for {rec['image']!r}; {expected} with a non-empty "
                              f"caption (remove the line or caption the image again)")
            else:
                yield rec["image"], rec["caption"], rec.get("source") or path.stem


def read_captions(path: str | Path, skip_bad: bool = False) -> dict[str, list[tuple[str, str]]]:
    """captions.jsonl (`reid_jax.captioning caption` output) -> {image path: [(caption, source), ...]}.

    A bad line stops the build, or with `skip_bad` is skipped and counted in the log."""
    captions: dict[str, list[tuple[str, str]]] = {}
    skipped = 0
    for record in caption_records(Path(path), str(path)):
        if isinstance(record, BadItem):
            if not skip_bad:
                raise BadItem(f"{record}\n(pass --skip_bad to skip such lines and count them in the log)")
            skipped += 1
            logging.warning("%s: skipped %s", path, record)
            continue
        image, caption, source = record
        captions.setdefault(image, []).append((caption, source))
    if skipped:
        logging.warning("%s: %d bad lines skipped", path, skipped)
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

    # TFDS prints download sizes (there is no download) and "prepared to <dir>. Subsequent calls will reuse this
    # data", naming the staging folder data.build builds in; data.build says itself where the build landed.
    def _log_download_bytes(self) -> None:
        logging.info("building %s in %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("built %s in %s", self.name, self.data_dir)

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
            raise ManualDirError(f"{self.name}: the manual folder {dl_manager._manual_dir} is missing or empty",
                                 self.MANUAL_DOWNLOAD_INSTRUCTIONS) from None

    def _split_generators(self, dl_manager):
        manual_dir = self._manual_dir(dl_manager) if self._needs_manual_dir() else None
        boxes = read_part_boxes(self._part_boxes_file) if self._part_boxes_file else {}
        captions = read_captions(self._captions_file, self._skip_bad) if self._captions_file else {}
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
                    ex["image"] = _read_bytes(ex["image"], ex["file_name"])
                ex["image"] = rgb_image(ex["image"], ex["file_name"])
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
        if not count:  # TFDS would fail with an AssertionError traceback ("No examples were yielded")
            raise UserError(f"{self.name}/{split}: no examples to write ({skipped} bad items skipped); a split "
                            f"cannot be empty: the manual folder must hold at least one good item for it")
