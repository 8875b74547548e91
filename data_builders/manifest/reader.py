"""A manifest file read and checked: one row per image, in CSV or JSON Lines (no TFDS here).

`read(file)` returns the rows that pass every check and, apart, a `BadItem` per row that does not, each naming the
file, the line and the column; a problem of the file as a whole (its name, encoding, CSV header, no rows at all)
raises `UserError`. `check_splits` then looks at the good rows together (query without gallery, queries with no
match), and `fingerprint` says what a build of the manifest was made from. The format is `FORMAT` below.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import posixpath
import re
from pathlib import Path

from data_builders.common import BadItem
from data_builders.prepared import file_digest
from reid_jax.errors import UserError

REQUIRED = ("path", "pid", "camid", "split")
OPTIONAL = ("captions", "domain")
COLUMNS = REQUIRED + OPTIONAL
SPLITS = ("train", "query", "gallery", "test")
EVAL_SPLITS = ("query", "gallery", "test")
IMAGE_SPLITS = ("query", "gallery")  # image-ReID evaluation: every image needs a camera
SUFFIXES = (".csv", ".jsonl")
NO_CAMERA = -1
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
INTEGER_RE = re.compile(r"[+-]?\d+")
MAX_NAMED = 3  # lines named in a warning about several rows
LABELS_FILE = "pid_labels.json"  # beside a build whose pids are labels: {label: the integer pid it was given}

FORMAT = """\
A manifest lists one image per row, in CSV (a header line naming the columns, then one line per image) or JSON
Lines (one object per line), with the columns
  path      the image, relative to the manifest file's folder (JPEG, PNG or any format PIL reads)
  pid       the identity: an integer, or a label such as "alice" (when any pid is not an integer, every pid is a
            label and the labels are numbered 0, 1, ... in sorted order over the whole manifest)
  camid     the camera, an integer >= 0, or -1 for none (query and gallery images need one)
  split     train, query, gallery or test (test: text-to-image evaluation)
  captions  optional: a list of strings; in CSV a JSON list in one cell, e.g. "[""A man in a red coat.""]"
  domain    optional: the visual domain; empty = the dataset's name
e.g.  path,pid,camid,split,captions
      images/0001_c1_0.jpg,1,0,train,"[""A man in a red coat."", ""He carries a black bag.""]"
or    {"path": "images/0001_c1_0.jpg", "pid": 1, "camid": 0, "split": "train", "captions": ["A man in a red coat."]}"""


@dataclasses.dataclass(frozen=True)
class Row:
    """One good row. `path` is normalised (POSIX, relative to the manifest's folder): the record's file_name."""

    line: int
    path: str
    pid: int | str  # as written: a JSON integer or the text (integer text counts as that integer)
    camid: int
    split: str
    captions: tuple[str, ...] = ()
    domain: str = ""


@dataclasses.dataclass
class Manifest:
    file: Path
    rows: list[Row]  # the rows that pass every check, in file order
    bad: list[BadItem]  # one per other row, in file order
    paths: list[str]  # every image path the manifest names, bad rows included (what a build depends on)
    labels: dict[str, int] | None  # pid label -> integer when the pids are labels; None when all are integers

    @property
    def folder(self) -> Path:
        return self.file.parent

    def pid(self, row: Row) -> int:
        """The record's pid: the row's integer, or its label's number."""
        return int(row.pid) if self.labels is None else self.labels[_label(row.pid)]

    def splits(self) -> dict[str, list[Row]]:
        """{split: its good rows} for the splits that have any, in SPLITS order."""
        by_split = {split: [r for r in self.rows if r.split == split] for split in SPLITS}
        return {split: rows for split, rows in by_split.items() if rows}


# ----------------------------------------------------------------------------------------------- the file
def check_name(name, flag: str = "--name") -> str:
    """A manifest dataset's name (its TFDS config and folder under DATA_DIR/manifest/), checked."""
    if not name:
        raise UserError(f"a manifest dataset needs a name: {flag}=NAME when building, and the same NAME as the "
                        f"dataset spec's config (e.g. config.data.train.config='NAME') when using it")
    if not NAME_RE.fullmatch(str(name)):
        suggestion = re.sub(r"[^a-z0-9_]+", "_", str(name).lower()).strip("_")
        suggestion = suggestion if NAME_RE.fullmatch(suggestion) else "my_data"
        raise UserError(f"{flag}={name!r} is not a dataset name; expected lowercase letters, digits and _, starting "
                        f"with a letter, at most 64 characters (e.g. {flag}={suggestion})")
    return str(name)


def check_file(file: Path) -> Path:
    if file.suffix.lower() not in SUFFIXES:
        raise UserError(f"--manifest={file}: expected a .csv or .jsonl file (the suffix picks the format), found "
                        f"{file.suffix or 'no suffix'!r}")
    if not file.is_file():
        raise UserError(f"--manifest={file} is {'a folder' if file.is_dir() else 'missing'}; expected the manifest "
                        f"file (CSV or JSON Lines, one row per image)")
    return file


def read(file: str | Path) -> Manifest:
    """Reads and checks every row of the manifest (see the module docstring)."""
    file = check_file(Path(file))
    is_csv = file.suffix.lower() == ".csv"
    try:
        records = list(_csv_records(file) if is_csv else _jsonl_records(file))
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not UTF-8 text ({e}); save the manifest as UTF-8") from None
    except OSError as e:
        raise UserError(f"--manifest={file} cannot be read ({e.strerror}); check its permissions") from None
    if not records:
        raise UserError(f"{file}: no rows; expected one row per image with the columns {', '.join(REQUIRED)} "
                        f"(and optionally {', '.join(OPTIONAL)}){' after a header line' if is_csv else ''}")
    rows, bad, paths = [], [], []
    for line, fields in records:
        if isinstance(fields, dict) and isinstance(fields.get("path"), str) and fields["path"].strip():
            paths.append(_normalised(fields["path"]))
        row = fields if isinstance(fields, BadItem) else _row(file, line, fields, cells=is_csv)
        if isinstance(row, BadItem):
            bad.append((line, row))
        else:
            rows.append(row)
    rows, repeats = _without_duplicates(file, rows)
    bad = [item for _, item in sorted(bad + repeats, key=lambda b: b[0])]
    return Manifest(file, rows, bad, paths, _labels(records))


def _csv_records(file: Path):
    """(line, {column: text} | BadItem) per non-blank line after the header; the header is checked here."""
    with open(file, encoding="utf-8-sig", newline="") as f:  # -sig: the byte-order mark spreadsheets write
        reader = csv.reader(f)
        header, end = None, 0
        try:
            for fields in reader:
                line, end = end + 1, reader.line_num  # a quoted field may span lines: a row starts after the last
                if not any(field.strip() for field in fields):
                    continue
                if header is None:
                    header = _header(file, line, [field.strip() for field in fields])
                elif len(fields) != len(header):
                    yield line, BadItem(f"{file}:{line}: {len(fields)} fields, but the header names {len(header)} "
                                        f"columns ({','.join(header)}); quote a value holding a comma")
                else:
                    yield line, {k: v.strip() for k, v in zip(header, fields)}
        except csv.Error as e:
            raise UserError(f"{file}:{reader.line_num}: malformed CSV ({e})") from None


def _header(file: Path, line: int, names: list[str]) -> list[str]:
    expected = f"the header names the columns {','.join(REQUIRED)} and optionally {' and '.join(OPTIONAL)}"
    if len(names) == 1 and any(sep in names[0] for sep in ";\t|"):
        raise UserError(f"{file}:{line}: the header is one column {names[0]!r}; {expected}, separated by commas")
    repeated = sorted({n for n in names if names.count(n) > 1})
    unknown = [n for n in names if n not in COLUMNS]
    missing = [n for n in REQUIRED if n not in names]
    if repeated or unknown or missing:
        problem = (f"column {repeated[0]!r} appears twice" if repeated else
                   f"unknown column {unknown[0]!r}" if unknown else f"missing column {missing[0]!r}")
        raise UserError(f"{file}:{line}: {problem}; {expected} (found {','.join(names)})")
    return names


def _jsonl_records(file: Path):
    """(line, {key: value} | BadItem) per non-blank line."""
    with open(file, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield line, BadItem(f"{file}:{line}:{e.colno}: malformed JSON ({e.msg}); expected one object per "
                                    f"line with the keys {', '.join(REQUIRED)} (and optionally {', '.join(OPTIONAL)})")
                continue
            unknown = [k for k in obj if k not in COLUMNS] if isinstance(obj, dict) else []
            if not isinstance(obj, dict):
                yield line, BadItem(f"{file}:{line}: expected a JSON object with the keys {', '.join(REQUIRED)}; "
                                    f"found {type(obj).__name__}")
            elif unknown:
                yield line, BadItem(f"{file}:{line}: unknown key {unknown[0]!r}; expected the keys "
                                    f"{', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)}")
            else:
                yield line, obj


# ------------------------------------------------------------------------------------------------ one row
def _row(file: Path, line: int, fields: dict, cells: bool) -> Row | BadItem:
    """The row's values checked in column order; the first problem is the row's BadItem. `cells`: the values are
    CSV text (captions a JSON list in the cell)."""
    where = f"{file}:{line}"
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        return BadItem(f"{where}: column {missing[0]!r} is missing; every row has {', '.join(REQUIRED)}")
    checks = (("path", _path), ("pid", _pid), ("camid", _camid), ("split", _split),
              ("captions", _cell_captions if cells else _captions), ("domain", _domain))
    values = {}
    for column, check in checks:
        value, problem = check(fields.get(column))
        if problem:
            return BadItem(f"{where}: column {column!r}: {problem}")
        values[column] = value
    if values["split"] in IMAGE_SPLITS and values["camid"] == NO_CAMERA:
        return BadItem(f"{where}: column 'camid': -1 (no camera) in the {values['split']} split; image-ReID "
                       f"evaluation needs the camera (>= 0) of every query and gallery image")
    image = file.parent / values["path"]
    if not image.is_file():
        state = "is a folder" if image.is_dir() else "not found"
        return BadItem(f"{where}: column 'path': image {values['path']} {state} (looked for {image}; paths are "
                       f"relative to the manifest's folder)")
    return Row(line, **values)


def _normalised(text: str) -> str:
    return posixpath.normpath(text.strip())


def _path(value):
    if not isinstance(value, str) or not value.strip():
        return None, f"{value!r}; expected the image's path relative to the manifest's folder"
    if posixpath.isabs(value.strip()):
        return None, f"{value!r} is absolute; expected a path relative to the manifest's folder"
    return _normalised(value), None


def _integer(value) -> int | None:
    """An integer from a JSON number or integer text; None otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and INTEGER_RE.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _pid(value):
    """A JSON integer or non-empty text (an integer's or a label's), kept as written (text stripped)."""
    if _integer(value) is not None:
        return (value.strip() if isinstance(value, str) else value), None
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    return None, f"{value!r}; expected the identity: an integer or a non-empty label"


def _label(pid: int | str) -> str:
    return pid if isinstance(pid, str) else str(pid)


def _camid(value):
    number = _integer(value)
    if number is None or number < NO_CAMERA:
        return None, f"{value!r}; expected the camera: an integer >= 0, or -1 for none"
    return number, None


def _split(value):
    if value not in SPLITS:
        return None, f"{value!r}; expected one of {', '.join(SPLITS)}"
    return value, None


def _cell_captions(text: str):
    """A CSV cell: a JSON list of non-blank strings; empty = no captions."""
    expected = "expected a JSON list of captions in the cell, e.g. [\"A man in a red coat.\"]"
    if not text:
        return (), None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None, f"{_short(text)} is not JSON; {expected}"
    return _captions(value, expected)


def _captions(value, expected: str = "expected a list of captions (strings)"):
    """A list of non-blank strings; absent (None) = no captions."""
    if value is None:
        return (), None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        return None, f"{_short(value)} is not a list of strings; {expected}"
    blank = [i for i, c in enumerate(value) if not c.strip()]
    if blank:
        return None, f"caption {blank[0]} is empty ({value[blank[0]]!r}); fix or remove it"
    return tuple(value), None


def _domain(value):
    if value is None:
        return "", None
    if not isinstance(value, str):
        return None, f"{value!r}; expected the domain's name (a string), or nothing for the dataset's name"
    return value.strip(), None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------- rows together
def _without_duplicates(file: Path, rows: list[Row]) -> tuple[list[Row], list[tuple[int, BadItem]]]:
    """Rows minus repeats: an image listed twice in one split, or in both query and gallery (a query would find
    itself); the later row is the bad one. One image in train and test, or in test and query, is allowed."""
    first: dict[tuple[str, str], int] = {}
    kept, bad = [], []
    for row in rows:
        other = "gallery" if row.split == "query" else "query" if row.split == "gallery" else None
        where = f"{file}:{row.line}: column 'path'"
        if (row.split, row.path) in first:
            bad.append((row.line, BadItem(f"{where}: {row.path} is listed again in the {row.split} split (first "
                                          f"at line {first[row.split, row.path]}); list each image once per split")))
        elif other and (other, row.path) in first:
            bad.append((row.line, BadItem(f"{where}: {row.path} is in both the {other} (line "
                                          f"{first[other, row.path]}) and the {row.split} split; a query must not "
                                          f"be in the gallery")))
        else:
            first[row.split, row.path] = row.line
            kept.append(row)
    return kept, bad


def _labels(records) -> dict[str, int] | None:
    """None when every pid is an integer; else {label: integer}: every pid's text (a JSON integer's decimal
    form) numbered in sorted order. Every row's pid counts, bad rows' too: fixing another column of a row keeps
    the numbering."""
    pids = {v for _, f in records if isinstance(f, dict) for v in [_pid(f.get("pid"))[0]] if v is not None}
    if all(_integer(p) is not None for p in pids):
        return None
    return {label: i for i, label in enumerate(sorted({_label(p) for p in pids}))}


def check_splits(m: Manifest) -> list[str]:
    """Problems of the good rows together: a query split without a gallery (or a gallery without queries), or no
    query with a gallery image of its identity from another camera, raise UserError; the returned warnings name
    queries without such a match (evaluation skips them), training images also in an evaluation split, and a test
    split without captions."""
    splits, warnings = m.splits(), []
    if ("query" in splits) != ("gallery" in splits):
        has, lacks = ("query", "gallery") if "query" in splits else ("gallery", "query")
        raise UserError(f"{m.file}: {len(splits[has])} {has} rows but no {lacks} rows; image-ReID evaluation needs "
                        f"both (give the {lacks} images, or list the {has} images as train or test)")
    if "query" in splits:
        cameras: dict[int, set[int]] = {}
        for row in splits["gallery"]:
            cameras.setdefault(m.pid(row), set()).add(row.camid)
        unmatched = [r for r in splits["query"] if not cameras.get(m.pid(r), set()) - {r.camid}]
        if len(unmatched) == len(splits["query"]):
            raise UserError(f"{m.file}: none of the {len(unmatched)} queries has a gallery image of its identity from "
                            f"another camera, so evaluation has nothing to score (same-camera matches do not count)")
        if unmatched:
            warnings.append(f"{m.file}: {len(unmatched)} of {len(splits['query'])} queries have no gallery image of "
                            f"their identity from another camera and count for nothing in evaluation (lines "
                            f"{_lines(unmatched)})")
    evaluated = {r.path for r in m.rows if r.split in EVAL_SPLITS}
    leaked = [r for r in splits.get("train", ()) if r.path in evaluated]
    if leaked:
        warnings.append(f"{m.file}: {len(leaked)} training images are also in an evaluation split (lines "
                        f"{_lines(leaked)})")
    if "test" in splits and not any(r.captions for r in splits["test"]):
        warnings.append(f"{m.file}: the test split has no captions, so text-to-image evaluation has no queries")
    return warnings


def _lines(rows: list[Row]) -> str:
    named = ", ".join(str(r.line) for r in rows[:MAX_NAMED])
    return named + (", ..." if len(rows) > MAX_NAMED else "")


# ---------------------------------------------------------------------------------------------- fingerprint
def fingerprint(m: Manifest) -> dict:
    """What a build of `m` is made from: the manifest's contents (sha256) and every image it names (path, size,
    mtime; a cheap stat, no contents read; a missing one counts as such)."""
    h, files, size = hashlib.sha256(), 0, 0
    for rel in sorted(set(m.paths)):
        try:
            st = os.stat(m.folder / rel)
            entry = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n"
            files, size = files + 1, size + st.st_size
        except OSError:
            entry = f"{rel}\0missing\n"
        h.update(entry.encode("utf-8", "surrogateescape"))
    return {"sha256": file_digest(m.file), "images": {"files": files, "bytes": size, "sha256": h.hexdigest()}}
