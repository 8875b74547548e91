"""Retrieval results as a contact sheet: one row per query (an image or a caption), its ranked gallery images as
thumbnails with their rank and score, framed green (correct), red (wrong) or grey (unknown), and, when the true
match is not among them, the true match after a dashed separator.

Used by `python -m reid_jax.search query --sheet` and by the training-time pictures (`eval/pictures.py`).

Text is drawn with the FreeType font Pillow ships (`ImageFont.load_default(size=...)`, Aileron), one word at a
time: that font's space is 0.2 em wide (2 px at the 10 px Pillow draws with when no font is given), no wider than
the gap between two letters, so text drawn in one piece reads "Awoman in ayellow shirt". Words are therefore
placed here with a gap of at least `WORD_GAP_EM`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from reid_jax import files

FONT_PX = 13  # captions, query text
TITLE_PX = 16
WORD_GAP_EM = 0.35  # the least gap between two words, in font sizes
THUMB = (128, 64)  # (H, W) box a gallery image is fitted into, keeping its aspect ratio
FRAME = 4  # width of the coloured frame around a thumbnail
LABEL_W = 112  # hits' columns widen up to this for their labels (file names), which are elided beyond it
CELL_GAP = 6  # between two thumbnails of a row
ROW_GAP = 10  # between two rows
MARGIN = 10  # around the sheet
QUERY_TEXT_W = 240  # width of the column a text query is wrapped into
MAX_QUERY_LINES = 8  # longer text queries end with an ellipsis
SEPARATOR_W = 26  # the gap before the true match; a dashed line runs down its middle
ELLIPSIS = "\u2026"

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (95, 95, 95)
LETTERBOX = (232, 232, 232)  # the part of a thumbnail's box its image does not cover
QUERY_BACKGROUND = (243, 243, 243)
COLOURS = {True: (0, 150, 60), False: (210, 30, 30), None: (160, 160, 160)}  # frame by Hit.correct
QUERY_COLOUR = (40, 90, 200)  # frame of an image query, "true match" marker


@dataclasses.dataclass
class Hit:
    """One gallery image as ranked for a query."""
    image: Image.Image  # any size; thumbnailed keeping its aspect ratio
    score: float  # printed with 3 decimals
    rank: int  # 1-based
    correct: bool | None = None  # frame: green True, red False, grey None (unknown, e.g. a user's gallery)
    label: str | None = None  # short caption under the thumbnail (e.g. a file name), elided to fit


@dataclasses.dataclass
class Row:
    """One query and its ranked hits (best first); `true_match` is shown after them when it is not among them."""
    query: Image.Image | str
    hits: list[Hit]
    true_match: Hit | None = None


Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive


@dataclasses.dataclass
class RowLayout:
    query: Box  # an image query's frame, or a text query's block
    hits: list[Box]  # each hit's frame, in rank order
    true_match: Box | None  # its frame, or None when the row has none
    separator_x: int | None  # the dashed line's column
    captions_y: int  # first caption line under the frames


@dataclasses.dataclass
class Layout:
    size: tuple[int, int]  # (W, H) of the sheet
    title: list[list[str]]  # title lines, as words
    rows: list[RowLayout]
    cell_w: int  # width of a hit's column (its frame is centred in it)


@functools.lru_cache(maxsize=None)
def font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The font Pillow ships, at `px` pixels (FreeType; Pillow without FreeType gives its bitmap font)."""
    return ImageFont.load_default(size=px)


def line_height(f) -> int:
    ascent, descent = f.getmetrics()
    return ascent + descent + 2


def word_gap(f) -> int:
    return max(math.ceil(f.getlength(" ")), math.ceil(WORD_GAP_EM * getattr(f, "size", FONT_PX)))


def words_width(words: list[str], f) -> int:
    return math.ceil(sum(f.getlength(w) for w in words)) + word_gap(f) * max(len(words) - 1, 0)


def text_width(text: str, f) -> int:
    """Width of one line as `draw_words` draws it (every space a word gap)."""
    return words_width(text.split(" "), f)


def draw_words(draw: ImageDraw.ImageDraw, xy: tuple[float, float], words: list[str], f, fill) -> None:
    """The words on one line from xy (top left), each drawn alone, `word_gap` apart."""
    x, y = xy
    for w in words:
        draw.text((x, y), w, font=f, fill=fill)
        x += f.getlength(w) + word_gap(f)


def _split_long(word: str, f, width: int) -> list[str]:
    """A word wider than `width` cut into pieces that fit (a URL, a file name without spaces)."""
    pieces, piece = [], ""
    for ch in word:
        if piece and f.getlength(piece + ch) > width:
            pieces.append(piece)
            piece = ""
        piece += ch
    return pieces + [piece]


def wrap(text: str, f, width: int) -> list[list[str]]:
    """Text as lines of words no wider than `width` pixels; line breaks kept, runs of spaces count as one."""
    lines = []
    for paragraph in text.split("\n"):
        line: list[str] = []
        for word in (p for w in paragraph.split() for p in _split_long(w, f, width)):
            if line and words_width(line + [word], f) > width:
                lines.append(line)
                line = []
            line.append(word)
        lines.append(line)
    return lines


def elide(text: str, f, width: int) -> str:
    """`text`, or its start and end around an ellipsis, no wider than `width` (a file name keeps its suffix)."""
    if text_width(text, f) <= width:
        return text
    keep = len(text)
    while keep > 0:
        head, tail = text[: (keep + 1) // 2], text[len(text) - keep // 2:] if keep // 2 else ""
        if text_width(head + ELLIPSIS + tail, f) <= width:
            return head + ELLIPSIS + tail
        keep -= 1
    return ELLIPSIS


def hit_caption(hit: Hit) -> str:
    """The line under a thumbnail: '#<rank> <score with 3 decimals>'."""
    return f"#{hit.rank} {hit.score:.3f}"


def _query_lines(query: str, f) -> list[list[str]]:
    lines = wrap(query, f, QUERY_TEXT_W - 2 * CELL_GAP)
    if len(lines) > MAX_QUERY_LINES:
        lines = lines[:MAX_QUERY_LINES]
        lines[-1] = lines[-1] + [ELLIPSIS]
    return lines


def layout(rows: list[Row], title: str | None = None) -> Layout:
    """Where everything of the sheet goes (the renderer and the tests both read it)."""
    f, lh = font(FONT_PX), line_height(font(FONT_PX))
    frame_w, frame_h = THUMB[1] + 2 * FRAME, THUMB[0] + 2 * FRAME
    hits = [h for r in rows for h in r.hits + ([r.true_match] if r.true_match else [])]
    cell_w = max([frame_w] + [text_width(hit_caption(h), f) + 2 for h in hits]
                 + [min(text_width(h.label, f), LABEL_W) for h in hits if h.label])
    num_captions = 1 + any(h.label for h in hits) + any(r.true_match for r in rows)
    cell_h = frame_h + num_captions * lh + 2
    texts = [r.query for r in rows if isinstance(r.query, str)]
    query_w = QUERY_TEXT_W if texts else max(frame_w, math.ceil(f.getlength("query")))
    hits_x = MARGIN + query_w + 2 * CELL_GAP
    widest = max([0] + [len(r.hits) * (cell_w + CELL_GAP) + (SEPARATOR_W + cell_w if r.true_match else 0)
                        for r in rows])
    width = max(hits_x + widest + MARGIN, 360)
    title_lines = wrap(title, font(TITLE_PX), width - 2 * MARGIN) if title else []
    y = MARGIN + len(title_lines) * line_height(font(TITLE_PX)) + (ROW_GAP if title_lines else 0)
    out = []
    for r in rows:
        if isinstance(r.query, str):
            height = max(cell_h, len(_query_lines(r.query, f)) * lh + 2 * CELL_GAP)
            query = (MARGIN, y, MARGIN + query_w, y + height)
        else:
            height = cell_h
            query = (MARGIN, y, MARGIN + frame_w, y + frame_h)
        fx = (cell_w - frame_w) // 2
        boxes = [(hits_x + k * (cell_w + CELL_GAP) + fx, y, hits_x + k * (cell_w + CELL_GAP) + fx + frame_w,
                  y + frame_h) for k in range(len(r.hits))]
        true_box = sep = None
        if r.true_match is not None:
            x = hits_x + len(r.hits) * (cell_w + CELL_GAP) + SEPARATOR_W - CELL_GAP
            sep = x - SEPARATOR_W // 2
            true_box = (x + fx, y, x + fx + frame_w, y + frame_h)
        out.append(RowLayout(query, boxes, true_box, sep, y + frame_h + 2))
        y += height + ROW_GAP
    return Layout((width, y - ROW_GAP + MARGIN if rows else y + MARGIN), title_lines, out, cell_w)


def _thumbnail(draw: ImageDraw.ImageDraw, canvas: Image.Image, image: Image.Image, box: Box, colour) -> None:
    """`image` fitted into the frame `box`, centred on a letterbox, framed in `colour`."""
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    draw.rectangle([x0 + FRAME, y0 + FRAME, x1 - FRAME - 1, y1 - FRAME - 1], fill=LETTERBOX)
    thumb = ImageOps.contain(image.convert("RGB"), THUMB[::-1], Image.Resampling.LANCZOS)
    canvas.paste(thumb, (x0 + FRAME + (THUMB[1] - thumb.width) // 2, y0 + FRAME + (THUMB[0] - thumb.height) // 2))


def _centred(draw, words: list[str], centre_x: float, y: int, f, fill) -> None:
    draw_words(draw, (centre_x - words_width(words, f) / 2, y), words, f, fill)


def _hit(draw, canvas, hit: Hit, box: Box, captions_y: int, cell_w: int, marker: str | None, has_labels: bool):
    f, lh = font(FONT_PX), line_height(font(FONT_PX))
    _thumbnail(draw, canvas, hit.image, box, COLOURS[hit.correct])
    centre = (box[0] + box[2]) / 2
    _centred(draw, hit_caption(hit).split(" "), centre, captions_y, f, INK)
    y = captions_y + lh
    if hit.label:
        _centred(draw, elide(hit.label, f, cell_w).split(" "), centre, y, f, MUTED)
    if marker:
        _centred(draw, marker.split(), centre, y + lh * has_labels, f, QUERY_COLOUR)


def _dashed(draw, x: int, y0: int, y1: int) -> None:
    for y in range(y0, y1, 8):
        draw.line([(x, y), (x, min(y + 4, y1))], fill=COLOURS[None], width=2)


def contact_sheet(rows: list[Row], title: str | None = None) -> Image.Image:
    """The sheet of `rows` (one per query), under `title` (wrapped to the sheet's width)."""
    plan = layout(rows, title)
    canvas = Image.new("RGB", plan.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    f, lh = font(FONT_PX), line_height(font(FONT_PX))
    y = MARGIN
    for words in plan.title:
        draw_words(draw, (MARGIN, y), words, font(TITLE_PX), INK)
        y += line_height(font(TITLE_PX))
    has_labels = any(h.label for r in rows for h in r.hits + ([r.true_match] if r.true_match else []))
    for r, p in zip(rows, plan.rows):
        if isinstance(r.query, str):
            draw.rectangle([p.query[0], p.query[1], p.query[2] - 1, p.query[3] - 1], fill=QUERY_BACKGROUND)
            for i, words in enumerate(_query_lines(r.query, f)):
                draw_words(draw, (p.query[0] + CELL_GAP, p.query[1] + CELL_GAP + i * lh), words, f, INK)
        else:
            _thumbnail(draw, canvas, r.query, p.query, QUERY_COLOUR)
            _centred(draw, ["query"], (p.query[0] + p.query[2]) / 2, p.captions_y, f, QUERY_COLOUR)
        for hit, box in zip(r.hits, p.hits):
            _hit(draw, canvas, hit, box, p.captions_y, plan.cell_w, None, has_labels)
        if r.true_match is not None:
            _dashed(draw, p.separator_x, p.query[1], p.captions_y + lh)
            _hit(draw, canvas, r.true_match, p.true_match, p.captions_y, plan.cell_w, "true match", has_labels)
    return canvas


def save_sheet(path: str | Path, rows: list[Row], title: str | None = None) -> None:
    """The contact sheet written to `path` atomically (the format follows the suffix, e.g. .png)."""
    sheet = contact_sheet(rows, title)
    files.write_atomically(path, sheet.save)
