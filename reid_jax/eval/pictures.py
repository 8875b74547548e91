"""Retrieval examples as a picture: caption or image queries with their top-10 gallery images, correct ones framed
green, wrong ones red (`WORKDIR/retrieval_<dataset>_<step>.png`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from reid_jax import files, losses
from reid_jax.data import pipeline
from reid_jax.data.records import as_str

THUMB = (96, 48)  # (H, W) of a gallery thumbnail
TEXT_W = 260
BORDER = 3
TOP_K = 10


def _cosine(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Features q [Q, D], g [G, D] -> cosine similarities [Q, G], normalised as the metrics normalise them."""
    q, g = (losses.l2_normalize(jnp.asarray(x, jnp.float32)) for x in (q, g))
    return np.asarray(q @ g.T)


def _canvas(num_rows: int, left_w: int) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    row_h = THUMB[0] + 2 * BORDER + 8
    canvas = Image.new("RGB", (left_w + TOP_K * (THUMB[1] + 2 * BORDER + 4), row_h * num_rows), "white")
    return canvas, ImageDraw.Draw(canvas), row_h


def _thumb(source, record: int) -> Image.Image:
    return Image.fromarray(np.asarray(source[int(record)]["image"])).resize(THUMB[::-1])


def _ranked_row(canvas, draw, y: int, left_w: int, sims: np.ndarray, gallery_source, img: dict, pid: int) -> None:
    """The top-10 gallery images of one query, framed green (same pid) or red."""
    for k, g in enumerate(np.argsort(-sims, kind="stable")[:TOP_K]):
        colour = "green" if img["pid"][g] == pid else "red"
        x = left_w + k * (THUMB[1] + 2 * BORDER + 4)
        draw.rectangle([x, y, x + THUMB[1] + 2 * BORDER - 1, y + THUMB[0] + 2 * BORDER - 1], fill=colour)
        canvas.paste(_thumb(gallery_source, img["image_index"][g]), (x + BORDER, y + BORDER))


def _save(canvas: Image.Image, path: Path) -> None:
    files.write_atomically(path, canvas.save)


def retrieval_png(path: Path, source, captions_source, index, txt: dict, img: dict, num_queries: int) -> None:
    """txt / img: evaluation features {'feats', 'pid', 'image_index'} in stream order."""
    records, caption_ids = pipeline.caption_examples(index.num_captions, np.arange(len(index)), "all")
    queries = np.linspace(0, len(txt["feats"]) - 1, num_queries).astype(int)
    sims = _cosine(txt["feats"][queries], img["feats"])
    canvas, draw, row_h = _canvas(len(queries), TEXT_W)
    for row, (q, s) in enumerate(zip(queries, sims)):
        caption = as_str(captions_source[int(records[q])]["captions"][int(caption_ids[q])])
        draw.multiline_text((4, row * row_h + 4), "\n".join(textwrap.wrap(caption, 42)[:7]), fill="black")
        _ranked_row(canvas, draw, row * row_h + 4, TEXT_W, s, source, img, txt["pid"][q])
    _save(canvas, path)


def image_retrieval_png(path: Path, query_source, gallery_source, q: dict, g: dict, num_queries: int) -> None:
    """Image queries (left) with their top-10 gallery images; gallery images of the query's identity seen by the
    query's camera are left out, as the Market-1501 protocol does. q / g: {'feats', 'pid', 'camid', 'image_index'}."""
    queries = np.linspace(0, len(q["feats"]) - 1, num_queries).astype(int)
    sims = _cosine(q["feats"][queries], g["feats"])
    left_w = THUMB[1] + 4 * BORDER + 8
    canvas, draw, row_h = _canvas(len(queries), left_w)
    for row, (i, s) in enumerate(zip(queries, sims)):
        junk = (g["pid"] == q["pid"][i]) & (g["camid"] == q["camid"][i])
        canvas.paste(_thumb(query_source, q["image_index"][i]), (BORDER, row * row_h + 4 + BORDER))
        _ranked_row(canvas, draw, row * row_h + 4, left_w, np.where(junk, -np.inf, s), gallery_source, g,
                    q["pid"][i])
    _save(canvas, path)
