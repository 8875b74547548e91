"""Occluded-DukeMTMC (occluded image ReID, 8 cameras)."""

from data_builders.dukemtmc_reid import DukemtmcReid


class OccludedDuke(DukemtmcReid):
    """Occluded-DukeMTMC: DukeMTMC-reID re-split so that every query is occluded."""

    DESCRIPTION = __doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Occluded-DukeMTMC comes from "Pose-Guided Feature Alignment for Occluded Person Re-Identification" (Miao et al.,
ICCV 2019): its authors' scripts build it from a DukeMTMC-reID copy. Pass the folder they make as --manual_dir:

  Occluded_Duke/
    bounding_box_train/   0001_c2_f0046182.jpg ...  (train)
    query/                0005_c2_f0046985.jpg ...  (occluded queries)
    bounding_box_test/    0002_c1_f0044158.jpg ...  (gallery)"""
