"""Image ReID evaluation: each `config.eval.datasets` entry's query and gallery splits encoded on the mesh,
ranked by cosine similarity (and, when `config.eval.rerank.enabled`, by k-reciprocal re-ranked distances), with a
picture of the first queries' rankings."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from reid_jax.data import pipeline, specs
from reid_jax.eval import metrics, pictures, rerank
from reid_jax.eval.encode import encode_stream


def encode_split(config, spec, split: str, data_dir: Path, encode, mesh, check=None) -> dict:
    """Every image of one split of `spec` (its domains only) encoded on the mesh by `encode(batch)`:
    {'feats', 'pid', 'camid', 'part_boxes', 'image_index'} (numpy) plus 'source' and 'index'.
    `check(spec, split, index)` may refuse the split before anything is encoded."""
    source, index = specs.evaluation_set(spec, split, data_dir, config.data.auto_build)
    if check is not None:
        check(spec, split, index)
    shard = pipeline.Shard.from_jax()
    stream = pipeline.eval_images(source, config.data, batch_size=config.eval.batch_size // shard.count, shard=shard)
    return encode_stream(stream, "image", encode, mesh, desc=f"{spec.label}/{split}") | {"source": source,
                                                                                          "index": index}


def reranked(query: np.ndarray, gallery: np.ndarray, rr) -> np.ndarray:
    """k-reciprocal distances [Q, G] with `config.eval.rerank`'s settings; features L2-normalised first when
    `rr.normalize` (CLIP-ReID's and MUVA's evaluators re-rank normalised features)."""
    if rr.get("normalize", True):
        query, gallery = (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12) for f in (query, gallery))
    return rerank.k_reciprocal(query, gallery, rr.k1, rr.k2, rr.lambda_value)


def evaluate(config, data_dir: Path, encode, step: int, workdir: Path, mesh, check=None) -> dict:
    """Metrics 'eval/<label>/{R1,R5,R10,mAP,mINP}' (and 'eval/<label>+rerank/...' when re-ranking is on) and
    WORKDIR/retrieval_<label>_<step>.png for every `config.eval.datasets` entry ({..., query, gallery} splits)."""
    results = {}
    for spec in config.eval.datasets:
        q, g = (encode_split(config, spec, split, data_dir, encode, mesh, check)
                for split in (spec.query, spec.gallery))
        runs = [(spec.label, None)]
        rr = config.eval.get("rerank")
        if rr is not None and rr.enabled:
            runs.append((spec.label + "+rerank", reranked(q["feats"], g["feats"], rr)))
        for label, dist in runs:
            m = metrics.image_reid(q["feats"], q["pid"], q["camid"], g["feats"], g["pid"], g["camid"],
                                   distances=dist)
            results.update({f"eval/{label}/{k}": v for k, v in m.items() if k not in ("cmc", "num_queries")})
        if jax.process_index() == 0 and config.eval.png_queries:
            cosine = {k.rsplit("/", 1)[1]: v for k, v in results.items() if k.startswith(f"eval/{spec.label}/")}
            pictures.image_retrieval_png(Path(workdir) / f"retrieval_{spec.label}_{step}.png", q["source"],
                                         g["source"], q, g, config.eval.png_queries,
                                         title=pictures.metrics_title(spec.label, step, cosine))
    return results
