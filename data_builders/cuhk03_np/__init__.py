"""CUHK03-NP (image ReID, 2 cameras per identity; the new 767/700 protocol)."""

import re

import tensorflow_datasets as tfds

from data_builders.market_style import MarketStyle


class Cuhk03Np(MarketStyle):
    """CUHK03 under the new protocol (767 train, 700 test identities); config `detected` or `labeled` boxes."""

    DESCRIPTION = __doc__
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="detected", description="boxes from the pedestrian detector (default)"),
        tfds.core.BuilderConfig(name="labeled", description="hand-drawn boxes"),
    ]
    NAME_RE = re.compile(r"(?P<pid>\d+)_c(?P<cam>\d)_\d+\.png")
    NAME_HINT = "PPPP_cC_N.png (e.g. 0001_c1_1.png)"
    NUM_CAMERAS = 2
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
CUHK03-NP is CUHK03 ("DeepReID", Li et al., CVPR 2014) re-split by "Re-ranking Person Re-identification with
k-reciprocal Encoding" (Zhong et al., CVPR 2017), whose authors distribute it as cuhk03-np.zip. Unzip it and pass
the folder it makes as --manual_dir; --config=detected (default) or --config=labeled picks the boxes:

  cuhk03-np/
    detected/
      bounding_box_train/   0001_c1_1.png ...  (train)
      query/                (query)
      bounding_box_test/    (gallery)
    labeled/
      bounding_box_train/ query/ bounding_box_test/   (same, hand-drawn boxes)"""

    def _root(self) -> str:
        return f"{self.builder_config.name}/"
