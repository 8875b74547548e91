"""LUPerson-MLLM: LUPerson images with captions written by multimodal LLMs (train only)."""

from __future__ import annotations

import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from absl import logging

from data_builders.caption_json import load_json
from data_builders.common import BadItem, ManualDirError, ReIDBuilder, caption_records, example
from data_builders.layout import images_in, require

# A caption holding one of these leaked a template placeholder ("[clothing description]", "<attribute>").
PLACEHOLDER_MARKS = ("description]", "<")
# Captions written from a static instruction (the authors' Ts-*.json files, our captioner's *_static sources): the
# stand-ins for a leaked caption of the same image
STATIC_MARKS = ("Ts-", "Ts_", "static")
IMAGE_FOLDERS = ("images", "LUPerson-MLLM")  # ours; the authors' release
CAPTION_FOLDERS = ("captions", "caption")  # ours; the authors' code
MAX_LOGGED = 20  # images without captions named one by one in the log; the total is always logged


class LupersonMllm(ReIDBuilder):
    """LUPerson-MLLM: every image is its own identity (pid = index of its path in sorted order).

    Captions from all files are merged per image, in file-name order, each with its source in
    `caption_sources`: a JSON file's stem (e.g. `Ts-qwen`, `qwen_static`), or a JSONL line's "source". A caption
    that leaks a template placeholder is replaced by one of the same image's static captions (the authors' loader
    does this at load time; here the choice is fixed at build time, seeded by the image's path), and kept as it is
    when the image has none, as their loader does. An image with no caption is logged and skipped.
    """

    DESCRIPTION = __doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The images are LUPerson's ("Unsupervised Pre-training for Person Re-identification", Fu et al., CVPR 2021; from
its authors' release), the captions those of "Harnessing the Power of MLLMs for Transferable Text-to-Image Person
ReID" (Tan et al., CVPR 2024; from its authors' release) and/or reid-jax's own captioner. Arrange them as:

  LUPerson-MLLM/
    images/       the images, in any subfolders (*.jpg, *.jpeg, *.png); or LUPerson-MLLM/, as released
    captions/     one or more caption files (or caption/, as the authors' code reads them):
      <source>.json    a JSON object {"path/under/images.jpg": "caption", ...}; the file stem names the
                       source, one file per (static|template) x captioner, e.g. qwen_static.json, or the
                       authors' released Ts-qwen.json, Td-qwen.json, Ts-shikra.json, Td-shikra.json as they are
                       (keys that are other machines' paths are matched by file name)
      <name>.jsonl     lines {"image": "path/under/images.jpg", "caption": "...", "source": "qwen_template"}
                       (as reid-jax's captioner writes them; a "template_id" field is allowed and ignored)

Image paths in caption files are relative to images/ (a leading "images/" is accepted too), or end in an image's
unique file name. Pass the LUPerson-MLLM/ folder as --manual_dir."""

    def _examples(self, manual_dir: Path):
        image_dir = next((manual_dir / n for n in IMAGE_FOLDERS if (manual_dir / n).is_dir()), None)
        caption_dir = next((manual_dir / n for n in CAPTION_FOLDERS if (manual_dir / n).is_dir()), None)
        require(self, manual_dir, [IMAGE_FOLDERS[0] if image_dir is None else image_dir.name,
                                   CAPTION_FOLDERS[0] if caption_dir is None else caption_dir.name])
        files = sorted(p for p in caption_dir.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise ManualDirError(f"{self.name}: no *.json or *.jsonl caption files in {caption_dir}; "
                                 f"the expected layout is shown below", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        images = images_in(image_dir, recursive=True)
        return {"train": self._train(manual_dir, image_dir, images, files)}

    def _train(self, manual_dir: Path, image_dir: Path, images: list[Path], files: list[Path]):
        keys = [p.relative_to(image_dir).as_posix() for p in images]
        captions, bad = self._read_captions(manual_dir, files, keys)
        yield from bad
        skipped = 0
        for pid, (key, path) in enumerate(zip(keys, images)):  # pid = index over ALL images: stable
            file_name = f"{image_dir.name}/{key}"
            if not captions.get(key):
                skipped += 1
                if skipped <= MAX_LOGGED:
                    logging.warning("%s: no caption for %s; skipped", self.name, file_name)
                continue
            texts, sources = zip(*captions[key])
            yield file_name, example(path, file_name, pid, captions=texts, caption_sources=sources, domain=self.name)
        if skipped:
            logging.warning("%s: %d of %d images had no caption and were skipped", self.name, skipped, len(keys))

    def _read_captions(self, manual_dir: Path, files: list[Path], keys: list[str]):
        """-> ({image key: [(caption, source)]}, [BadItem]); unknown images are logged and ignored, placeholder
        leaks replaced by a static caption of their image (`_replace_leaks`)."""
        known, by_name = set(keys), _unique_names(keys)
        captions, bad = defaultdict(list), []
        for path in files:
            where = path.relative_to(manual_dir).as_posix()
            unknown = []
            records = _json_records(path, where) if path.suffix == ".json" else caption_records(path, where)
            for record in records:
                if isinstance(record, BadItem):
                    bad.append(record)
                    continue
                image, caption, source = record
                key = _image_key(image, known, by_name)
                if key is None:
                    unknown.append(image)
                else:
                    captions[key].append((caption, source))
            if unknown:
                logging.warning("%s: %s: ignored captions of %d images not among the images, e.g. %s",
                                self.name, where, len(unknown), unknown[0])
        return self._replace_leaks(captions), bad

    def _replace_leaks(self, captions: dict) -> dict:
        """Each caption leaking a placeholder -> one of its image's static captions, drawn with a generator seeded
        by the image key (the same build gives the same choice); kept when the image has no static caption."""
        replaced, kept = defaultdict(int), defaultdict(list)
        for key, caps in captions.items():
            static = [c for c, source in caps if _is_static(source) and not _leaks(c)]
            rng = np.random.default_rng(zlib.crc32(key.encode()))
            for i, (caption, source) in enumerate(caps):
                if not _leaks(caption):
                    continue
                if static:
                    caps[i] = (static[int(rng.integers(len(static)))], source)
                    replaced[source] += 1
                else:
                    kept[source].append(caption)
        for source, n in replaced.items():
            logging.warning("%s: %s: %d captions with a template placeholder replaced by a static caption of "
                            "the same image", self.name, source, n)
        for source, leaks in kept.items():
            logging.warning("%s: %s: %d captions with a template placeholder kept (their images have no static "
                            "caption), e.g. %r", self.name, source, len(leaks), leaks[0])
        return captions


def _leaks(caption: str) -> bool:
    return any(mark in caption for mark in PLACEHOLDER_MARKS)


def _is_static(source: str) -> bool:
    return any(mark in source for mark in STATIC_MARKS)


def _unique_names(keys: list[str]) -> dict[str, str]:
    """{file name: key} of the images whose file name no other image shares."""
    names = defaultdict(list)
    for key in keys:
        names[key.rsplit("/", 1)[-1]].append(key)
    return {name: ks[0] for name, ks in names.items() if len(ks) == 1}


def _image_key(image: str, known: set[str], by_name: dict[str, str]) -> str | None:
    """The image a caption file names: its path under the image folder (a leading folder name allowed), or, for
    another machine's path as in the authors' release, the image with that unique file name."""
    if image in known:
        return image
    head, _, rest = image.partition("/")
    if head in IMAGE_FOLDERS and rest in known:
        return rest
    return by_name.get(image.rsplit("/", 1)[-1])


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
