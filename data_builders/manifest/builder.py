"""TFDS builder of a manifest dataset: one builder, one config per dataset name.

The dataset's name is the builder config, made on the spot from the name (there is no fixed list): a build lands in
DATA_DIR/manifest/NAME/VERSION, and a dataset spec opens it as {name: 'manifest', config: NAME, split: ...}, which
the rest of the code reads like any other builder config. Reading needs only the name; building also the manifest
file (`manifest=`), read and checked by `reader`.
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from data_builders.common import BadItem, ReIDBuilder, example
from data_builders.manifest import reader
from reid_jax.errors import UserError
from reid_jax.files import write_text_atomically


class Manifest(ReIDBuilder):
    """Your own dataset, listed in a manifest file (CSV or JSON Lines): one row per image."""

    DESCRIPTION = __doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = reader.FORMAT

    def __init__(self, *, manifest: str | Path | None = None, **kwargs):
        super().__init__(**kwargs)
        self._manifest_file = manifest

    def _create_builder_config(self, builder_config, version):
        """Any valid name is a config (TFDS would only accept those listed in BUILDER_CONFIGS)."""
        del version  # the builder's VERSION
        name = builder_config.name if isinstance(builder_config, tfds.core.BuilderConfig) else builder_config
        name = reader.check_name(name, flag="the manifest dataset's name")
        return tfds.core.BuilderConfig(name=name, description=f"the manifest dataset {name!r}")

    def _needs_manual_dir(self) -> bool:
        return False  # the images are where the manifest says

    def _examples(self, manual_dir: Path):
        del manual_dir
        name = self.builder_config.name
        if self._manifest_file is None:
            raise UserError(f"manifest/{name}: no manifest file to build from; build it with `python -m "
                            f"reid_jax.data.build manifest --manifest=FILE --name={name} --data_dir=DIR`")
        m = reader.read(self._manifest_file)
        if m.bad and not self._skip_bad:  # before any split is written, and before the checks of the whole
            raise BadItem(f"{m.bad[0]}\n(pass --skip_bad to skip such rows and count them in the log)")
        splits = m.splits()
        if not splits:
            raise UserError(f"{m.file}: none of its {len(m.bad)} rows is usable ({len(m.bad)} bad rows skipped)")
        for warning in reader.check_splits(m):
            logging.warning("manifest/%s: %s", name, warning)
        if m.labels is not None:  # TFDS builds in a temporary folder: the file moves with the finished build
            write_text_atomically(Path(self.data_dir) / reader.LABELS_FILE,
                                  json.dumps(m.labels, indent=1, ensure_ascii=False) + "\n")
        first = next(iter(splits))  # bad rows go through the first split's writer, which skips and counts them
        return {split: self._split(m, rows, m.bad if split == first else [], name) for split, rows in splits.items()}

    def _split(self, m: reader.Manifest, rows: list[reader.Row], bad: list[BadItem], name: str):
        yield from bad
        for row in rows:
            yield row.path, example(m.folder / row.path, row.path, m.pid(row), row.camid, captions=row.captions,
                                    domain=row.domain or name)
