"""Dataset specs -> (source, index): the one way a task opens its data.

A spec is {name, split, config, label, domains} (a ConfigDict or dict): a TFDS dataset split, its builder config
("" = the builder's default), the label that names it in metrics, and optionally the domains to keep. Your own
dataset, built from a manifest (`python -m reid_jax.data.build manifest --name=NAME ...`), is {name: 'manifest',
config: NAME}. The built-in synthetic set is built on demand when `auto_build` is set.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from reid_jax import data, errors
from reid_jax.data import index as index_lib
from reid_jax.data import sources as sources_lib
from reid_jax.data.records import as_str


def data_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """config.data.data_dir, else WORKDIR/data (where the demos build the built-in set)."""
    return errors.expand_path(config.data.data_dir) or Path(workdir) / "data"


def dataset_source(spec, data_dir: Path, auto_build: bool, decode_image: bool = True):
    """(source, index) of a dataset split named by {name, split, config}; builds built-in sets on demand."""
    args = (spec.name, spec.split, data_dir, spec.get("config") or None)
    try:
        source = data.load_source(*args, decode_image=decode_image)
    except FileNotFoundError:
        if not (auto_build and spec.name == "synthetic_pedestrians"):
            raise
        from reid_jax.data import build

        build.build(spec.name, data_dir, config=args[3])
        source = data.load_source(*args, decode_image=decode_image)
    return source, index_lib.split_index(*args)


def _as_spec(spec) -> ml_collections.ConfigDict:
    if isinstance(spec, ml_collections.ConfigDict):
        return spec
    if isinstance(spec, dict):
        return ml_collections.ConfigDict(spec)
    if hasattr(spec, "to_dict"):  # FrozenConfigDict
        return ml_collections.ConfigDict(spec.to_dict())
    raise TypeError(f"a dataset spec is a ConfigDict or dict {{name, split, config, label, domains}}, got {spec!r}")


def _spec_domains(spec) -> list[str]:
    """The spec's `domains` filter as a list of str ([] = every domain)."""
    domains = spec.get("domains") or []
    if isinstance(domains, (str, bytes)):
        domains = [domains]
    return [as_str(d) for d in domains]


def _describe_one(spec) -> str:
    config = spec.get("config") or ""
    return f"{spec.name}{f'/{config}' if config else ''} split {spec.split!r}"


def _restricted(spec, data_dir: Path, auto_build: bool, decode_image: bool):
    """(source, index) of one spec, restricted to its `domains` when it names any."""
    source, index = dataset_source(spec, data_dir, auto_build, decode_image)
    domains = _spec_domains(spec)
    if not domains:
        return source, index
    present = sorted(set(np.asarray(index.domains).tolist()))
    missing = [d for d in domains if d not in present]
    if missing:
        raise errors.ConfigError(f"dataset {_describe_one(spec)} has no records of domain(s) {missing} (asked for "
                                 f"{domains}); its domains are {present}")
    records = index.subset(domains)
    return sources_lib.SubsetSource(source, records), sources_lib.subset_index(index, records)


def _unique(labels: list[str]) -> list[str]:
    """Labels made distinct: a repeated label gets '#k' (k = its position in the list) appended."""
    return [lb if labels.count(lb) == 1 else f"{lb}#{k}" for k, lb in enumerate(labels)]


def training_set(specs, data_dir: Path, auto_build: bool, decode_image: bool = True):
    """(source, index) of the training data: one dataset spec or a list of them.

    Each spec is {name, split, config, label, domains}: `domains` (list of str, optional; empty or missing = every
    domain) keeps only those records. One spec without `domains` gives `dataset_source`'s (source, index)
    unchanged; one with `domains` a `SubsetSource` of it (the records' own domains kept). Several specs are
    concatenated (`ConcatSource` / `concat_index`): pids and camids shifted so that sources never share an
    identity or a camera, and every record's domain set to its spec's `label` (or name; repeated labels get
    '#k'), so domain-aware code sees one domain per source.
    """
    many = isinstance(specs, (list, tuple))
    specs = [_as_spec(s) for s in (specs if many else [specs])]
    if not specs:
        raise errors.ConfigError("training_set: no dataset specs given")
    parts = [_restricted(s, data_dir, auto_build, decode_image) for s in specs]
    if len(parts) == 1:
        return parts[0]
    labels = _unique([str(s.get("label") or s.name) for s in specs])
    sources, indexes = zip(*parts)
    return sources_lib.ConcatSource(sources, indexes, labels), sources_lib.concat_index(indexes, labels)


def evaluation_set(spec, split: str, data_dir: Path, auto_build: bool, decode_image: bool = True):
    """(source, index) of split `split` of the dataset `spec` names (its own `split` is ignored), restricted to
    the spec's `domains` when given (e.g. the query / gallery of the unseen domain)."""
    spec = _as_spec(spec).to_dict()
    spec["split"] = split
    return _restricted(ml_collections.ConfigDict(spec), data_dir, auto_build, decode_image)


def describe(specs) -> str:
    """'name/config split ...' of one spec or a list of them (for messages)."""
    specs = specs if isinstance(specs, (list, tuple)) else [specs]
    return " + ".join(_describe_one(_as_spec(s)) for s in specs)
