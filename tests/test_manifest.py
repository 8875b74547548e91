"""Your own dataset from a manifest (`python -m reid_jax.data.build manifest`): CSV and JSON Lines build the rows
they list, read back through the project's own source; paths relative to the manifest; reuse and rebuild; each
bad input's one-line error and exit status; and a config trained and evaluated on a manifest dataset."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from data_builders.common import BadItem
from reid_jax.data import build as build_lib
from reid_jax.data import load_source, specs
from reid_jax.errors import UserError
from tests import build_cli, configs, fixtures, logged_metrics, test_evaluate
from tests.numerics import assert_close

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("path", "pid", "camid", "split", "captions", "domain")


# ----------------------------------------------------------------------------------------------- fixtures
def _rows(labels: bool = True) -> list[dict]:
    """A small dataset: 4 training identities x 4 images over 2 cameras and 2 domains (captions on each), 3 test
    identities with a query from camera 0 and gallery images from cameras 1 and 0, and a text-to-image test split
    that shares two gallery images. Pids are labels, or integers (`labels=False`)."""
    ids = ["tom", "una", "val", "wes", "xia", "yan", "zoe"]
    pid = {name: name if labels else 100 - 7 * i for i, name in enumerate(ids)}  # integers out of sorted order
    rows = []
    for name in ids[:4]:
        for k in range(4):
            rows.append({"path": f"images/{name}/{k}.png", "pid": pid[name], "camid": k % 2, "split": "train",
                         "captions": [f"{name} walks past camera {k % 2}.", f'Picture {k} of {name}, "quoted".'],
                         "domain": "day" if k < 2 else "night"})
    for name in ids[4:]:
        rows.append({"path": f"images/{name}/q.png", "pid": pid[name], "camid": 0, "split": "query"})
        for k in (1, 0):
            rows.append({"path": f"./images/{name}/g{k}.png", "pid": pid[name], "camid": k, "split": "gallery"})
    for name in ids[4:6]:
        rows.append({"path": f"images/{name}/g1.png", "pid": pid[name], "camid": 1, "split": "test",
                     "captions": [f"A photo of {name}."]})
    return rows


def _write(manifest: Path, rows: list[dict], columns=COLUMNS) -> Path:
    """The rows as CSV (captions as a JSON list in one cell) or JSON Lines, by the file's suffix; writes every
    image the rows name (constant-colour PNGs under the manifest's folder) unless it exists."""
    manifest.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        image = manifest.parent / row["path"]
        if not image.exists():
            fixtures.image(manifest.parent, os.path.normpath(row["path"]))
    if manifest.suffix == ".jsonl":
        manifest.write_text("".join(json.dumps({k: r[k] for k in columns if k in r}) + "\n" for r in rows),
                            encoding="utf-8")
        return manifest
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([json.dumps(r[k]) if k == "captions" and k in r else r.get(k, "") for k in columns])
    return manifest


def _expected(rows: list[dict], name: str) -> dict[str, dict[str, tuple]]:
    """{split: {file_name: (pid, camid, captions, domain)}}: integer pids as given, labels numbered 0.. in sorted
    order; paths normalised; the domain defaults to the dataset's name."""
    numbers = {p: i for i, p in enumerate(sorted({str(r["pid"]) for r in rows}))}
    labels = any(isinstance(r["pid"], str) for r in rows)
    out = {}
    for r in rows:
        pid = numbers[str(r["pid"])] if labels else r["pid"]
        out.setdefault(r["split"], {})[os.path.normpath(r["path"])] = (
            pid, r["camid"], r.get("captions", []), r.get("domain") or name)
    return out


def _read(name: str, data_dir: Path) -> dict[str, dict[str, tuple]]:
    """Every split of manifest/NAME through the project's source: {split: {file_name: (pid, camid, captions,
    domain)}}, each image checked to be its file's colour."""
    from reid_jax import data

    out = {}
    for split in data.builder("manifest", data_dir, name).info.splits:
        source = load_source("manifest", split, data_dir, name)
        for r in (source[i] for i in range(len(source))):
            file_name = r["file_name"].decode()
            np.testing.assert_array_equal(r["image"], np.full((16, 8, 3), fixtures.colour(file_name), np.uint8))
            out.setdefault(split, {})[file_name] = (int(r["pid"]), int(r["camid"]),
                                                    [c.decode() for c in r["captions"]], r["domain"].decode())
    return out


_cli, _error_line = build_cli.run, build_cli.error_line


# ------------------------------------------------------------------------------------------- build, read
@pytest.mark.parametrize("labels", [True, False], ids=["label pids", "integer pids"])
def test_csv_and_jsonl_build_the_rows_they_list(tmp_path, labels):
    rows = _rows(labels)
    data = tmp_path / "data"
    for suffix in (".csv", ".jsonl"):
        name = f"rows_{suffix[1:]}"  # two manifests side by side under one data dir
        build_lib.build("manifest", data, manifest=_write(tmp_path / "raw" / f"{name}{suffix}", rows))
        assert _read(name, data) == _expected(rows, name)
    written = data / "manifest" / "rows_csv" / "1.0.0" / "pid_labels.json"
    if labels:
        assert json.loads(written.read_text()) == {p: i for i, p in enumerate(["tom", "una", "val", "wes", "xia",
                                                                                "yan", "zoe"])}
    else:
        assert not written.exists()


def test_a_manifest_names_images_relative_to_its_own_folder_from_any_cwd(tmp_path):
    rows = [{**r, "path": f"../{r['path']}"} for r in _rows()]  # the manifest one folder below the images
    manifest = _write(tmp_path / "raw" / "lists" / "people.jsonl", rows)
    assert (tmp_path / "raw" / "images" / "tom" / "0.png").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _cli("manifest", f"--manifest={manifest}", f"--data_dir={tmp_path / 'data'}", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert f"built manifest/people -> {tmp_path / 'data/manifest/people/1.0.0'}: train 16, query 3, gallery 6, " \
           f"test 2" in out.stdout  # the name defaults to the manifest's stem
    assert "{name: 'manifest', config: 'people'" in out.stdout
    assert _read("people", tmp_path / "data") == _expected(rows, "people")
    assert list(elsewhere.iterdir()) == []


def test_rebuild_only_when_the_manifest_or_an_image_it_names_changes(tmp_path):
    rows, data = _rows(), tmp_path / "data"
    manifest = _write(tmp_path / "raw" / "mine.csv", rows)
    assert build_lib.prepare("manifest", data, manifest=manifest)[1:] == ("built", "")
    assert build_lib.prepare("manifest", data, manifest=manifest, config="mine")[1:] == ("reused", "")
    other = build_lib.build("manifest", data, manifest=manifest, config="other")  # another name: its own build
    assert Path(other.data_dir) == data / "manifest" / "other" / "1.0.0"
    assert build_lib.prepare("manifest", data, manifest=manifest)[1] == "reused"

    unlisted = tmp_path / "raw" / "images" / "notes.png"  # a file the manifest does not name changes nothing
    fixtures.image(tmp_path / "raw", "images/notes.png")
    assert build_lib.prepare("manifest", data, manifest=manifest)[1] == "reused" and unlisted.exists()

    image = tmp_path / "raw" / "images" / "tom" / "0.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # same size, new mtime
    assert build_lib.prepare("manifest", data, manifest=manifest)[1:] == (
        "rebuilt", "the images it names changed: same 25 files and size, names or mtimes differ")
    size = sum((tmp_path / "raw" / p).stat().st_size for p in {os.path.normpath(r["path"]) for r in rows})
    fixtures.image(tmp_path / "raw", "images/tom/0.png")
    image.write_bytes(image.read_bytes() + b"\0" * 7)  # a longer file; PNG readers ignore the trailing bytes
    assert build_lib.prepare("manifest", data, manifest=manifest)[1:] == (
        "rebuilt", f"the images it names changed: 25 files, {size} bytes -> 25 files, {size + 7} bytes")

    _write(manifest, rows + [{"path": "images/zoe/q.png", "pid": "zoe", "camid": 0, "split": "test"}])
    b, outcome, why = build_lib.prepare("manifest", data, manifest=manifest)
    assert (outcome, why) == ("rebuilt", "the manifest changed")
    assert b.info.splits["test"].num_examples == 3
    assert build_lib.prepare("manifest", data, manifest=manifest, force=True)[1:] == ("rebuilt", "--force")
    assert build_lib.prepare("manifest", data, manifest=manifest, skip_bad=True)[1:] == (
        "rebuilt", "--skip_bad was False, now True")
    assert build_lib.prepare("manifest", data, manifest=manifest, config="other")[1:] == (
        "rebuilt", f"the manifest changed; the images it names changed: 25 files, {size} bytes -> 25 files, "
        f"{size + 7} bytes")
    assert not list((data / "manifest").glob(".building-*"))


def test_skip_bad_skips_and_counts_bad_rows_and_images(tmp_path, caplog):
    rows = _set(_set(_rows(), 1, split="val"), 2, path="images/tom/missing.png")
    manifest = _write(tmp_path / "raw" / "mine.jsonl", rows)
    (tmp_path / "raw" / "images/tom/missing.png").unlink()  # rows[2] names an image that is not there
    (tmp_path / "raw" / "images/tom/3.png").write_bytes(b"\x89PNG not really")  # rows[3]'s is corrupt
    with pytest.raises(BadItem, match=r"mine.jsonl:2: column 'split': 'val'; expected one of train, query, "
                                      r"gallery, test\n\(pass --skip_bad"):
        build_lib.build("manifest", tmp_path / "data", manifest=manifest)
    with caplog.at_level("INFO"):
        build_lib.build("manifest", tmp_path / "data", manifest=manifest, skip_bad=True)
    assert "manifest/train: 13 examples written, 3 bad items skipped" in caplog.text
    assert _read("mine", tmp_path / "data") == _expected([r for i, r in enumerate(rows) if i not in (1, 2, 3)],
                                                         "mine")


# --------------------------------------------------------------------------------------------- bad input
def _lines(manifest: Path, change) -> Path:
    """The manifest with `change(lines)` applied to its text lines (line 1 = the CSV header)."""
    lines = manifest.read_text(encoding="utf-8").splitlines()
    manifest.write_text("\n".join(change(lines)) + "\n", encoding="utf-8")
    return manifest


def _set(rows: list[dict], index: int, **fields) -> list[dict]:
    return [{**r, **fields} if i == index else r for i, r in enumerate(rows)]


# One row changed: the CSV line that holds rows[1] (line 3; line 1 is the header) or another named line
CSV_LINES = {
    "a short row": (3, "images/tom/1.png,tom,1"),
    "unknown split": (3, "images/tom/1.png,tom,1,val,,day"),
    "pid empty": (3, "images/tom/1.png,,1,train,,day"),
    "camid not an integer": (3, "images/tom/1.png,tom,c1,train,,day"),
    "missing image": (3, "images/tom/nope.png,tom,1,train,,day"),
    "absolute path": (3, "/images/tom/1.png,tom,1,train,,day"),
    "captions not JSON": (3, "images/tom/1.png,tom,1,train,A man in red.,day"),
    "duplicate path": (4, "images/tom/1.png,tom,0,train,,day"),
    "no camera in the query": (18, "images/xia/q.png,xia,-1,query,,"),  # rows[16], xia's query
    "query image in the gallery": (19, "images/xia/q.png,xia,1,gallery,,"),  # rows[17], xia's first gallery image
}
HEADERS = {"missing column": "path,pid,split,captions,domain", "unknown column": "path,pid,camid,split,caption",
           "semicolons": "path;pid;camid;split"}
# ... or the JSON Lines line that holds rows[1] (line 2)
JSONL_LINES = {
    "captions a string": lambda r: json.dumps({**r, "captions": "A man in red."}),
    "a blank caption": lambda r: json.dumps({**r, "captions": ["A man.", " "]}),
    "malformed JSON line": lambda r: "{'path': 'images/tom/1.png'}",
    "unknown key": lambda r: json.dumps({**r, "caption": ["A man."]}),
    "missing key": lambda r: json.dumps({k: v for k, v in r.items() if k != "camid"}),
    "pid a float": lambda r: json.dumps({**r, "pid": 1.5}),
}


def _bad_case(tmp_path: Path, case: str):
    """(args, exit status, text of the error line) of one bad input."""
    rows, data = _rows(), tmp_path / "data"
    csv_file, jsonl = _write(tmp_path / "raw" / "mine.csv", rows), _write(tmp_path / "raw" / "mine.jsonl", rows)
    m = f"--manifest={csv_file}"
    usage = {
        "no --manifest": (["manifest", f"--data_dir={data}"], "NAME manifest needs --manifest=FILE.csv"),
        "--manifest for another NAME": (["market1501", m, f"--data_dir={data}"],
                                        "--manifest is for your own dataset (NAME manifest), not market1501"),
        "--manual_dir with a manifest": (["manifest", m, f"--manual_dir={tmp_path}", f"--data_dir={data}"],
                                         "NAME manifest takes no --manual_dir"),
        "--config with a manifest": (["manifest", m, "--config=mine", f"--data_dir={data}"],
                                     "NAME manifest is named with --name, not --config; pass --name=mine"),
        "--name for another NAME": (["cuhk03_np", "--name=mine", f"--data_dir={data}"],
                                    "--name names your own dataset (NAME manifest), not cuhk03_np; drop --name "
                                    "(a builder config is --config)"),
        "a bad --name": (["manifest", m, "--name=My Data", f"--data_dir={data}"],
                         "--name='My Data' is not a dataset name; expected lowercase letters, digits and _, "
                         "starting with a letter, at most 64 characters (e.g. --name=my_data)"),
    }
    if case in usage:
        return usage[case][0], 2, usage[case][1]
    if case == "a stem that is no name":  # the default name: a usage error too, fixed by --name
        stem = tmp_path / "raw" / "2024-people.csv"
        stem.write_bytes(csv_file.read_bytes())
        return (["manifest", f"--manifest={stem}", f"--data_dir={data}"], 2,
                f"--name='2024-people' is not a dataset name; expected lowercase letters, digits and _, starting "
                f"with a letter, at most 64 characters (e.g. --name=my_data) (the default, the stem of "
                f"--manifest={stem})")
    file = {"wrong extension": tmp_path / "raw" / "mine.txt",
            "missing manifest": tmp_path / "raw" / "nowhere.csv"}.get(case, csv_file)
    text = {
        "wrong extension": "expected a .csv or .jsonl file (the suffix picks the format), found '.txt'",
        "missing manifest": f"--manifest={file} is missing",
        "empty manifest": f"{csv_file}: no rows; expected one row per image",
        "not UTF-8": f"{csv_file}: not UTF-8 text",
        "missing column": f"{csv_file}:1: missing column 'camid'; the header names the columns path,pid,camid,split "
                          f"and optionally captions and domain (found path,pid,split,captions,domain)",
        "unknown column": f"{csv_file}:1: unknown column 'caption'",
        "semicolons": f"{csv_file}:1: the header is one column 'path;pid;camid;split'",
        "a short row": f"{csv_file}:3: 3 fields, but the header names 6 columns",
        "unknown split": f"{csv_file}:3: column 'split': 'val'; expected one of train, query, gallery, test",
        "pid empty": f"{csv_file}:3: column 'pid': ''; expected the identity: an integer or a non-empty label",
        "camid not an integer": f"{csv_file}:3: column 'camid': 'c1'; expected the camera: an integer >= 0, or -1",
        "no camera in the query": f"{csv_file}:18: column 'camid': -1 (no camera) in the query split",
        "missing image": f"{csv_file}:3: column 'path': image images/tom/nope.png not found (looked for "
                         f"{tmp_path / 'raw' / 'images/tom/nope.png'}; paths are relative to the manifest's folder)",
        "absolute path": f"{csv_file}:3: column 'path': '/images/tom/1.png' is absolute",
        "corrupt image": "images/tom/1.png: corrupt or truncated image",
        "duplicate path": f"{csv_file}:4: column 'path': images/tom/1.png is listed again in the train split "
                          f"(first at line 3)",
        "query image in the gallery": f"{csv_file}:19: column 'path': images/xia/q.png is in both the query (line 18)"
                                      f" and the gallery split",
        "captions not JSON": f"{csv_file}:3: column 'captions': 'A man in red.' is not JSON; expected a JSON list of "
                             f"captions in the cell",
        "captions a string": f"{jsonl}:2: column 'captions': 'A man in red.' is not a list of strings",
        "a blank caption": f"{jsonl}:2: column 'captions': caption 1 is empty (' ')",
        "malformed JSON line": f"{jsonl}:2:2: malformed JSON",
        "unknown key": f"{jsonl}:2: unknown key 'caption'",
        "missing key": f"{jsonl}:2: column 'camid' is missing",
        "pid a float": f"{jsonl}:2: column 'pid': 1.5; expected the identity",
        "query without gallery": f"{csv_file}: 3 query rows but no gallery rows",
        "no query has a match": f"{csv_file}: none of the 3 queries has a gallery image of its identity from another "
                                f"camera",
    }[case]
    if case == "wrong extension":
        file.write_bytes(csv_file.read_bytes())
    elif case == "empty manifest":
        _lines(csv_file, lambda lines: lines[:1])
    elif case == "not UTF-8":
        csv_file.write_bytes(csv_file.read_bytes() + "images/tom/0.png,caf\xe9,0,train,,\n".encode("latin-1"))
    elif case in HEADERS:
        _lines(csv_file, lambda lines: [HEADERS[case], *lines[1:]])
    elif case in CSV_LINES:
        number, line = CSV_LINES[case]
        _lines(csv_file, lambda lines: [*lines[:number - 1], line, *lines[number:]])
    elif case in JSONL_LINES:
        file = jsonl
        _lines(jsonl, lambda lines: [lines[0], JSONL_LINES[case](rows[1]), *lines[2:]])
    elif case == "corrupt image":
        (tmp_path / "raw" / "images/tom/1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif case == "query without gallery":
        _write(csv_file, [r for r in rows if r["split"] != "gallery"])
    elif case == "no query has a match":  # every gallery image from camera 0, as every query
        _write(csv_file, [r for r in rows if not (r["split"] == "gallery" and r["camid"] == 1)])
    return ["manifest", f"--manifest={file}", f"--data_dir={data}"], 1, text


BAD_INPUTS = ["no --manifest", "--manifest for another NAME", "--manual_dir with a manifest",
              "--config with a manifest", "--name for another NAME", "a bad --name", "a stem that is no name",
              "wrong extension", "missing manifest", "empty manifest", "not UTF-8", "missing column", "unknown column",
              "semicolons", "a short row", "unknown split", "pid empty", "camid not an integer",
              "no camera in the query", "missing image", "absolute path", "corrupt image", "duplicate path",
              "query image in the gallery", "captions not JSON", "captions a string", "a blank caption",
              "malformed JSON line", "unknown key", "missing key", "pid a float", "query without gallery",
              "no query has a match"]
ROW_PROBLEMS = BAD_INPUTS[BAD_INPUTS.index("a short row"):BAD_INPUTS.index("query without gallery")]


# Through the command: each kind of failure (a bad command line, a bad file, a bad row, a bad image, a bad whole)
CLI_CASES = ["no --manifest", "--manifest for another NAME", "--manual_dir with a manifest",
             "--config with a manifest", "--name for another NAME", "a bad --name", "a stem that is no name",
             "wrong extension", "missing manifest", "empty manifest", "not UTF-8", "missing column", "unknown split",
             "corrupt image", "query without gallery", "no query has a match"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_each_bad_input_is_one_error_line_with_its_exit_status(tmp_path, case):
    args, status, text = _bad_case(tmp_path, case)
    out = _cli(*args)
    assert out.returncode == status, out.stderr
    line = _error_line(out)
    assert text in line, line
    if case in ROW_PROBLEMS:  # a row's problem: --skip_bad would skip it
        assert "pass --skip_bad" in line, line
    assert not (tmp_path / "data" / "manifest" / "mine").exists()


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if c not in CLI_CASES])
def test_every_other_bad_manifest_is_refused_with_its_line_and_column(tmp_path, case):
    """The other cases through `build`, the function the command calls (its errors reach the command's one line
    as the cases above show), each a few milliseconds where a command takes a second."""
    args, status, text = _bad_case(tmp_path, case)
    assert status == 1
    with pytest.raises(UserError) as e:
        build_lib.build("manifest", tmp_path / "data", manifest=args[1].split("=", 1)[1])
    assert text in str(e.value).splitlines()[0], str(e.value)
    assert isinstance(e.value, BadItem) == (case in ROW_PROBLEMS)  # a row's problem: --skip_bad skips it
    if case in ROW_PROBLEMS:
        assert str(e.value).endswith("(pass --skip_bad to skip such rows and count them in the log)")
    assert not (tmp_path / "data" / "manifest" / "mine").exists()


def test_queries_without_a_match_and_training_images_in_evaluation_are_warned_about(tmp_path, caplog):
    rows = _rows()
    rows = _set(rows, 17, camid=0)  # xia's other-camera gallery image moves to camera 0: xia has no match
    rows.append({**rows[0], "split": "test", "captions": ["A man."]})  # a training image in the test split
    manifest = _write(tmp_path / "raw" / "mine.jsonl", rows)
    with caplog.at_level("WARNING"):
        build_lib.build("manifest", tmp_path / "data", manifest=manifest)
    assert "mine.jsonl: 1 of 3 queries have no gallery image of their identity from another camera and count for " \
           "nothing in evaluation (lines 17)" in caplog.text
    assert "mine.jsonl: 1 training images are also in an evaluation split (lines 1)" in caplog.text


def test_a_spec_without_a_name_or_not_built_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="a manifest dataset needs a name"):
        specs.training_set({"name": "manifest", "split": "train", "config": ""}, tmp_path, False)
    with pytest.raises(FileNotFoundError, match=r"dataset manifest/mine is not built under .*; build it with "
                                                r"`python -m reid_jax.data.build manifest --manifest=FILE.csv\|"
                                                r"FILE.jsonl --name=mine --data_dir="):
        specs.training_set({"name": "manifest", "split": "train", "config": "mine"}, tmp_path, True)


# ------------------------------------------------------------------------------------------- in a config
def test_a_config_reads_and_evaluates_a_manifest_dataset(tmp_path):
    """configs/scgi.py's CLIP-ReID baseline (tiny model) with the manifest dataset as its training set and test set: the
    task's training set is the manifest's train rows (a `domains` spec keeps one domain), and its evaluation (what
    `--mode=eval` runs) scores the manifest's query / gallery rows with the numpy Market-1501 metrics of the same
    features."""
    from reid_jax import mesh as mesh_lib
    from reid_jax.eval import image_reid
    from reid_jax.eval.encode import jitted
    from reid_jax.train import scgi

    rows, data = _rows(), tmp_path / "data"
    build_lib.build("manifest", data, manifest=_write(tmp_path / "raw" / "mine.csv", rows))
    module = configs.load("scgi")
    c = configs.tiny_image_reid(module.get_config("ablation_baseline"), data)  # no CGI / CFF heads: a faster init
    c.data.auto_build = False
    c.data.train = module._dataset("manifest", "train", "mine", label="mine")
    c.eval.datasets = [module._test_set("manifest", "mine", label="mine")]
    want = _expected(rows, "mine")

    (tmp_path / "run").mkdir()
    task = scgi.Task(c, tmp_path / "run")
    assert (task.num_classes, task.total_steps) == (4, 1)  # 4 identities x 4 images: one 4 x 4 batch
    assert sorted(zip(task.index.pids.tolist(), task.index.camids.tolist())) == sorted(
        (pid, cam) for pid, cam, *_ in want["train"].values())
    _, night = specs.evaluation_set({**c.data.train.to_dict(), "domains": ["night"]}, "train", data, False)
    assert len(night) == 8 and set(night.domains.tolist()) == {"night"}

    model, mesh = task.init_state().model, mesh_lib.make_mesh(c.mesh)
    results = task.evaluate(model, 0, tmp_path / "run", mesh)
    encode = jitted(model, lambda m, b: m.image_features(b["image"], b["camid"] if task.num_cameras else None))
    q, g = (image_reid.encode_split(c, c.eval.datasets[0], split, data, encode, mesh) for split in ("query", "gallery"))
    for got, split in ((q, "query"), (g, "gallery")):
        assert sorted(zip(got["pid"].tolist(), got["camid"].tolist())) == sorted(
            (pid, cam) for pid, cam, *_ in want[split].values())
    reference = test_evaluate._reference(q["feats"], q["pid"], q["camid"], g["feats"], g["pid"], g["camid"], 10)
    for key in logged_metrics.KEYS:
        assert_close(results[f"eval/mine/{key}"], reference[key], test_evaluate.PERCENT, key, scale=100)
    assert (tmp_path / "run" / "retrieval_mine_0.png").exists()
