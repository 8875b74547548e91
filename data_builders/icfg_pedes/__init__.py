"""ICFG-PEDES (text-to-image ReID)."""

from data_builders.caption_json import CaptionJson


class IcfgPedes(CaptionJson):
    """ICFG-PEDES: 54,522 images of 4,102 identities (from MSMT17), one fine-grained caption per image."""

    DESCRIPTION = __doc__
    ANNOTATIONS = "ICFG-PEDES.json"
    PATH_KEY = "file_path"
    SPLITS = ("train", "test")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
ICFG-PEDES comes from the authors of "Semantically Self-Aligned Network for Text-to-Image Part-aware Person
Re-identification" (Ding et al., 2021; SSAN's release page). Pass the folder holding the annotations and the
images as --manual_dir:

  ICFG-PEDES/
    ICFG-PEDES.json   a JSON list of {"split": "train"|"test", "captions": [...], "file_path":
                      "test/0001/0001_000_01_0303morning_0008_0.jpg", "processed_tokens": [...], "id": 1}
    imgs/             the images, at imgs/<file_path> (train/, test/)"""
