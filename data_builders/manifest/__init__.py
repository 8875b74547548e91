"""manifest: your own dataset, listed image by image in a CSV or JSON Lines file, without code.

`python -m reid_jax.data.build manifest --manifest=FILE.csv|FILE.jsonl --data_dir=DIR [--name=NAME]`; a config
then names it as the dataset spec {name: 'manifest', config: NAME, split: ...}. The format: `reader.FORMAT` and
docs/data.md.
"""

from data_builders.manifest.builder import Manifest

__all__ = ["Manifest"]
