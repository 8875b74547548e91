"""Retrieval examples as a picture: caption queries with their top-10 gallery images, correct ones framed green,
wrong ones red (`WORKDIR/retrieval_<dataset>_<step>.png`)."""

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


def retrieval_png(path: Path, source, captions_source, index, txt: dict, img: dict, num_queries: int) -> None:
    """txt / img: evaluation features {'feats', 'pid', 'image_index'} in stream order."""
    records, caption_ids = pipeline.caption_examples(index.num_captions, np.arange(len(index)), "all")
    queries = np.linspace(0, len(txt["feats"]) - 1, num_queries).astype(int)
    sims = _l2n(txt["feats"][queries]) @ _l2n(img["feats"]).T
    row_h = THUMB[0] + 2 * BORDER + 8
    canvas = Image.new("RGB", (TEXT_W + TOP_K * (THUMB[1] + 2 * BORDER + 4), row_h * len(queries)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (q, s) in enumerate(zip(queries, sims)):
        caption = captions_source[int(records[q])]["captions"][int(caption_ids[q])]
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        draw.multiline_text((4, row * row_h + 4), "\n".join(textwrap.wrap(caption, 42)[:7]), fill="black")
        for k, g in enumerate(np.argsort(-s, kind="stable")[:TOP_K]):
            thumb = Image.fromarray(np.asarray(source[int(img["image_index"][g])]["image"])).resize(THUMB[::-1])
            colour = "green" if img["pid"][g] == txt["pid"][q] else "red"
            x, y = TEXT_W + k * (THUMB[1] + 2 * BORDER + 4), row * row_h + 4
            draw.rectangle([x, y, x + THUMB[1] + 2 * BORDER - 1, y + THUMB[0] + 2 * BORDER - 1], fill=colour)
            canvas.paste(thumb, (x + BORDER, y + BORDER))
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}.png")
    canvas.save(tmp)
    os.replace(tmp, path)
