"""Text-to-image evaluation of a CLIP: every caption of a test set queries every image of it (R@1/5/10, mAP,
mINP), for each `config.eval.datasets` entry, with a picture of the first queries' rankings."""

from __future__ import annotations

from pathlib import Path

import jax

from reid_jax import data
from reid_jax.data import pipeline, specs
from reid_jax.eval import metrics, pictures
from reid_jax.eval.encode import encode_stream, jitted


def features(config, model, source, captions, index, mesh) -> tuple[dict, dict]:
    """Every test image and caption encoded on the mesh: {'feats' [N, D], 'pid' [N], ...} each."""
    shard = pipeline.Shard.from_jax()
    bs = config.eval.batch_size // shard.count
    img = encode_stream(pipeline.eval_images(source, config.data, batch_size=bs, shard=shard), "image",
                        jitted(model, lambda m, b: m.image_features(b["image"])), mesh, desc="images")
    txt = encode_stream(pipeline.eval_captions(captions, index, config.data, batch_size=bs, shard=shard), "text",
                        jitted(model, lambda m, b: m.text_features(b["text"])), mesh, desc="captions")
    return img, txt


def evaluate(config, data_dir: Path, model, step: int, workdir: Path, mesh) -> dict:
    """{'eval/<label>/<metric>': value} over config.eval.datasets; WORKDIR/retrieval_<label>_<step>.png."""
    results = {}
    for spec in config.eval.datasets:
        name = spec.get("label", spec.name)
        source, index = specs.evaluation_set(spec, spec.split, data_dir, config.data.auto_build)
        # the same split again without decoding images: captions only, for the text stream
        captions = data.load_source(spec.name, spec.split, data_dir, spec.get("config") or None, decode_image=False)
        img, txt = features(config, model, source, captions, index, mesh)
        m = metrics.text_to_image(txt["feats"], txt["pid"], img["feats"], img["pid"])
        results.update({f"eval/{name}/{k}": v for k, v in m.items() if k != "num_queries"})
        if jax.process_index() == 0 and config.eval.png_queries:
            pictures.retrieval_png(Path(workdir) / f"retrieval_{name}_{step}.png", source, captions, index, txt, img,
                                   config.eval.png_queries, title=pictures.metrics_title(name, step, m))
    return results
