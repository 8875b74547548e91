"""CUHK-PEDES (text-to-image ReID)."""

from data_builders.caption_json import CaptionJson


class CuhkPedes(CaptionJson):
    """CUHK-PEDES: 40,206 images of 13,003 identities, two human-written captions per image.

    pid is the JSON id as given (1-based); IRRA's loader trains on id - 1. The input pipeline relabels.
    """

    DESCRIPTION = __doc__
    ANNOTATIONS = "reid_raw.json"
    PATH_KEY = "file_path"
    SPLITS = ("train", "val", "test")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
CUHK-PEDES comes from its authors on request, for "Person Search with Natural Language Description" (Li et al.,
CVPR 2017). Pass the folder holding the annotations and the images as --manual_dir:

  CUHK-PEDES/
    reid_raw.json   a JSON list of {"split": "train"|"val"|"test", "captions": [...], "file_path":
                    "CUHK01/0363004.png", "processed_tokens": [...], "id": 1}
    imgs/           the images, at imgs/<file_path> (CUHK01/, CUHK03/, Market/, test_query/, train_query/)"""
