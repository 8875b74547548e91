"""TFDS builders of the nine real ReID datasets, built from tiny fixture trees in their real on-disk layouts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_builders import builder_class
from data_builders.common import BadItem, ManualDirError
from reid_jax.data import load_source
from reid_jax.data.build import build
from tests import fixtures

REPO = Path(__file__).resolve().parents[1]
NAMES = list(fixtures.WRITERS)
SPLITS = {"cuhk_pedes": ["train", "val", "test"], "icfg_pedes": ["train", "test"],
          "rstp_reid": ["train", "val", "test"], "luperson_mllm": ["train"]}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read(name, split, data_dir, config=None) -> dict[str, dict]:
    source = load_source(name, split, data_dir, config)
    rows = [source[i] for i in range(len(source))]
    return {_text(r["file_name"]): r for r in rows}


def _check(name, data_dir, expected, config=None):
    """Every split holds exactly the expected examples, field by field, image pixels included."""
    assert sorted(expected) == sorted(SPLITS.get(name, ["train", "query", "gallery"]))
    for split, want in expected.items():
        got = _read(name, split, data_dir, config)
        assert sorted(got) == sorted(want), split
        for file_name, exp in want.items():
            ex = got[file_name]
            assert (int(ex["pid"]), int(ex["camid"])) == (exp.pid, exp.camid), file_name
            assert [_text(c) for c in ex["captions"]] == exp.captions, file_name
            assert [_text(s) for s in ex["caption_sources"]] == exp.sources, file_name
            assert _text(ex["domain"]) == name
            img = ex["image"]
            assert img.dtype == np.uint8 and img.shape == (16, 8, 3), file_name
            _assert_colour(img, exp.colour, lossless=file_name.endswith(".png"), where=file_name)
            np.testing.assert_array_equal(ex["part_boxes"], np.full((3, 4), -1, np.float32))


# A flat colour through JPEG (quality 95, no chroma subsampling) comes back within a few levels of 255 whatever
# the libjpeg build; PNG is lossless, so PNG pixels must be exact. No XLA kernel is involved in either.
JPEG_LEVELS = 4


def _assert_colour(img: np.ndarray, colour, lossless: bool, where: str):
    error = np.abs(img.reshape(-1, 3).astype(int) - np.asarray(colour)).max()
    assert error <= (0 if lossless else JPEG_LEVELS), f"{where}: pixels off by {error} levels of 255"


def _manual(tmp_path, name, **kwargs):
    manual = tmp_path / "manual"
    manual.mkdir()
    return manual, fixtures.WRITERS[name](manual, **kwargs)


def test_registry_names_match_tfds_names():
    for name in NAMES:
        assert builder_class(name).name == name


@pytest.mark.parametrize("name,config", [(n, None) for n in NAMES] + [("cuhk03_np", "labeled")])
def test_build_and_read_back(tmp_path, name, config):
    manual, expected = _manual(tmp_path, name, **({"config": config} if config else {}))
    build(name, tmp_path / "data", manual, config=config)
    _check(name, tmp_path / "data", expected, config)


def test_fixtures_pin_the_protocols(tmp_path):
    """What the fixtures (and so test_build_and_read_back) check, stated plainly."""
    market = fixtures.market1501(tmp_path / "market")  # junk -1 nowhere, distractor 0 in the gallery only
    assert all(e.pid > 0 for split in ("train", "query") for e in market[split].values())
    assert any(e.pid == 0 for e in market["gallery"].values())
    assert all(e.pid != -1 for split in market.values() for e in split.values())
    msmt = fixtures.msmt17(tmp_path / "msmt")  # val is part of train
    assert "train/0002/0002_001_07_0303noon_0003_0.jpg" in msmt["train"]
    pedes = fixtures.cuhk_pedes(tmp_path / "pedes")  # a repeated image: one example, captions merged in order
    assert pedes["train"]["imgs/CUHK01/0001001.png"].captions == fixtures.CAPTIONS[0:2] + fixtures.CAPTIONS[3:4]
    luperson = fixtures.luperson_mllm(tmp_path / "luperson")
    assert luperson["train"]["images/00/a.jpg"].sources == ["gemini_template", "ours_static", "qwen_static"]


def test_luperson_skips_uncaptioned_images_and_counts_them(tmp_path, caplog):
    manual, _ = _manual(tmp_path, "luperson_mllm")
    with caplog.at_level("WARNING"):
        build("luperson_mllm", tmp_path / "data", manual)
    log = caplog.text
    for file_name in fixtures.LUPERSON_NO_CAPTION:
        assert f"no caption for {file_name}" in log
    assert f"1 of {len(fixtures.LUPERSON_IMAGES)} images had no caption" in log
    assert "gemini_template: 1 captions with a template placeholder replaced by a static caption" in log
    assert "gemini_template: 1 captions with a template placeholder kept" in log
    assert "not/here.jpg" in log


def test_luperson_reads_the_authors_release_as_it_is(tmp_path):
    """Their layout: the images flat in LUPerson-MLLM/, the four caption files in caption/ keyed by paths of
    their machine; pid = index of the image in sorted order, static captions (Ts-*) replace leaked ones."""
    manual = tmp_path / "release"
    names = ["0001.jpg", "0002.jpg", "0003.jpg"]
    for n in names:
        fixtures.image(manual, f"LUPerson-MLLM/{n}")
    (manual / "caption").mkdir()
    far = "/data0/someone/LUPerson_images/LUPerson-MLLM/"
    files = {"Td-qwen.json": {far + "0001.jpg": "A man in a [clothing description].", far + "0002.jpg": "dyn 2"},
             "Td-shikra.json": {far + "0001.jpg": "dyn shikra 1"},
             "Ts-qwen.json": {far + "0001.jpg": "static qwen 1", far + "0003.jpg": "static qwen 3"},
             "Ts-shikra.json": {far + "0002.jpg": "static shikra 2"}}
    for name, content in files.items():
        (manual / "caption" / name).write_text(json.dumps(content))
    build("luperson_mllm", tmp_path / "data", manual)
    got = {k: (int(e["pid"]), [_text(c) for c in e["captions"]], [_text(c) for c in e["caption_sources"]])
           for k, e in _read("luperson_mllm", "train", tmp_path / "data").items()}
    assert got == {"LUPerson-MLLM/0001.jpg": (0, ["static qwen 1", "dyn shikra 1", "static qwen 1"],
                                              ["Td-qwen", "Td-shikra", "Ts-qwen"]),
                   "LUPerson-MLLM/0002.jpg": (1, ["dyn 2", "static shikra 2"], ["Td-qwen", "Ts-shikra"]),
                   "LUPerson-MLLM/0003.jpg": (2, ["static qwen 3"], ["Ts-qwen"])}


def test_part_boxes_from_parts_jsonl(tmp_path):
    manual, expected = _manual(tmp_path, "market1501")
    boxed = "bounding_box_test/0002_c2s1_000301_02.jpg"
    boxes = [[0.1, 0.0, 0.9, 0.2], [0.05, 0.2, 0.95, 0.6], [0.1, 0.6, 0.9, 1.0]]
    parts = tmp_path / "parts.jsonl"
    parts.write_text(json.dumps({"image": boxed, "boxes": boxes}) + "\n")
    build("market1501", tmp_path / "data", manual, part_boxes=parts)
    for split in expected:
        for file_name, ex in _read("market1501", split, tmp_path / "data").items():
            want = boxes if file_name == boxed else np.full((3, 4), -1)
            np.testing.assert_allclose(ex["part_boxes"], want, rtol=1e-6)


def test_captions_from_captioner_jsonl(tmp_path):
    """--captions adds the captioner's lines (CLIP-SCGI's synthesized captions) to an image-ReID set."""
    manual, expected = _manual(tmp_path, "market1501")
    named = "bounding_box_train/0002_c1s1_000451_03.jpg"
    lines = [{"image": named, "caption": "A man in a red coat.", "source": "llava_static", "template_id": -1},
             {"image": named, "caption": "He wears black boots.", "source": "llava_template", "template_id": 3}]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    build("market1501", tmp_path / "data", manual, captions=captions)
    seen = 0
    for split in expected:
        for file_name, ex in _read("market1501", split, tmp_path / "data").items():
            want = [line["caption"] for line in lines] if file_name == named else []
            assert [c.decode() for c in ex["captions"]] == want
            assert [s.decode() for s in ex["caption_sources"]] == ([line["source"] for line in lines] if want else [])
            seen += bool(want)
    assert seen == 1
    captions.write_text('{"image": "x.jpg", "caption": 3}\n')
    with pytest.raises(BadItem, match=r"captions.jsonl:1: expected a JSON object"):
        build("market1501", tmp_path / "data2", manual, captions=captions)


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_manual_folder_gives_instructions(tmp_path):
    for name in NAMES:
        with pytest.raises(ManualDirError, match="manual folder .* is missing or empty") as e:
            build(name, tmp_path / "data", tmp_path / "nowhere")
        assert builder_class(name).MANUAL_DOWNLOAD_INSTRUCTIONS in str(e.value)


@pytest.mark.parametrize("name,missing", [
    ("market1501", "query"), ("dukemtmc_reid", "bounding_box_test"), ("occluded_duke", "bounding_box_train"),
    ("cuhk03_np", "detected/query"), ("msmt17", "list_val.txt"), ("msmt17", "test"),
    ("cuhk_pedes", "reid_raw.json"), ("icfg_pedes", "imgs"), ("rstp_reid", "data_captions.json"),
    ("luperson_mllm", "captions")])
def test_wrong_layout_names_what_is_missing(tmp_path, name, missing):
    manual, _ = _manual(tmp_path, name)
    target = manual / missing
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(ManualDirError) as e:
        build(name, tmp_path / "data", manual)
    assert str(target) in str(e.value) and builder_class(name).MANUAL_DOWNLOAD_INSTRUCTIONS in str(e.value)
    with pytest.raises(FileNotFoundError, match="is not built"):
        load_source(name, "train", tmp_path / "data")


def test_corrupt_image_named_or_skipped(tmp_path, caplog):
    manual, expected = _manual(tmp_path, "market1501")
    bad = "bounding_box_train/0002_c1s1_000451_03.jpg"
    data = (manual / bad).read_bytes()
    (manual / bad).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(BadItem, match=f"(?s){bad}: corrupt or truncated image.*--skip_bad"):
        build("market1501", tmp_path / "data", manual)
    with caplog.at_level("INFO"):
        build("market1501", tmp_path / "data2", manual, skip_bad=True)
    assert "market1501/train: 2 examples written, 1 bad items skipped" in caplog.text
    assert sorted(_read("market1501", "train", tmp_path / "data2")) == sorted(set(expected["train"]) - {bad})


@pytest.mark.parametrize("name,rel,hint", [
    ("market1501", "query/0002_c7s1_000451_03.jpg", "camera 7 outside 1..6"),
    ("market1501", "bounding_box_test/0002-c1s1-000451-03.jpg", "PPPP_cCsS_FFFFFF_BB.jpg"),
    ("dukemtmc_reid", "bounding_box_train/0001_c9_f0046182.jpg", "camera 9 outside 1..8"),
    ("occluded_duke", "query/0001_f0046182.jpg", "PPPP_cC_fFFFFFFF.jpg"),
    ("cuhk03_np", "detected/query/0001_1.png", "PPPP_cC_N.png")])
def test_file_name_breaking_the_rule(tmp_path, name, rel, hint):
    manual, _ = _manual(tmp_path, name)
    fixtures.image(manual, rel)
    with pytest.raises(BadItem) as e:
        build(name, tmp_path / "data", manual)
    assert rel in str(e.value) and hint in str(e.value)
    b = build(name, tmp_path / "data2", manual, skip_bad=True)
    assert sum(s.num_examples for s in b.info.splits.values()) > 0


def test_msmt17_bad_list_lines(tmp_path):
    manual, _ = _manual(tmp_path, "msmt17")
    with open(manual / "list_gallery.txt", "a") as f:
        f.write("0003/0003_000_02_0303morning_0001_0.jpg\n")  # no pid
    with pytest.raises(BadItem, match=r'list_gallery.txt:3: expected "relative/path.jpg pid"'):
        build("msmt17", tmp_path / "data", manual)
    (manual / "list_gallery.txt").write_text("0009/0009_000_02_0303morning_0001_0.jpg 9\n")
    with pytest.raises(BadItem, match="list_gallery.txt:1: image test/0009/0009_000_02_0303morning_0001_0.jpg "
                                      "not found"):
        build("msmt17", tmp_path / "data", manual)


def test_malformed_caption_jsonl_line(tmp_path):
    manual, expected = _manual(tmp_path, "luperson_mllm")
    with open(manual / "captions" / "ours.jsonl", "a") as f:
        f.write('{"image": "00/b.jpg", "caption": "unterminated\n')
        f.write('{"image": "00/b.jpg"}\n')
    with pytest.raises(BadItem, match=r"captions/ours.jsonl:3: malformed JSON"):
        build("luperson_mllm", tmp_path / "data", manual)
    build("luperson_mllm", tmp_path / "data2", manual, skip_bad=True)  # both bad lines skipped
    assert sorted(_read("luperson_mllm", "train", tmp_path / "data2")) == sorted(expected["train"])


def test_malformed_annotation_json(tmp_path):
    manual, _ = _manual(tmp_path, "cuhk_pedes")
    ann = manual / "reid_raw.json"
    entries = json.loads(ann.read_text(encoding="utf-8"))
    ann.write_text(ann.read_text(encoding="utf-8")[:-30], encoding="utf-8")
    with pytest.raises(BadItem, match=r"reid_raw.json:\d+:\d+: malformed JSON"):
        build("cuhk_pedes", tmp_path / "data", manual)
    for bad, problem in [({**entries[1], "split": "dev"}, "\"split\" is 'dev'"),
                         ({**entries[1], "captions": "one string"}, "\"captions\" is 'one string'"),
                         ({**entries[1], "id": 5}, "has id 5 in split 'train', but entry 1 gave it id 2")]:
        ann.write_text(json.dumps(entries + [bad]), encoding="utf-8")
        with pytest.raises(BadItem, match="reid_raw.json entry 6: ") as e:
            build("cuhk_pedes", tmp_path / "data", manual)
        assert problem in str(e.value)
    (manual / "imgs/CUHK03/2_1.jpg").unlink()
    ann.write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(BadItem, match="reid_raw.json entry 1: image imgs/CUHK03/2_1.jpg not found"):
        build("cuhk_pedes", tmp_path / "data", manual)
    b = build("cuhk_pedes", tmp_path / "data", manual, skip_bad=True)
    assert b.info.splits["train"].num_examples == 1


def test_interrupted_build_never_reads_as_complete(tmp_path, monkeypatch):
    manual, expected = _manual(tmp_path, "market1501")
    cls = builder_class("market1501")
    original = cls._folder

    def dies_midway(self, manual_dir, split, folder):
        for i, item in enumerate(original(self, manual_dir, split, folder)):
            if split == "query" and i == 1:
                raise RuntimeError("killed")
            yield item

    monkeypatch.setattr(cls, "_folder", dies_midway)
    with pytest.raises(RuntimeError, match="killed"):
        build("market1501", tmp_path / "data", manual)
    for split in ("train", "query"):
        with pytest.raises(FileNotFoundError, match="is not built .*python -m reid_jax.data.build market1501"):
            load_source("market1501", split, tmp_path / "data")
    monkeypatch.setattr(cls, "_folder", original)
    build("market1501", tmp_path / "data", manual)  # a rerun over the leftovers completes
    _check("market1501", tmp_path / "data", expected)


# ---------------------------------------------------------------------------------------------------- CLI
def _cli(*args):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "reid_jax.data.build", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_builds_market1501(tmp_path):
    manual, expected = _manual(tmp_path, "market1501")
    out = _cli("market1501", f"--manual_dir={manual}", f"--data_dir={tmp_path / 'data'}")
    assert out.returncode == 0, out.stderr
    assert "built market1501" in out.stdout and "train 3, query 2, gallery 3" in out.stdout
    _check("market1501", tmp_path / "data", expected)


def test_cli_missing_manual_folder_prints_instructions(tmp_path):
    out = _cli("msmt17", f"--manual_dir={tmp_path / 'nowhere'}", f"--data_dir={tmp_path / 'data'}")
    assert out.returncode == 1
    assert "error: msmt17: the manual folder" in out.stderr
    assert builder_class("msmt17").MANUAL_DOWNLOAD_INSTRUCTIONS in out.stderr
