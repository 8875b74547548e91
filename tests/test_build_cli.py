"""`python -m reid_jax.data.build` as a user meets it: images not in RGB, rebuilds (reused, redone, killed),
path flags with ~ and $VARS, empty captions, and each bad input's one-line error and exit status."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_builders import prepared
from data_builders.common import BadItem
from reid_jax.data import build as build_lib
from reid_jax.data import load_source, transforms
from reid_jax.errors import UserError
from tests import build_cli
from tests import fixtures

REPO = Path(__file__).resolve().parents[1]


def _read(name, split, data_dir, **kwargs) -> dict[str, dict]:
    source = load_source(name, split, data_dir, **kwargs)
    return {r["file_name"].decode(): r for r in (source[i] for i in range(len(source)))}


def _counts(b) -> dict[str, int]:
    return {k: v.num_examples for k, v in b.info.splits.items()}


def _market(tmp_path) -> tuple[Path, Path]:
    manual = tmp_path / "manual"
    fixtures.market1501(manual)
    return manual, tmp_path / "data"


_cli, _error_line = build_cli.run, build_cli.error_line


# ------------------------------------------------------------------------------------------ 7: not RGB
def test_non_rgb_images_are_stored_as_rgb_the_way_pil_converts_them(tmp_path):
    """CMYK and grey JPEGs, RGBA/LA/palette/16-bit PNGs come back uint8 [16, 8, 3] holding exactly what
    `Image.open(p).convert('RGB')` reads (and what the fixture worked out by hand); an RGB JPEG is kept as is."""
    manual = tmp_path / "manual"
    files = {mode: f"odd/{i}{suffix}" for i, (mode, suffix) in enumerate(fixtures.ODD_MODES.items())}
    splits = ["train", "val", "test"]  # every split needs an example
    rows = [(splits[i % 3], rel, i + 1, [f"caption {i}"]) for i, rel in enumerate([*files.values(), "odd/rgb.jpg"])]
    fixtures.caption_json(manual, "reid_raw.json", "file_path", rows)
    want = {mode: fixtures.odd_image(manual / "imgs", rel, mode) for mode, rel in files.items()}
    build_lib.build("cuhk_pedes", tmp_path / "data", manual)

    got = {k: v for split in splits for k, v in _read("cuhk_pedes", split, tmp_path / "data").items()}
    for mode, rel in files.items():
        image = got[f"imgs/{rel}"]["image"]
        assert image.dtype == np.uint8 and image.shape == (16, 8, 3), mode
        with Image.open(manual / "imgs" / rel) as source:
            np.testing.assert_array_equal(image, np.asarray(source.convert("RGB")), err_msg=mode)
        tolerance = 1 if mode == "CMYK" else 0  # the hand formula rounds once, PIL's integer CMYK path twice
        assert np.abs(image.astype(int) - want[mode]).max() <= tolerance, mode
    raw = _read("cuhk_pedes", rows[-1][0], tmp_path / "data", decode_image=False)["imgs/odd/rgb.jpg"]["image"]
    assert raw == (manual / "imgs/odd/rgb.jpg").read_bytes()


def test_transforms_refuse_non_rgb_images_with_a_rebuild_hint():
    cfg = transforms.default_config()
    cfg.image_size = (16, 8)
    rgb = np.zeros((16, 8, 3), np.uint8)
    assert transforms.eval_transform(rgb, cfg).shape == (16, 8, 3)
    for bad in (np.zeros((16, 8, 4), np.uint8), np.zeros((16, 8), np.uint8), np.zeros((16, 8, 3), np.uint16)):
        with pytest.raises(UserError, match=r"expected uint8 \[H, W, 3\].*rebuild it with .*--force"):
            transforms.eval_transform(bad, cfg)
        with pytest.raises(UserError, match="rebuild"):
            transforms.train_transform(bad, np.full((3, 4), -1, np.float32), cfg, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- 8: rebuilds
def test_rebuild_redoes_the_build_only_when_inputs_change(tmp_path):
    manual, data = _market(tmp_path)
    b, outcome, _ = build_lib.prepare("market1501", data, manual)
    assert outcome == "built" and _counts(b) == {"train": 3, "query": 2, "gallery": 3}
    assert build_lib.prepare("market1501", data, manual)[1:] == ("reused", "")

    fixtures.image(manual, "query/0007_c6s1_002051_00.jpg")  # the raw tree changes: a query more
    b, outcome, why = build_lib.prepare("market1501", data, manual)
    assert outcome == "rebuilt" and "manual folder changed: 15 files" in why and _counts(b)["query"] == 3
    assert build_lib.prepare("market1501", data, manual)[1] == "reused"

    stamp = manual / "query/0007_c6s1_002051_00.jpg"
    os.utime(stamp, ns=(stamp.stat().st_atime_ns, stamp.stat().st_mtime_ns + 10**9))  # same size, new mtime
    assert build_lib.prepare("market1501", data, manual)[1:] == (
        "rebuilt", "the manual folder changed: same 16 files and size, names or mtimes differ")
    assert build_lib.prepare("market1501", data, manual, force=True)[1:] == ("rebuilt", "--force")
    assert not list((data / "market1501").glob(".building-*"))  # no staging folder left behind


def test_rebuild_without_skip_bad_is_not_the_skip_bad_build(tmp_path):
    """The reported case: a build that skipped a bad file, then a rebuild without --skip_bad on the same tree,
    then one after the file is fixed; the first dataset stays readable until a complete one replaces it."""
    manual, data = _market(tmp_path)
    bad = "bounding_box_train/0002_c1s1_000451_03.jpg"
    (manual / bad).write_bytes((manual / bad).read_bytes()[:100])
    assert _counts(build_lib.build("market1501", data, manual, skip_bad=True))["train"] == 2
    with pytest.raises(BadItem, match=f"{bad}: corrupt or truncated image"):
        build_lib.build("market1501", data, manual)
    assert bad not in _read("market1501", "train", data) and len(_read("market1501", "train", data)) == 2
    fixtures.image(manual, bad)
    b, outcome, why = build_lib.prepare("market1501", data, manual)
    assert outcome == "rebuilt" and "--skip_bad was True, now False" in why and _counts(b)["train"] == 3


def test_rebuild_when_captions_or_part_boxes_change(tmp_path):
    manual, data = _market(tmp_path)
    named = "bounding_box_train/0002_c1s1_000451_03.jpg"
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": named, "caption": "A man in a red coat."}) + "\n")
    build_lib.build("market1501", data, manual, captions=captions)
    assert build_lib.prepare("market1501", data, manual, captions=captions)[1] == "reused"
    captions.write_text(json.dumps({"image": named, "caption": "A man in a blue coat."}) + "\n")
    assert build_lib.prepare("market1501", data, manual, captions=captions)[1:] == (
        "rebuilt", "the --captions file changed")
    assert _read("market1501", "train", data)[named]["captions"] == [b"A man in a blue coat."]
    parts = tmp_path / "parts.jsonl"
    parts.write_text(json.dumps({"image": named, "boxes": [[0, 0, 1, 0.2], [0, 0.2, 1, 0.6], [0, 0.6, 1, 1]]}))
    assert build_lib.prepare("market1501", data, manual, part_boxes=parts, captions=captions)[1:] == (
        "rebuilt", "--part_boxes was not given, now given")


KILLED_BUILD = """
import pathlib, sys, time
from data_builders.market_style import MarketStyle

original = MarketStyle._folder

def stalls_in_query(self, manual_dir, split, folder):
    for item in original(self, manual_dir, split, folder):
        if split == "query":
            pathlib.Path(sys.argv[3]).write_text("building query")
            time.sleep(120)
        yield item

MarketStyle._folder = stalls_in_query
from reid_jax.data.build import build
build("market1501", sys.argv[1], sys.argv[2])
"""


def test_rebuild_killed_midway_leaves_the_old_dataset(tmp_path):
    manual, data = _market(tmp_path)
    build_lib.build("market1501", data, manual)
    fixtures.image(manual, "query/0007_c6s1_002051_00.jpg")
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, data, manual, marker], cwd=REPO,
                             env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the child build never reached the query split"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(_read("market1501", "query", data)) == 2  # the old build, whole
    assert list((data / "market1501").glob(".building-*"))  # the killed build's staging folder
    b, outcome, _ = build_lib.prepare("market1501", data, manual)
    assert outcome == "rebuilt" and _counts(b)["query"] == 3
    assert not list((data / "market1501").glob(".building-*"))  # removed by the next build


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_swap_cut_between_two_renames_is_undone(tmp_path, monkeypatch):
    """Without an atomic exchange the swap is two renames; killed between them, the next build puts the old
    dataset back; failing between them, the build itself does."""
    manual, data = _market(tmp_path)
    build_lib.build("market1501", data, manual)
    version = data / "market1501" / "1.0.0"
    staging = data / "market1501" / f"{prepared.STAGING_PREFIX}{prepared._host()}-{_dead_pid()}"
    (staging / "replaced").mkdir(parents=True)
    version.rename(staging / "replaced" / "1.0.0")  # the state a kill after the first rename leaves
    assert build_lib.prepare("market1501", data, manual)[1] == "reused" and not staging.exists()

    monkeypatch.setattr(prepared, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def second_rename_fails(src, dst):
        if Path(dst) == version and ".building-" in str(src) and "replaced" not in str(src):  # new -> target
            raise OSError("disk gone")
        return real_rename(src, dst)

    fixtures.image(manual, "query/0007_c6s1_002051_00.jpg")
    monkeypatch.setattr(prepared.os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"):
        build_lib.build("market1501", data, manual)
    monkeypatch.setattr(prepared.os, "rename", real_rename)
    assert len(_read("market1501", "query", data)) == 2
    b, outcome, _ = build_lib.prepare("market1501", data, manual)  # the fallback swap, uninterrupted
    assert outcome == "rebuilt" and _counts(b)["query"] == 3


# ------------------------------------------------------------------------------------------- 9: ~ and $VARS
def test_path_flags_expand_home_and_variables(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    fixtures.market1501(home / "raw")
    named = "query/0002_c6s1_000451_03.jpg"
    (home / "captions.jsonl").write_text(json.dumps({"image": named, "caption": "A man."}) + "\n")
    args = ["market1501", "--data_dir=~/tfds", "--manual_dir=$RAW_DIR", "--captions=~/captions.jsonl"]
    out = _cli(*args, cwd=cwd, env={"HOME": str(home), "RAW_DIR": str(home / "raw")})
    assert out.returncode == 0, out.stderr
    assert f"built market1501 -> {home / 'tfds/market1501/1.0.0'}: train 3, query 2, gallery 3" in out.stdout
    assert _read("market1501", "query", home / "tfds")[named]["captions"] == [b"A man."]
    assert list(cwd.iterdir()) == []  # no folder literally named ~ or $RAW_DIR
    again = _cli(*args, cwd=cwd, env={"HOME": str(home), "RAW_DIR": str(home / "raw")})
    assert again.returncode == 0 and "reused the existing build of market1501" in again.stdout
    assert "pass --force to rebuild" in again.stdout


# ------------------------------------------------------------------------------------------ 10: bad input
@pytest.mark.parametrize("captions", [[], [""], ["A man.", "  "]])
def test_empty_captions_in_annotation_json_are_bad_items(tmp_path, caplog, captions):
    manual = tmp_path / "manual"
    fixtures.cuhk_pedes(manual)
    ann = manual / "reid_raw.json"
    entries = json.loads(ann.read_text(encoding="utf-8"))
    ann.write_text(json.dumps(entries + [{**entries[1], "captions": captions}]), encoding="utf-8")
    problem = "\"captions\" is []" if not captions else f"caption {len(captions) - 1} is empty"
    with pytest.raises(BadItem, match="reid_raw.json entry 6: ") as e:
        build_lib.build("cuhk_pedes", tmp_path / "data", manual)
    assert problem in str(e.value)
    with caplog.at_level("INFO"):
        build_lib.build("cuhk_pedes", tmp_path / "data", manual, skip_bad=True)
    assert "cuhk_pedes/train: 2 examples written, 1 bad items skipped" in caplog.text


def test_empty_captions_in_caption_files_are_bad_items(tmp_path, caplog):
    manual = tmp_path / "manual"
    fixtures.luperson_mllm(manual)
    static = manual / "captions/qwen_static.json"
    static.write_text(json.dumps({**json.loads(static.read_text(encoding="utf-8")), "01/e.jpg": ""}))
    with pytest.raises(BadItem, match="captions/qwen_static.json: '01/e.jpg' maps to an empty caption"):
        build_lib.build("luperson_mllm", tmp_path / "data", manual, skip_bad=False)
    static.write_text(json.dumps({"00/a.jpg": fixtures.CAPTIONS[0]}))
    with open(manual / "captions/ours.jsonl", "a") as f:
        f.write(json.dumps({"image": "00/b.jpg", "caption": " "}) + "\n")
    with pytest.raises(BadItem, match="captions/ours.jsonl:3: empty caption for '00/b.jpg'"):
        build_lib.build("luperson_mllm", tmp_path / "data", manual)

    market, data = _market(tmp_path)  # --captions: the same rule, and --skip_bad skips and counts the line
    named = "query/0002_c6s1_000451_03.jpg"
    lines = tmp_path / "captions.jsonl"
    lines.write_text(json.dumps({"image": named, "caption": "A man."}) + "\n"
                     + json.dumps({"image": named, "caption": ""}) + "\n")
    with pytest.raises(BadItem, match="captions.jsonl:2: empty caption"):
        build_lib.build("market1501", data, market, captions=lines)
    with caplog.at_level("WARNING"):
        build_lib.build("market1501", data, market, captions=lines, skip_bad=True)
    assert "captions.jsonl: 1 bad lines skipped" in caplog.text
    assert _read("market1501", "query", data)[named]["captions"] == [b"A man."]


def _bad_inputs(tmp_path) -> dict:
    manual, data = _market(tmp_path)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    corrupt = manual / "query/0002_c6s1_000451_03.jpg"
    return {  # case -> (args, exit status, text of the error line)
        "unknown NAME": (["market1501x", f"--data_dir={data}"], 2,
                         "unknown dataset 'market1501x'; NAME is one of cuhk03_np, cuhk_pedes"),
        "unknown --config": (["cuhk03_np", "--config=detect", f"--manual_dir={manual}", f"--data_dir={data}"], 2,
                             "unknown --config=detect for cuhk03_np; expected one of detected, labeled"),
        "--config where there are none": (["market1501", "--config=small", f"--data_dir={data}"], 2,
                                          "market1501 has no configs"),
        "no NAME": ([f"--data_dir={data}"], 2, "expected one dataset NAME, got 0 arguments"),
        "no --data_dir": (["market1501", f"--manual_dir={manual}"], 2, "--data_dir is required"),
        "unknown flag": (["market1501", "--skipbad", f"--data_dir={data}"], 2, "Unknown command line flag"),
        "--manual_dir a file": (["market1501", f"--manual_dir={a_file}", f"--data_dir={data}"], 1,
                                f"market1501: the manual folder {a_file} is a file"),
        "--manual_dir missing": (["market1501", f"--manual_dir={tmp_path / 'nowhere'}", f"--data_dir={data}"], 1,
                                 "is missing or empty"),
        "--data_dir a file": (["market1501", f"--manual_dir={manual}", f"--data_dir={a_file}"], 1,
                              f"--data_dir={a_file} is a file"),
        "--captions missing": (["market1501", f"--manual_dir={manual}", f"--data_dir={data}",
                                f"--captions={tmp_path / 'captions.jsonl'}"], 1, "captions.jsonl is missing"),
        "corrupt image": (["market1501", f"--manual_dir={manual}", f"--data_dir={data}"], 1,
                          "query/0002_c6s1_000451_03.jpg: corrupt or truncated image"),
    }, corrupt


BAD_INPUTS = ["unknown NAME", "unknown --config", "--config where there are none", "no NAME", "no --data_dir",
              "unknown flag", "--manual_dir a file", "--manual_dir missing", "--data_dir a file",
              "--captions missing", "corrupt image"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_each_bad_input_is_one_error_line_with_its_exit_status(tmp_path, case):
    cases, corrupt = _bad_inputs(tmp_path)
    args, status, text = cases[case]
    if case == "corrupt image":
        corrupt.write_bytes(b"\xff\xd8 not really a JPEG")
    out = _cli(*args)
    assert out.returncode == status, out.stderr
    line = _error_line(out)
    assert text in line, line
    if case.startswith("--manual_dir"):  # the layout follows the error line
        assert "bounding_box_train/" in out.stderr.split(line, 1)[1]
    if case == "corrupt image":
        assert "pass --skip_bad" in line
    assert not (tmp_path / "data" / "market1501" / "1.0.0").exists()
