"""Pieces every method's task shares: dataset splits (built on demand for the built-in set) and encoding an
evaluation stream on the mesh (the CLIP to start from is `reid_jax.weights.model_for`)."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from reid_jax import data, errors, evaluate, rerank
from reid_jax.data import index as index_lib
from reid_jax.data import pipeline
from reid_jax.data import sources as sources_lib
from reid_jax.train import loop, mesh as mesh_lib, optimizer, visualize


def data_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """config.data.data_dir, else WORKDIR/data (where the demos build the built-in set)."""
    return errors.expand_path(config.data.data_dir) or Path(workdir) / "data"


def schedule(config: ml_collections.ConfigDict, num_examples: int):
    """(steps_per_epoch, total_steps, optax transformation, learning-rate schedule) for `num_examples` training
    examples per epoch in batches of config.data.batch_size."""
    batch, devices = config.data.batch_size, jax.device_count()
    if batch <= 0 or batch % devices:
        raise errors.UserError(f"config.data.batch_size={batch}: expected a positive multiple of the {devices} "
                               f"device(s); set --config.data.batch_size")
    if batch > num_examples:
        raise errors.UserError(f"config.data.batch_size={batch} is larger than the training set "
                               f"({num_examples} examples of {_describe_train(config.data.train)}); lower "
                               f"--config.data.batch_size or train on a larger set")
    if config.train.epochs < 0:
        raise errors.UserError(f"config.train.epochs={config.train.epochs}: expected 0 (evaluate only) or more")
    steps_per_epoch = num_examples // batch
    total_steps = steps_per_epoch * config.train.epochs
    return (steps_per_epoch, total_steps, *optimizer.make(config.optim, steps_per_epoch, total_steps))


def _describe_train(specs) -> str:
    specs = specs if isinstance(specs, (list, tuple)) else [specs]
    return " + ".join(_describe(_as_spec(s)) for s in specs)


def check_pk_batch(config: ml_collections.ConfigDict) -> None:
    """P x K batches (`pipeline.pk_train`) hold pk.identities * pk.instances images: the epoch length is counted
    with config.data.batch_size, so the two must agree."""
    pk = config.data.pk
    if pk.identities * pk.instances != config.data.batch_size:
        raise errors.ConfigError(f"config.data.batch_size={config.data.batch_size} must equal config.data.pk.identities "
                         f"x instances = {pk.identities} x {pk.instances}")


def class_means(feats: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [C, D]: the mean of the rows `feats` [N, D] of each class `labels` [N] in 0..C-1 (0 when empty)."""
    sums = np.zeros((num_classes, feats.shape[1]), np.float64)
    np.add.at(sums, labels, feats)
    return (sums / np.maximum(np.bincount(labels, minlength=num_classes), 1)[:, None]).astype(np.float32)


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
    return [d.decode() if isinstance(d, bytes) else str(d) for d in domains]


def _describe(spec) -> str:
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
        raise errors.ConfigError(f"dataset {_describe(spec)} has no records of domain(s) {missing} (asked for {domains}); "
                         f"its domains are {present}")
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


def encode_stream(stream, key: str, encode, mesh, desc: str = "") -> dict:
    """Runs `encode(batch)` (global arrays) over the stream on the mesh -> the valid rows of its features ('feats')
    and of every batch field but the input `key`, as numpy arrays. `desc` labels the progress bar."""
    out = {}
    bar = tqdm(stream, desc=f"eval {desc or key}", total=getattr(stream, "num_batches", None), leave=False,
               disable=jax.process_index() != 0, dynamic_ncols=True)
    for batch in bar:
        arrays = mesh_lib.global_batch(batch, mesh)
        valid = loop.gather(arrays.pop("valid"))
        feats = encode(arrays)
        arrays.pop(key)
        rows = {"feats": loop.gather(feats)} | {k: loop.gather(v) for k, v in arrays.items()}
        for k, v in rows.items():
            out.setdefault(k, []).append(v[valid])
    return {k: np.concatenate(v) for k, v in out.items()}


def encode_split(config, spec, split: str, data_dir: Path, encode, mesh, check=None) -> dict:
    """Every image of one split of `spec` (its domains only) encoded on the mesh by `encode(batch)`:
    {'feats', 'pid', 'camid', 'part_boxes', 'image_index'} (numpy) plus 'source' and 'index'.
    `check(spec, split, index)` may refuse the split before anything is encoded."""
    source, index = evaluation_set(spec, split, data_dir, config.data.auto_build)
    if check is not None:
        check(spec, split, index)
    shard = pipeline.Shard.from_jax()
    stream = pipeline.eval_images(source, config.data, batch_size=config.eval.batch_size // shard.count, shard=shard)
    return encode_stream(stream, "image", encode, mesh, desc=f"{spec.label}/{split}") | {"source": source,
                                                                                          "index": index}


def evaluate_image_reid(config, data_dir: Path, encode, step: int, workdir: Path, check=None) -> dict:
    """Image ReID on each `config.eval.datasets` entry ({..., query, gallery} splits): metrics
    'eval/<label>/{R1,R5,R10,mAP,mINP}', the k-reciprocal re-ranked ones as 'eval/<label>+rerank/...' when
    `config.eval.rerank.enabled`, and WORKDIR/retrieval_<label>_<step>.png. `check(spec, split, index)` may refuse
    a split (e.g. cameras the model has no embedding for) before it is encoded."""
    mesh = mesh_lib.make_mesh(config.mesh)
    results = {}
    for spec in config.eval.datasets:
        q, g = (encode_split(config, spec, split, data_dir, encode, mesh, check)
                for split in (spec.query, spec.gallery))
        runs = [(spec.label, None)]
        rr = config.eval.get("rerank")
        if rr is not None and rr.enabled:
            runs.append((spec.label + "+rerank",
                         rerank.k_reciprocal(q["feats"], g["feats"], rr.k1, rr.k2, rr.lambda_value)))
        for label, dist in runs:
            metrics = evaluate.image_reid(q["feats"], q["pid"], q["camid"], g["feats"], g["pid"], g["camid"],
                                          distances=dist)
            results.update({f"eval/{label}/{k}": v for k, v in metrics.items() if k not in ("cmc", "num_queries")})
        if jax.process_index() == 0 and config.eval.png_queries:
            visualize.image_retrieval_png(Path(workdir) / f"retrieval_{spec.label}_{step}.png", q["source"],
                                          g["source"], q, g, config.eval.png_queries)
    return results
