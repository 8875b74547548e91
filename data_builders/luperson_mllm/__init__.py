"""LUPerson-MLLM: LUPerson images with captions written by multimodal LLMs (train only)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from absl import logging

from data_builders.caption_json import load_json
from data_builders.common import BadItem, ManualDirError, ReIDBuilder, caption_records, example
from data_builders.layout import images_in, require

# A caption holding one of these leaked a template placeholder ("[clothing description]", "<attribute>").
PLACEHOLDER_MARKS = ("description]", "<")
MAX_LOGGED = 20  # images without captions named one by one in the log; the total is always logged


class LupersonMllm(ReIDBuilder):
    """LUPerson-MLLM: every image is its own identity (pid = index of its path in sorted order).

    Captions from all files are merged per image, in file-name order, each with its source in
    `caption_sources`: a JSON file's stem (e.g. `qwen_static`), or a JSONL line's "source". Captions that leak a
    template placeholder are dropped; an image left with no caption is logged and skipped.
    """

    DESCRIPTION = __doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The images are LUPerson's ("Unsupervised Pre-training for Person Re-identification", Fu et al., CVPR 2021; from
its authors' release), the captions those of "Harnessing the Power of MLLMs for Transferable Text-to-Image Person
ReID" (Tan et al., CVPR 2024; from its authors' release) and/or reid-jax's own captioner. Arrange them as:

  LUPerson-MLLM/
    images/       the images, in any subfolders (*.jpg, *.jpeg, *.png)
    captions/     one or more caption files:
      <source>.json    a JSON object {"path/under/images.jpg": "caption", ...}; the file stem names the
                       source, one file per (static|template) x captioner, e.g. qwen_static.json
      <name>.jsonl     lines {"image": "path/under/images.jpg", "caption": "...", "source": "qwen_template"}
                       (as reid-jax's captioner writes them; a "template_id" field is allowed and ignored)

Image paths in caption files are relative to images/ (a leading "images/" is accepted too). Pass the
LUPerson-MLLM/ folder as --manual_dir."""

    def _examples(self, manual_dir: Path):
        require(self, manual_dir, ["images", "captions"])
        files = sorted(p for p in (manual_dir / "captions").iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise ManualDirError(f"{self.name}: no *.json or *.jsonl caption files in {manual_dir / 'captions'}; "
                                 f"the expected layout is shown below", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        images = images_in(manual_dir / "images", recursive=True)
        return {"train": self._train(manual_dir, images, files)}

    def _train(self, manual_dir: Path, images: list[Path], files: list[Path]):
        keys = [p.relative_to(manual_dir / "images").as_posix() for p in images]
        captions, bad = self._read_captions(manual_dir, files, set(keys))
        yield from bad
        skipped = 0
        for pid, (key, path) in enumerate(zip(keys, images)):  # pid = index over ALL images: stable
            file_name = f"images/{key}"
            if not captions.get(key):
                skipped += 1
                if skipped <= MAX_LOGGED:
                    logging.warning("%s: no caption for %s; skipped", self.name, file_name)
                continue
            texts, sources = zip(*captions[key])
            yield file_name, example(path, file_name, pid, captions=texts, caption_sources=sources, domain=self.name)
        if skipped:
            logging.warning("%s: %d of %d images had no caption and were skipped", self.name, skipped, len(keys))

    def _read_captions(self, manual_dir: Path, files: list[Path], known: set[str]):
        """-> ({image key: [(caption, source)]}, [BadItem]); drops placeholder leaks and unknown images (logged)."""
        captions, bad = defaultdict(list), []
        for path in files:
            where = path.relative_to(manual_dir).as_posix()
            leaked, unknown = [], []
            records = _json_records(path, where) if path.suffix == ".json" else caption_records(path, where)
            for record in records:
                if isinstance(record, BadItem):
                    bad.append(record)
                    continue
                image, caption, source = record
                key = image[len("images/"):] if image not in known and image.startswith("images/") else image
                if key not in known:
                    unknown.append(image)
                elif any(mark in caption for mark in PLACEHOLDER_MARKS):
                    leaked.append(caption)
                else:
                    captions[key].append((caption, source))
            if leaked:
                logging.warning("%s: %s: dropped %d captions with a template placeholder, e.g. %r",
                                self.name, where, len(leaked), leaked[0])
            if unknown:
                logging.warning("%s: %s: ignored captions of %d images not under images/, e.g. %s",
                                self.name, where, len(unknown), unknown[0])
        return captions, bad


def _json_records(path: Path, where: str):
    """(image, caption, source) per key of a JSON object file; the source is the file stem."""
    try:
        data = load_json(path)
    except BadItem as e:
        yield e
        return
    if not isinstance(data, dict):
        yield BadItem(f"{where}: expected a JSON object {{\"image path\": \"caption\"}}, found {type(data).__name__}")
        return
    for image, caption in data.items():
        if not isinstance(caption, str):
            yield BadItem(f"{where}: {image!r} maps to {caption!r}; expected a caption string")
        elif not caption.strip():
            yield BadItem(f"{where}: {image!r} maps to an empty caption {caption!r}; expected a non-empty caption "
                          f"string (remove the key or caption the image again)")
        else:
            yield image, caption, path.stem
