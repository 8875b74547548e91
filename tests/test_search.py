"""`reid_jax.search`: the index against a brute-force ranking of `Encoder` features, incremental re-indexing, a
kill -9 in the middle of a run, unreadable files, mismatched models, image-only models, the chunked top-k against
numpy and FAISS, and the command line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_jax import convert, data, tokenizer
from reid_jax.eval import sheet
from reid_jax.inference import Encoder
from reid_jax.search import Index, __main__ as cli, build, store, topk
from tests import torch_clip_reid, torch_refs

ROOT = Path(__file__).resolve().parents[1]
FP16 = 2e-3  # features are stored in float16: 2^-11 relative rounding per component of a unit vector


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A random tiny OpenAI CLIP, converted for 32 x 32 inputs (the conversion records its size)."""
    folder = tmp_path_factory.mktemp("model")
    torch.save(torch_refs.openai_clip(seed=3).state_dict(), folder / "clip.pt")
    assert convert.main([str(folder / "clip.pt"), str(folder / "converted"), "--image-size=32,32"]) == 0
    return folder / "converted"


def _gallery(root: Path, n: int, seed: int = 0, start: int = 0) -> list[str]:
    """n random images of varied sizes and formats, some in a subfolder; their relative paths."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(start, start + n):
        name = f"{'sub/' if i % 3 == 0 else ''}p{i:03d}.{('jpg', 'png', 'bmp', 'webp')[i % 4]}"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + i % 7, 16 + i % 5, 3), np.uint8)).save(root / name)
        names.append(name)
    return names


def _reference(enc: Encoder, root: Path, names: list[str]) -> np.ndarray:
    """Unit features of `names` as Encoder computes them, decoding each file with PIL directly."""
    x = np.stack([enc.preprocess(np.asarray(Image.open(root / n).convert("RGB"))) for n in names])
    f = enc.image_features(x)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_index_and_query_equal_a_brute_force_ranking(model, tmp_path):
    names = sorted(_gallery(tmp_path / "gal", 11))
    summary = build(model, tmp_path / "gal", tmp_path / "idx")
    assert (summary["images"], summary["encoded"], summary["indexed"], summary["skipped"]) == (11, 11, 11, 0)
    idx = Index.open(tmp_path / "idx")
    assert (idx.paths, idx.kind, idx.has_text, idx.root) == (names, "clip", True, (tmp_path / "gal").resolve())
    enc = Encoder.load(model)
    ref = _reference(enc, tmp_path / "gal", names)
    np.testing.assert_allclose(np.asarray(idx.rows.feats, np.float32), ref, atol=FP16)
    # The ranking: brute force over the stored rows with the query encoded independently (tokenizer + Encoder).
    stored = np.asarray(idx.rows.feats, np.float32)
    text = "a woman in a red coat with a black backpack"
    t = enc.text_features(tokenizer.tokenize(text))[0]
    scores = stored @ (t / np.linalg.norm(t))
    hits = idx.query(text=text, top=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert [h.path for h in hits] == [names[i] for i in np.argsort(-scores, kind="stable")[:5]]
    np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:5], rtol=1e-5, atol=1e-6)

    q_image = tmp_path / "gal" / names[4]
    hits = idx.query(image=q_image, top=len(names) + 5)  # top > N: every image once
    assert len(hits) == len(names) and hits[0].path == names[4] and hits[0].score == pytest.approx(1, abs=FP16)
    img_scores = stored @ ref[4]
    assert [h.path for h in hits] == [names[i] for i in np.argsort(-img_scores, kind="stable")]
    np.testing.assert_allclose([h.score for h in hits], np.sort(img_scores)[::-1], rtol=1e-5, atol=1e-6)
    faiss_hits = idx.query(image=q_image, top=4, backend="faiss")
    assert [h.path for h in faiss_hits] == [h.path for h in hits[:4]]
    np.testing.assert_allclose([h.score for h in faiss_hits], [h.score for h in hits[:4]], atol=1e-5)


def test_reindex_adds_new_drops_removed_and_redoes_changed(model, tmp_path):
    gal = tmp_path / "gal"
    names = _gallery(gal, 6)
    build(model, gal, tmp_path / "idx")
    before = Index.open(tmp_path / "idx")
    kept = {p: np.array(before.rows.feats[i]) for i, p in enumerate(before.paths)}

    summary = build(model, gal, tmp_path / "idx")  # nothing changed: nothing encoded, nothing rewritten
    assert (summary["encoded"], summary["kept"]) == (0, 6)
    assert store.current(tmp_path / "idx")["generation"] == "g000001"

    new = _gallery(gal, 2, seed=5, start=50)
    (gal / names[0]).unlink()
    Image.fromarray(np.full((40, 16, 3), 200, np.uint8)).save(gal / names[1])  # same name, new contents
    summary = build(model, gal, tmp_path / "idx")
    assert (summary["encoded"], summary["kept"], summary["removed"], summary["indexed"]) == (3, 4, 1, 7)
    after = Index.open(tmp_path / "idx")
    assert after.paths == sorted(set(names[1:]) | set(new))
    for i, p in enumerate(after.paths):
        if p in kept and p != names[1]:
            np.testing.assert_array_equal(after.rows.feats[i], kept[p])  # untouched rows are copied, not redone
    ref = _reference(Encoder.load(model), gal, after.paths)
    np.testing.assert_allclose(np.asarray(after.rows.feats, np.float32), ref, atol=FP16)
    assert [d.name for d in (tmp_path / "idx").iterdir() if d.is_dir()] == ["g000002"]  # old generation removed


def test_kill_9_mid_run_then_rerun_indexes_every_image_once(model, tmp_path):
    gal, out = tmp_path / "gal", tmp_path / "idx"
    rng = np.random.default_rng(0)
    gal.mkdir()
    for i in range(120):  # large images: decoding paces the run, so the kill lands in the middle
        Image.fromarray(rng.integers(0, 256, (400, 200, 3), np.uint8)).save(gal / f"{i:03d}.bmp")
    cmd = [sys.executable, "-m", "reid_jax.search", "index", "--model", str(model), "--images", str(gal),
           "--index", str(out), "--batch", "2", "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / store.PARTS).glob("[!.]*.npz"))) < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / store.PARTS).glob("[!.]*.npz")))
    assert 3 <= done < 60, done  # killed after some batches, long before the last
    assert not (out / store.INDEX).exists()

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["indexed"] == 120 and 120 - 2 * done - 2 <= summary["encoded"] <= 120 - 2 * done
    idx = Index.open(out)
    assert idx.paths == sorted(f"{i:03d}.bmp" for i in range(120))  # every image, each once
    assert not (out / store.PARTS).exists()
    sample = [0, 1, 57, 119]
    ref = _reference(Encoder.load(model), gal, [idx.paths[i] for i in sample])
    np.testing.assert_allclose(np.asarray(idx.rows.feats[sample], np.float32), ref, atol=FP16)


def test_unreadable_files_are_skipped_and_listed(model, tmp_path):
    gal = tmp_path / "gal"
    _gallery(gal, 4)
    (gal / "text.jpg").write_text("not an image")
    good = (gal / "p001.png").read_bytes()
    (gal / "cut.png").write_bytes(good[: len(good) // 2])  # a truncated file
    (gal / "readme.txt").write_text("ignored: not named like an image")
    os.mkfifo(gal / "pipe.jpg")
    summary = build(model, gal, tmp_path / "idx")
    assert (summary["indexed"], summary["skipped"]) == (4, 2)
    skipped = dict(line.split("\t") for line in (tmp_path / "idx" / store.SKIPPED).read_text().splitlines())
    assert sorted(skipped) == ["cut.png", "text.jpg"]
    assert "not an image" in skipped["text.jpg"] and "damaged" in skipped["cut.png"]


def test_another_model_is_a_clear_error(model, tmp_path):
    gal = tmp_path / "gal"
    _gallery(gal, 3)
    build(model, gal, tmp_path / "idx")
    other = tmp_path / "other.pt"
    torch.save(torch_refs.openai_clip(seed=4).state_dict(), other)
    with pytest.raises(store.IndexError_, match="features of another model.*not comparable"):
        build(other, gal, tmp_path / "idx")
    with pytest.raises(store.IndexError_, match="another model"):
        Index.open(tmp_path / "idx", model=other)
    assert cli.main(["query", "--index", str(tmp_path / "idx"), "--text", "x", "--model", str(other)]) == 1
    moved = tmp_path / "moved"  # the same model elsewhere, given as --model: accepted at the index's input size
    shutil.copytree(model, moved)
    assert Index.open(tmp_path / "idx", model=moved).encoder.image_size == (32, 32)
    with pytest.raises(store.IndexError_, match="not a reid-jax search index"):
        Index.open(gal)


def test_image_only_model_with_camera_ids(tmp_path, capsys):
    """A CLIP-ReID SIE file: image queries only, and each image encoded with its camera's embedding."""
    path = tmp_path / "ViT-B-16_60.pth"
    torch_clip_reid.save(torch_clip_reid.build(seed=10, stride=12, cameras=4), path)
    gal = tmp_path / "gal"
    names = sorted(_gallery(gal, 3))
    cams = {n: i % 4 for i, n in enumerate(names)}
    (tmp_path / "cams.csv").write_text("".join(f"{n},{c}\n" for n, c in cams.items()))
    build(path, gal, tmp_path / "idx", camids=tmp_path / "cams.csv")
    idx = Index.open(tmp_path / "idx")
    assert (idx.kind, idx.has_text) == ("clip_reid", False)
    enc = Encoder.load(path)
    x = np.stack([enc.preprocess(np.asarray(Image.open(gal / n).convert("RGB"))) for n in names])
    ref = enc.image_features(x, [cams[n] for n in names])
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(idx.rows.feats, np.float32), ref, atol=FP16)
    assert list(idx.rows.camids) == [cams[n] for n in names]
    with pytest.raises(Exception, match="encodes images only"):
        idx.query(text="a man")
    assert cli.main(["query", "--index", str(tmp_path / "idx"), "--text", "a man"]) == 1
    assert "encodes images only" in capsys.readouterr().err
    hits = idx.query(image=gal / names[1], camid=cams[names[1]], top=1)
    assert hits[0].path == names[1] and hits[0].score == pytest.approx(1, abs=FP16)
    with pytest.raises(Exception, match="pass the query image's camera id"):
        idx.query(image=gal / names[1])
    (tmp_path / "cams.csv").write_text(f"{names[0]},1\n")
    with pytest.raises(Exception, match="no camera id for 2 of the 3 images"):
        build(path, gal, tmp_path / "idx2", camids=tmp_path / "cams.csv")


@pytest.mark.parametrize("n,k,chunk", [(1000, 7, 128), (300, 300, 64), (5, 10, 2), (513, 1, 512)])
def test_chunked_top_k_is_a_stable_sort(n, k, chunk):
    rng = np.random.default_rng(n)
    feats = rng.normal(size=(n, 16)).astype(np.float16)
    feats[n // 2] = feats[n // 3]  # exact ties keep the lower row first
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    scores, ids = topk.top_k(feats, queries, k, chunk=chunk)
    ref = queries @ feats.astype(np.float32).T
    order = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(scores, np.take_along_axis(ref, order, axis=1), rtol=1e-6, atol=1e-6)


def test_command_line(model, tmp_path, capsys):
    gal = tmp_path / "gal"
    names = sorted(_gallery(gal, 5))
    assert cli.main(["index", "--model", str(model), "--images", str(gal), "--index", str(tmp_path / "idx")]) == 0
    assert json.loads(capsys.readouterr().out)["indexed"] == 5
    assert cli.main(["query", "--index", str(tmp_path / "idx"), "--image", str(gal / names[2]), "--top", "3",
                     "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    hits = Index.open(tmp_path / "idx").query(image=gal / names[2], top=3)
    assert [(d["rank"], d["path"]) for d in lines] == [(h.rank, h.path) for h in hits]
    assert lines[0]["file"] == str((gal / names[2]).resolve())
    sheet_png = tmp_path / "sheet.png"
    assert cli.main(["query", "--index", str(tmp_path / "idx"), "--text", "a man", "--top", "4", "--sheet",
                     str(sheet_png)]) == 0
    hits = Index.open(tmp_path / "idx").query(text="a man", top=4)
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [(int(r), p) for r, _, p in printed] == [(h.rank, h.path) for h in hits]
    rows = [sheet.Row("a man", [sheet.Hit(Image.open(gal / h.path), h.score, h.rank, None, h.path) for h in hits])]
    expected = sheet.contact_sheet(rows, title=f"{tmp_path / 'idx'}: 5 images, model clip")
    np.testing.assert_array_equal(np.asarray(Image.open(sheet_png)), np.asarray(expected))
    assert cli.main(["query", "--index", str(tmp_path / "idx"), "--image", str(tmp_path / "nope.jpg")]) == 1
    assert "nope.jpg: cannot read it" in capsys.readouterr().err
    assert cli.main(["index", "--model", str(model), "--images", str(tmp_path / "none"), "--index",
                     str(tmp_path / "i2")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_a_built_split_written_as_files(data_dir, tmp_path, capsys):
    out = tmp_path / "photos"
    assert cli.main(["images", "--dataset", "synthetic_pedestrians/small", "--split", "test", "--data_dir",
                     str(data_dir), "--out", str(out), "--limit", "7"]) == 0
    source = data.load_source("synthetic_pedestrians", "test", data_dir, "small")
    cams = dict(line.split(",") for line in (out / "camids.csv").read_text().splitlines())
    assert len(cams) == 7
    for i in range(7):
        rel = source[i]["file_name"].decode()
        np.testing.assert_array_equal(np.asarray(Image.open(out / rel).convert("RGB")), source[i]["image"])
        assert int(cams[rel]) == max(int(source[i]["camid"]), 0)
    assert cli.main(["images", "--dataset", "nope", "--split", "test", "--data_dir", str(data_dir), "--out",
                     str(out)]) == 1
    assert "nope" in capsys.readouterr().err
