"""Market-1501 (image ReID, 6 cameras)."""

import re

from data_builders.market_style import MarketStyle


class Market1501(MarketStyle):
    """Market-1501: 1,501 identities from 6 cameras at Tsinghua University."""

    DESCRIPTION = __doc__
    NAME_RE = re.compile(r"(?P<pid>-1|\d+)_c(?P<cam>\d)s\d+_\d+_\d+\.jpg")
    NAME_HINT = "PPPP_cCsS_FFFFFF_BB.jpg (e.g. 0002_c1s1_000451_03.jpg; pid -1 = junk, 0000 = distractor)"
    NUM_CAMERAS = 6
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Market-1501 comes from its authors' page for the paper "Scalable Person Re-identification: A Benchmark"
(Zheng et al., ICCV 2015). Unzip Market-1501-v15.09.15.zip and pass the folder it makes as --manual_dir:

  Market-1501-v15.09.15/
    bounding_box_train/   0002_c1s1_000451_03.jpg ...  (train)
    query/                0001_c1s1_001051_00.jpg ...  (query)
    bounding_box_test/    0000_c1s1_000151_01.jpg ...  (gallery; -1 = junk, dropped; 0000 = distractor, kept)

Other folders (gt_bbox/, gt_query/, bounding_box_test's Thumbs.db) are ignored."""
