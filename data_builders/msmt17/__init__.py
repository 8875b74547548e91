"""MSMT17 (image ReID, 15 cameras): image folders plus list files that give each image's identity."""

import re
from pathlib import Path

from data_builders.common import BadItem, example
from data_builders.layout import require
from data_builders.market_style import MarketStyle


class Msmt17(MarketStyle):
    """MSMT17 (V1): 4,101 identities from 15 campus cameras; the train split includes the official val list."""

    DESCRIPTION = __doc__
    NAME_RE = re.compile(r"(?P<pid>\d+)_\d+_(?P<cam>\d+)_[^_]+_\d+_\d+\.jpg")
    NAME_HINT = "PPPP_NNN_CC_DATEtime_FFFF_N.jpg (e.g. 0000_000_01_0303morning_0015_0.jpg; camera = third field)"
    NUM_CAMERAS = 15
    # split -> (image folder, list file) pairs; list lines read "path/relative/to/folder pid"
    LISTS = {"train": [("train", "list_train.txt"), ("train", "list_val.txt")],
             "query": [("test", "list_query.txt")],
             "gallery": [("test", "list_gallery.txt")]}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MSMT17 comes from its authors on request, for "Person Transfer GAN to Bridge Domain Gap for Person
Re-Identification" (Wei et al., CVPR 2018). Unzip MSMT17_V1 and pass the folder it makes as --manual_dir:

  MSMT17_V1/
    train/                0000/0000_000_01_0303morning_0015_0.jpg ...
    test/                 0000/0000_000_01_0303morning_0008_0.jpg ...
    list_train.txt        lines "0000/0000_000_01_0303morning_0015_0.jpg 0"   (relative to train/)
    list_val.txt          same format, relative to train/ (added to the train split)
    list_query.txt        relative to test/ (query)
    list_gallery.txt      relative to test/ (gallery)

The camera is the third "_" field of the file name (01..15, stored as 0..14)."""

    def _examples(self, manual_dir: Path):
        require(self, manual_dir, ["train", "test"] + [lst for pairs in self.LISTS.values() for _, lst in pairs])
        return {split: self._listed(manual_dir, pairs) for split, pairs in self.LISTS.items()}

    def _listed(self, manual_dir: Path, pairs):
        for folder, list_name in pairs:
            with open(manual_dir / list_name, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield self._line(manual_dir, folder, f"{list_name}:{lineno}", line)

    def _line(self, manual_dir: Path, folder: str, where: str, line: str):
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            return BadItem(f"{where}: expected \"relative/path.jpg pid\", found {line.strip()!r}")
        rel = f"{folder}/{fields[0]}"
        path = manual_dir / rel
        if not path.is_file():
            return BadItem(f"{where}: image {rel} not found")
        parsed = self._parse(path.name, rel)
        if isinstance(parsed, BadItem):
            return parsed
        return rel, example(path, rel, int(fields[1]), parsed[1], domain=self.name)
