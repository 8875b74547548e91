"""RSTPReid (text-to-image ReID)."""

from data_builders.caption_json import CaptionJson


class RstpReid(CaptionJson):
    """RSTPReid: 20,505 images of 4,101 identities (from MSMT17), two captions per image."""

    DESCRIPTION = __doc__
    ANNOTATIONS = "data_captions.json"
    PATH_KEY = "img_path"
    SPLITS = ("train", "val", "test")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
RSTPReid comes from the authors of "DSSL: Deep Surroundings-person Separation Learning for Text-based Person
Retrieval" (Zhu et al., ACM MM 2021). Pass the folder holding the annotations and the images as --manual_dir:

  RSTPReid/
    data_captions.json   a JSON list of {"id": 0, "img_path": "0000_c14_0031.jpg", "captions": [...],
                         "split": "train"|"val"|"test"}
    imgs/                the images, at imgs/<img_path>"""
