"""Retrieval examples as a picture: caption or image queries with their top-10 gallery images, correct ones framed
green, wrong ones red (`WORKDIR/retrieval_<dataset>_<step>.png`)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from reid_jax.data import pipeline

THUMB = (96, 48)  # (H, W) of a gallery thumbnail
TEXT_W = 260
BORDER = 3
TOP_K = 10


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}.png")
    canvas.save(tmp)
    os.replace(tmp, path)


def retrieval_png(path: Path, source, captions_source, index, txt: dict, img: dict, num_queries: int) -> None:
    """txt / img: evaluation features {'feats', 'pid', 'image_index'} in stream order."""
    records, caption_ids = pipeline.caption_examples(index.num_captions, np.arange(len(index)), "all")
    queries = np.linspace(0, len(txt["feats"]) - 1, num_queries).astype(int)
    sims = _l2n(txt["feats"][queries]) @ _l2n(img["feats"]).T
    canvas, draw, row_h = _canvas(len(queries), TEXT_W)
    for row, (q, s) in enumerate(zip(queries, sims)):
        caption = captions_source[int(records[q])]["captions"][int(caption_ids[q])]
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        draw.multiline_text((4, row * row_h + 4), "\n".join(textwrap.wrap(caption, 42)[:7]), fill="black")
        _ranked_row(canvas, draw, row * row_h + 4, TEXT_W, s, source, img, txt["pid"][q])
    _save(canvas, path)


def image_retrieval_png(path: Path, query_source, gallery_source, q: dict, g: dict, num_queries: int) -> None:
    """Image queries (left) with their top-10 gallery images; gallery images of the query's identity seen by the
    query's camera are left out, as the Market-1501 protocol does. q / g: {'feats', 'pid', 'camid', 'image_index'}."""
    queries = np.linspace(0, len(q["feats"]) - 1, num_queries).astype(int)
    sims = _l2n(q["feats"][queries]) @ _l2n(g["feats"]).T
    left_w = THUMB[1] + 4 * BORDER + 8
    canvas, draw, row_h = _canvas(len(queries), left_w)
    for row, (i, s) in enumerate(zip(queries, sims)):
        junk = (g["pid"] == q["pid"][i]) & (g["camid"] == q["camid"][i])
        canvas.paste(_thumb(query_source, q["image_index"][i]), (BORDER, row * row_h + 4 + BORDER))
        _ranked_row(canvas, draw, row * row_h + 4, left_w, np.where(junk, -np.inf, s), gallery_source, g,
                    q["pid"][i])
    _save(canvas, path)
