"""Image-ReID sets in the Market-1501 layout: one folder per split, identity and camera in each file name.

  bounding_box_train/  -> train
  query/               -> query
  bounding_box_test/   -> gallery

A subclass names its file-name pattern (a regex with groups `pid` and `cam`), a readable form of it for error
messages, and its camera count. Cameras are numbered from 1 in the names and stored zero-based. pid -1 (junk
boxes) is dropped everywhere; pid 0 (distractors) is kept in the gallery only, as the standard protocol does.
A file name off the pattern, or with a camera outside 1..NUM_CAMERAS, is a BadItem.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_builders.common import BadItem, ReIDBuilder, example
from data_builders.layout import images_in, require

JUNK, DISTRACTOR = -1, 0


class MarketStyle(ReIDBuilder, skip_registration=True):
    NAME_RE: re.Pattern
    NAME_HINT: str
    NUM_CAMERAS: int
    FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

    def _root(self) -> str:
        """Subfolder of the manual folder that holds FOLDERS ("" = the manual folder itself)."""
        return ""

    def _examples(self, manual_dir: Path):
        root = self._root()
        require(self, manual_dir, [root + folder for folder in self.FOLDERS.values()])
        return {split: self._folder(manual_dir, split, manual_dir / root / folder)
                for split, folder in self.FOLDERS.items()}

    def _folder(self, manual_dir: Path, split: str, folder: Path):
        for path in images_in(folder):
            rel = path.relative_to(manual_dir).as_posix()
            parsed = self._parse(path.name, rel)
            if isinstance(parsed, BadItem):
                yield parsed
                continue
            pid, camid = parsed
            if pid == JUNK or (pid == DISTRACTOR and split != "gallery"):
                continue
            yield rel, example(path, rel, pid, camid, domain=self.name)

    def _parse(self, name: str, rel: str) -> tuple[int, int] | BadItem:
        """File name -> (pid, zero-based camid), or a BadItem naming the file and the expected pattern."""
        match = self.NAME_RE.fullmatch(name)
        if not match:
            return BadItem(f"{rel}: file name does not match the {self.name} pattern {self.NAME_HINT}")
        cam = int(match["cam"])
        if not 1 <= cam <= self.NUM_CAMERAS:
            return BadItem(f"{rel}: camera {cam} outside 1..{self.NUM_CAMERAS} "
                           f"(file names follow {self.NAME_HINT})")
        return int(match["pid"]), cam - 1
