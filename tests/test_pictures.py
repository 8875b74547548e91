"""The contact sheet (eval/sheet.py) and the training-time retrieval pictures (eval/pictures.py) drawn from it:
captions and frames from given values, word gaps that show, and the thumbnails of a fake evaluation checked
against a brute-force numpy ranking."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from reid_jax.data import pipeline
from reid_jax.eval import pictures, sheet


def _solid(colour, size=(16, 32)) -> Image.Image:
    """A plain image of `colour`, size (W, H)."""
    return Image.new("RGB", size, tuple(int(c) for c in colour))


def _palette(n: int, seed: int = 0) -> np.ndarray:
    """n distinct colours [n, 3], far from each other (each channel one of 4 levels)."""
    levels = np.array([20, 90, 160, 230])
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    return grid[np.random.default_rng(seed).permutation(len(grid))[:n]]


def _centre(image: Image.Image, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.asarray(image)[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)


def _which(colour: np.ndarray, palette: np.ndarray) -> int:
    """The palette entry `colour` is (resampling a plain image may move it by a unit or two)."""
    d = np.abs(palette - colour).max(1)
    assert d.min() <= 3, f"{colour} is none of the gallery colours"
    return int(d.argmin())


def _kind(pixel: np.ndarray) -> str:
    r, g, b = (int(v) for v in pixel)
    if g > r + 60 and g > b + 60:
        return "green"
    if r > g + 60 and r > b + 60:
        return "red"
    if r == g == b and 100 < r < 220:
        return "grey"
    return "other"


def test_caption_strings():
    assert sheet.hit_caption(sheet.Hit(_solid((0, 0, 0)), 0.81249, 3)) == "#3 0.812"
    assert sheet.hit_caption(sheet.Hit(_solid((0, 0, 0)), -0.25, 10)) == "#10 -0.250"
    assert sheet.hit_caption(sheet.Hit(_solid((0, 0, 0)), 1.0, 1)) == "#1 1.000"
    title = pictures.metrics_title("market", 12, {"R1": 52.34, "mAP": 41.06, "cmc": [1.0], "num_queries": 7})
    assert title == "market, step 12: R1 52.3, mAP 41.1 (7 queries)"


def test_elide_keeps_both_ends_and_fits():
    f = sheet.font(sheet.FONT_PX)
    name = "camera_03/frame_000123_a_rather_long_name.jpg"
    short = sheet.elide(name, f, 100)
    assert sheet.text_width(short, f) <= 100 < sheet.text_width(name, f)
    head, tail = short.split(sheet.ELLIPSIS)
    assert name.startswith(head) and name.endswith(tail) and head and tail.endswith(".jpg")
    assert sheet.elide("a.jpg", f, 100) == "a.jpg"


def _blank_runs(band: np.ndarray) -> list[int]:
    """Widths of the runs of ink-free columns between the first and the last inked column of a text band [H, W]."""
    ink = np.flatnonzero(band.any(0))
    cols = band[:, ink[0]: ink[-1] + 1].any(0)
    runs, n = [], 0
    for c in cols:
        if c:
            if n:
                runs.append(n)
            n = 0
        else:
            n += 1
    return runs


def _word_gaps(text: str) -> int:
    """Gaps in the first line of `text` drawn as a text query on a sheet that are at least twice as wide as any gap
    inside a word (each word drawn alone, with the same font, gives that widest inner gap): word gaps that read."""
    f = sheet.font(sheet.FONT_PX)
    image = sheet.contact_sheet([sheet.Row(text, [])])
    x0, y0, x1, _ = sheet.layout([sheet.Row(text, [])]).rows[0].query
    top = y0 + sheet.CELL_GAP
    band = np.asarray(image.convert("L"))[top: top + sheet.line_height(f), x0: x1] < 160
    inner = 0
    for word in text.split():
        alone = Image.new("L", (200, 40), 255)
        ImageDraw.Draw(alone).text((4, 4), word, font=f, fill=0)
        runs = _blank_runs(np.asarray(alone) < 160)
        inner = max([inner] + runs)
    return sum(r >= 2 * inner for r in _blank_runs(band))


def test_words_keep_their_spaces():
    """Pillow's default font has a 2 px space: text drawn in one piece read 'Awoman in ayellow shirt'."""
    assert _word_gaps("A woman in a yellow shirt") == 5
    assert _word_gaps("Awomaninayellowshirt") == 0  # the measure sees a missing space


def test_frames_thumbnails_and_true_match_block():
    palette = _palette(7)
    rows = [
        sheet.Row("a man in a red jacket", [sheet.Hit(_solid(palette[0]), 0.9, 1, True),
                                           sheet.Hit(_solid(palette[1]), 0.8, 2, False),
                                           sheet.Hit(_solid(palette[2]), 0.7, 3, None)]),
        sheet.Row(_solid(palette[3]), [sheet.Hit(_solid(palette[4]), 0.5, 1, False),
                                       sheet.Hit(_solid(palette[5]), 0.4, 2, False)],
                  true_match=sheet.Hit(_solid(palette[6]), 0.1, 57, True)),
    ]
    image = sheet.contact_sheet(rows, "a title")
    plan = sheet.layout(rows, "a title")
    assert image.size == plan.size
    pixels = np.asarray(image)
    frame = lambda box: pixels[box[1] + 1, box[0] + 1]  # inside the frame's top-left corner
    assert [_kind(frame(b)) for b in plan.rows[0].hits] == ["green", "red", "grey"]
    assert [_kind(frame(b)) for b in plan.rows[1].hits] == ["red", "red"]
    shown = [[_which(_centre(image, b), palette) for b in p.hits] for p in plan.rows]
    assert shown == [[0, 1, 2], [4, 5]]
    assert _which(_centre(image, plan.rows[1].query), palette) == 3
    # the true match: only in the second row, after the hits, behind a dashed line, framed green
    assert plan.rows[0].true_match is None and plan.rows[1].true_match is not None
    box = plan.rows[1].true_match
    assert _kind(frame(box)) == "green" and _which(_centre(image, box), palette) == 6
    assert box[0] > plan.rows[1].separator_x > plan.rows[1].hits[-1][2]
    band = lambda p: pixels[p.query[1]: p.captions_y, p.hits[-1][2]:]
    assert (band(plan.rows[0]) == 255).all()  # nothing right of the first row's hits
    column = pixels[plan.rows[1].query[1]: plan.rows[1].captions_y, plan.rows[1].separator_x]
    assert {_kind(p) for p in column} >= {"grey"} and "green" in {_kind(p) for p in band(plan.rows[1]).reshape(-1, 3)}


def test_thumbnail_keeps_aspect_ratio():
    wide = _solid((200, 30, 30), (100, 50))
    rows = [sheet.Row("q", [sheet.Hit(wide, 0.5, 1)])]
    x0, y0, x1, y1 = sheet.layout(rows).rows[0].hits[0]
    b = sheet.FRAME
    inner = np.asarray(sheet.contact_sheet(rows))[y0 + b: y1 - b, x0 + b: x1 - b]
    red = np.argwhere((np.abs(inner.astype(int) - [200, 30, 30]).max(-1) <= 3))
    h, w = red.max(0) - red.min(0) + 1
    assert (w, h) == (sheet.THUMB[1], sheet.THUMB[1] // 2)


def test_save_sheet_writes_a_png(tmp_path):
    sheet.save_sheet(tmp_path / "s.png", [sheet.Row("x y", [sheet.Hit(_solid((1, 2, 3)), 0.1, 1, None, "f.jpg")])])
    assert Image.open(tmp_path / "s.png").format == "PNG" and [p.name for p in tmp_path.iterdir()] == ["s.png"]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _expected(sims: np.ndarray, correct: np.ndarray, counts: np.ndarray, k: int):
    """Brute force: the first k counted gallery items by similarity and the first correct one's (rank, item)."""
    order = [g for g in sorted(range(len(sims)), key=lambda g: (-sims[g], g)) if counts[g]]
    first = next(r for r, g in enumerate(order) if correct[g])
    return order[:k], (first + 1, order[first])


def _check_png(path, rows, title, palette, sims, correct, counts, k):
    """The PNG at `path` shows, row by row, the brute-force top k (by colour) and the true match when outside it."""
    image = Image.open(path).convert("RGB")
    plan = sheet.layout(rows, title)
    assert image.size == plan.size
    outside = 0
    for q, p in enumerate(plan.rows):
        top, (rank, item) = _expected(sims[q], correct[q], counts[q], k)
        assert [_which(_centre(image, b), palette) for b in p.hits] == top
        assert [_kind(np.asarray(image)[b[1] + 1, b[0] + 1]) for b in p.hits] == [
            "green" if correct[q][g] else "red" for g in top]
        assert [h.rank for h in rows[q].hits] == list(range(1, k + 1))
        np.testing.assert_allclose([h.score for h in rows[q].hits], sims[q][top], atol=1e-5)
        if rank > k:
            outside += 1
            assert rows[q].true_match.rank == rank and _which(_centre(image, p.true_match), palette) == item
        else:
            assert rows[q].true_match is None and p.true_match is None
    assert 0 < outside < len(plan.rows)  # both cases drawn


def test_text_picture_on_a_fake_evaluation(tmp_path):
    rng = np.random.default_rng(1)
    num_records, d = 24, 8
    pids = np.repeat(np.arange(8), 3)
    num_captions = np.array([2, 1, 0] * 8)  # a record without captions is not a query
    palette = _palette(num_records, seed=2)
    stream = rng.permutation(num_records)  # image stream order != record order
    source = [{"image": np.asarray(_solid(palette[r]))} for r in range(num_records)]
    captions = [{"captions": [f"person {r} caption {c}".encode() for c in range(num_captions[r])]}
                for r in range(num_records)]
    index = type("Index", (), {"num_captions": num_captions, "__len__": lambda self: num_records})()
    records, caption_ids = pipeline.caption_examples(num_captions, np.arange(num_records), "all")
    txt = {"feats": rng.normal(size=(len(records), d)), "pid": pids[records]}
    img = {"feats": rng.normal(size=(num_records, d)), "pid": pids[stream], "image_index": stream}
    # the first caption's identity ranked last: its true match falls outside the top k
    img["feats"][img["pid"] == txt["pid"][0]] = -txt["feats"][0] + 0.1 * rng.normal(size=(3, d))
    title = pictures.metrics_title("fake", 7, {"R1": 50.0, "mAP": 40.0})
    path = tmp_path / "retrieval_fake_7.png"
    queries = np.linspace(0, len(records) - 1, 6).astype(int)
    rows = pictures.text_rows(source, captions, index, txt, img, 6)
    pictures.retrieval_png(path, source, captions, index, txt, img, 6, title=title)
    assert [r.query for r in rows] == [f"person {records[q]} caption {caption_ids[q]}" for q in queries]
    sims = _normalise(txt["feats"][queries]) @ _normalise(img["feats"]).T
    correct = img["pid"][None] == txt["pid"][queries][:, None]
    # the thumbnails are placed by stream item; their colour is that of the record they show
    _check_png(path, rows, title, palette[stream], sims, correct, np.ones_like(correct), pictures.TOP_K)


def test_image_picture_leaves_out_same_camera_matches(tmp_path):
    rng = np.random.default_rng(3)
    num_gallery, d = 40, 8
    g_pid, g_cam = np.repeat(np.arange(10), 4), np.tile([0, 1, 2, 3], 10)
    q_pid, q_cam = np.arange(10), np.zeros(10, int)
    palette = _palette(num_gallery + 10, seed=4)
    gallery_source = [{"image": np.asarray(_solid(c))} for c in palette[:num_gallery]]
    query_source = [{"image": np.asarray(_solid(c))} for c in palette[num_gallery:]]
    q = {"feats": rng.normal(size=(10, d)), "pid": q_pid, "camid": q_cam, "image_index": np.arange(10)}
    g = {"feats": rng.normal(size=(num_gallery, d)), "pid": g_pid, "camid": g_cam,
         "image_index": np.arange(num_gallery)}
    # query 0: its same-camera image is the nearest (left out); its other images the farthest
    g["feats"][[1, 2, 3]] = -q["feats"][0] + 0.1 * rng.normal(size=(3, d))
    g["feats"][0] = q["feats"][0]
    path = tmp_path / "retrieval_fake_3.png"
    pictures.image_retrieval_png(path, query_source, gallery_source, q, g, 5, title="t")
    queries = np.linspace(0, 9, 5).astype(int)
    rows = pictures.image_rows(query_source, gallery_source, q, g, 5)
    sims = _normalise(q["feats"][queries]) @ _normalise(g["feats"]).T
    same = g_pid[None] == q_pid[queries][:, None]
    counts = ~(same & (g_cam[None] == q_cam[queries][:, None]))
    assert 0 not in [_which(np.asarray(h.image)[0, 0], palette) for h in rows[0].hits]  # the left-out one
    _check_png(path, rows, "t", palette[:num_gallery], sims, same, counts, pictures.TOP_K)
    image = Image.open(path).convert("RGB")
    for row, p in zip(queries, sheet.layout(rows, "t").rows):
        assert _which(_centre(image, p.query), palette) == num_gallery + row
