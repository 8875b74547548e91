"""Retrieval examples as a picture (`WORKDIR/retrieval_<dataset>_<step>.png`): caption or image queries with their
top-10 gallery images, each with its rank and cosine similarity, framed green (the query's identity) or red, and
the query's true match after them when it is not in the top 10; the step and the metrics in the title. Drawn by
`sheet.contact_sheet`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from reid_jax import losses
from reid_jax.data import pipeline
from reid_jax.data.records import as_str
from reid_jax.eval import sheet

TOP_K = 10


def _cosine(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Features q [Q, D], g [G, D] -> cosine similarities [Q, G], normalised as the metrics normalise them."""
    q, g = (losses.l2_normalize(jnp.asarray(x, jnp.float32)) for x in (q, g))
    return np.asarray(q @ g.T)


def _image(source, record) -> Image.Image:
    return Image.fromarray(np.asarray(source[int(record)]["image"]))


def _queries(num: int, num_queries: int) -> np.ndarray:
    """`num_queries` query positions spread evenly over the `num` queries, first and last included."""
    return np.linspace(0, num - 1, min(num_queries, num)).astype(int)


def ranked_hits(sims: np.ndarray, correct: np.ndarray, counts: np.ndarray, image: Callable[[int], Image.Image],
                top_k: int = TOP_K) -> tuple[list[sheet.Hit], sheet.Hit | None]:
    """One query's top-k gallery items and, when none of them is correct, its true match (the first correct item).

    sims [G]: similarities; correct [G]: same identity; counts [G]: False for the items the protocol leaves out
    (ranks count only the others, as in `metrics`); image(g): gallery item g's picture. Ties keep gallery order.
    """
    order = np.argsort(-sims, kind="stable")
    order = order[counts[order]]

    def hit(rank: int) -> sheet.Hit:
        g = int(order[rank])
        return sheet.Hit(image(g), float(sims[g]), rank + 1, bool(correct[g]))

    hits = [hit(r) for r in range(min(top_k, len(order)))]
    first = np.flatnonzero(correct[order])
    return hits, (hit(int(first[0])) if len(first) and first[0] >= top_k else None)


def text_rows(source, captions_source, index, txt: dict, img: dict, num_queries: int,
              top_k: int = TOP_K) -> list[sheet.Row]:
    """Rows of caption queries spread over the test set. txt / img: evaluation features {'feats', 'pid',
    'image_index'} in stream order (captions in `pipeline.caption_examples(..., 'all')` order)."""
    records, caption_ids = pipeline.caption_examples(index.num_captions, np.arange(len(index)), "all")
    queries = _queries(len(txt["feats"]), num_queries)
    sims = _cosine(txt["feats"][queries], img["feats"])
    rows = []
    for q, s in zip(queries, sims):
        caption = as_str(captions_source[int(records[q])]["captions"][int(caption_ids[q])])
        hits, true = ranked_hits(s, img["pid"] == txt["pid"][q], np.ones(len(s), bool),
                                 lambda g: _image(source, img["image_index"][g]), top_k)
        rows.append(sheet.Row(caption, hits, true))
    return rows


def image_rows(query_source, gallery_source, q: dict, g: dict, num_queries: int,
               top_k: int = TOP_K) -> list[sheet.Row]:
    """Rows of image queries spread over the query split; gallery images of the query's identity seen by the
    query's camera are left out, as the Market-1501 protocol does. q / g: {'feats', 'pid', 'camid', 'image_index'}."""
    queries = _queries(len(q["feats"]), num_queries)
    sims = _cosine(q["feats"][queries], g["feats"])
    rows = []
    for i, s in zip(queries, sims):
        same = g["pid"] == q["pid"][i]
        hits, true = ranked_hits(s, same, ~(same & (g["camid"] == q["camid"][i])),
                                 lambda k: _image(gallery_source, g["image_index"][k]), top_k)
        rows.append(sheet.Row(_image(query_source, q["image_index"][i]), hits, true))
    return rows


def metrics_title(label: str, step: int, metrics: Mapping[str, float]) -> str:
    """'<label>, step <step>: R1 52.3, mAP 41.0, ... (<n> queries)' from the metrics (percent) in the order given;
    lists (a CMC curve) are left out."""
    values = [f"{k} {v:.1f}" for k, v in metrics.items() if k != "num_queries" and isinstance(v, (int, float))]
    count = f" ({metrics['num_queries']} queries)" if "num_queries" in metrics else ""
    return f"{label}, step {step}: " + ", ".join(values) + count


def retrieval_png(path: Path, source, captions_source, index, txt: dict, img: dict, num_queries: int,
                  title: str | None = None) -> None:
    """Caption queries' rankings (see `text_rows`) written to `path`."""
    sheet.save_sheet(path, text_rows(source, captions_source, index, txt, img, num_queries), title)


def image_retrieval_png(path: Path, query_source, gallery_source, q: dict, g: dict, num_queries: int,
                        title: str | None = None) -> None:
    """Image queries' rankings (see `image_rows`) written to `path`."""
    sheet.save_sheet(path, image_rows(query_source, gallery_source, q, g, num_queries), title)
