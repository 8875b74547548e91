"""`python -m reid_jax.data.build NAME --manual_dir=DIR --data_dir=DIR [--config=NAME] [--skip_bad]`.

Turns a dataset's raw download, in the layout its authors ship, into a TFDS dataset (array_record) once.
"""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds
from absl import app, flags, logging

from data_builders import BUILDERS
from data_builders.common import BadItem, ManualDirError
from reid_jax import data

def _define_flags() -> None:
    """CLI flags, defined only when run as a program so that importing `build` defines none."""
    flags.DEFINE_string("manual_dir", None, "folder holding the raw download")
    flags.DEFINE_string("data_dir", None, "where the TFDS dataset is written", required=True)
    flags.DEFINE_string("config", None, "builder config (e.g. small/demo for synthetic_pedestrians)")
    flags.DEFINE_bool("skip_bad", False, "skip corrupt images and malformed entries, counting them")
    flags.DEFINE_string("part_boxes", None, "parts.jsonl from `reid_jax.captioning ground`")
    flags.DEFINE_string("captions", None, "captions.jsonl from `reid_jax.captioning caption` (added to each image's "
                        "captions; for image-ReID sets, CLIP-SCGI's synthesized captions)")


def build(name: str, data_dir, manual_dir=None, config=None, skip_bad=False, part_boxes=None, captions=None):
    """Builds dataset `name` into data_dir; returns the builder."""
    b = data.builder(name, data_dir, config, skip_bad=skip_bad, part_boxes=part_boxes, captions=captions)
    download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
    b.download_and_prepare(download_config=download_config)
    return b


def main(argv):
    if len(argv) != 2 or argv[1] not in BUILDERS:
        print(f"usage: python -m reid_jax.data.build NAME --manual_dir=DIR --data_dir=DIR; NAME is one of "
              f"{', '.join(sorted(BUILDERS))}", file=sys.stderr)
        return 2
    try:
        f = flags.FLAGS
        b = build(argv[1], f.data_dir, f.manual_dir, f.config, f.skip_bad, f.part_boxes, f.captions)
    except (BadItem, ManualDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.info("built %s", b.data_dir)
    print(f"built {argv[1]} -> {b.data_dir}: " + ", ".join(f"{k} {v.num_examples}" for k, v in b.info.splits.items()))
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
