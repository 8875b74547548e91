"""Text-to-image ReID sets described by one JSON list of annotations (CUHK-PEDES, ICFG-PEDES, RSTPReid).

Each entry names an image under `imgs/`, its identity, its split and its captions. One example is written per
IMAGE: entries that name the same image have their captions merged, verbatim and in file order. pid is the JSON
`id` as given (IRRA trains on id - 1 for CUHK-PEDES; the input pipeline relabels, so the raw id is kept here).
There are no cameras (camid -1) and the captions are human-written (caption_sources []).

An entry with a missing or mistyped field, no captions or an empty (blank) one, an unknown split, a missing image,
or a second entry that gives the same image another id or split is a BadItem naming the JSON file and the entry's
index.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_builders.common import BadItem, ReIDBuilder, example
from data_builders.layout import require

IMAGE_DIR = "imgs"


def load_json(path: Path):
    """Parses a JSON file; malformed JSON is a BadItem naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BadItem(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise BadItem(f"{path}: not UTF-8 text ({e})") from None


class CaptionJson(ReIDBuilder, skip_registration=True):
    ANNOTATIONS: str  # the JSON file, at the top of the manual folder
    PATH_KEY: str  # the entry field holding the image path relative to imgs/
    SPLITS: tuple[str, ...]

    def _examples(self, manual_dir: Path):
        require(self, manual_dir, [self.ANNOTATIONS, IMAGE_DIR])
        entries = load_json(manual_dir / self.ANNOTATIONS)
        if not isinstance(entries, list):
            raise BadItem(f"{manual_dir / self.ANNOTATIONS}: expected a JSON list of annotations, found "
                          f"{type(entries).__name__}")
        images, bad = self._group(entries)
        splits = {split: [] for split in self.SPLITS}
        for file_name, image in images.items():
            splits[image["split"]].append((file_name, image))
        splits[self.SPLITS[0]][:0] = bad  # reported by the first split's writer
        return {split: self._split(manual_dir, items) for split, items in splits.items()}

    def _group(self, entries: list) -> tuple[dict[str, dict], list[BadItem]]:
        """JSON entries -> ({file_name: {split, pid, captions, entry}} in first-seen order, bad entries)."""
        images, bad = {}, []
        for index, entry in enumerate(entries):
            where = f"{self.ANNOTATIONS} entry {index}"
            problem = self._check(entry)
            if problem:
                bad.append(BadItem(f"{where}: {problem}"))
                continue
            file_name = f"{IMAGE_DIR}/{entry[self.PATH_KEY]}"
            image = images.setdefault(file_name, {"split": entry["split"], "pid": entry["id"], "captions": [],
                                                  "entry": index})
            if (image["split"], image["pid"]) != (entry["split"], entry["id"]):
                bad.append(BadItem(f"{where}: {file_name} has id {entry['id']} in split {entry['split']!r}, but "
                                   f"entry {image['entry']} gave it id {image['pid']} in split {image['split']!r}"))
                continue
            image["captions"].extend(entry["captions"])
        return images, bad

    def _check(self, entry) -> str | None:
        """What is wrong with one entry, or None."""
        expected = (f"expected an object with \"id\" (integer), \"{self.PATH_KEY}\" (string), \"captions\" "
                    f"(list of strings) and \"split\" (one of {', '.join(self.SPLITS)})")
        if not isinstance(entry, dict):
            return f"{expected}; found {type(entry).__name__}"
        if not isinstance(entry.get("id"), int) or isinstance(entry.get("id"), bool):
            return f"{expected}; \"id\" is {entry.get('id')!r}"
        if not isinstance(entry.get(self.PATH_KEY), str):
            return f"{expected}; \"{self.PATH_KEY}\" is {entry.get(self.PATH_KEY)!r}"
        captions = entry.get("captions")
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            return f"{expected}; \"captions\" is {captions!r}"
        if not captions:
            return f"{expected}; \"captions\" is [] (an entry needs at least one caption)"
        empty = [i for i, c in enumerate(captions) if not c.strip()]
        if empty:
            return f"{expected}; caption {empty[0]} is empty ({captions[empty[0]]!r}): fix or remove it"
        if entry.get("split") not in self.SPLITS:
            return f"{expected}; \"split\" is {entry.get('split')!r}"
        return None

    def _split(self, manual_dir: Path, items: list):
        for item in items:
            if isinstance(item, BadItem):
                yield item
                continue
            file_name, image = item
            path = manual_dir / file_name
            if not path.is_file():
                yield BadItem(f"{self.ANNOTATIONS} entry {image['entry']}: image {file_name} not found")
                continue
            yield file_name, example(path, file_name, image["pid"], captions=image["captions"], domain=self.name)
