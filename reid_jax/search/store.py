"""The index folder on disk: a committed generation, batches written since, and the lock.

    OUT/model.json          the model's identity (written once, when the index is created)
    OUT/index.json          the commit point: which generation is current, its row count, the gallery folder
    OUT/g000004/            a generation: features.npy float16 [N, D] (L2-normalised rows, memory-mappable),
                            rows.json ([path, size, mtime_ns] per row), camids.npy int32 [N] (-1 = none given)
    OUT/parts/*.npz         batches encoded since the last commit, one file per batch, each written whole
    OUT/skipped.txt         the files of the last run that could not be read as images, with the reason
    OUT/.lock               held by the one indexing run allowed at a time

Every file is written under a temporary name and renamed, and `index.json` is renamed last, so a run killed at any
instant leaves the last commit intact plus whole batches: the next run keeps both and encodes only the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from reid_jax import files
from reid_jax.errors import UserError

FORMAT = 1
MODEL, INDEX, PARTS, SKIPPED, LOCK = "model.json", "index.json", "parts", "skipped.txt", ".lock"


class IndexError_(UserError):  # noqa: N801 (IndexError is a builtin)
    """A missing, damaged or mismatched index folder."""


@dataclasses.dataclass
class Rows:
    """Index rows: relative paths with the file size and mtime they were encoded from, features, camera ids."""
    paths: list[str]
    sizes: np.ndarray  # int64 [N]
    mtimes: np.ndarray  # int64 [N], ns
    feats: np.ndarray  # float16 [N, D] (a memory map for a committed generation)
    camids: np.ndarray  # int32 [N]

    @classmethod
    def empty(cls, dim: int) -> Rows:
        return cls([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float16),
                   np.zeros(0, np.int32))

    def stat(self, i: int) -> tuple[int, int]:
        return int(self.sizes[i]), int(self.mtimes[i])


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IndexError_(f"{path}: unreadable ({e}); this is not a reid-jax search index, or it is damaged: "
                          f"index the images again into a new --index folder") from e


def write_json(path: Path, value: dict) -> None:
    files.write_text_atomically(path, json.dumps(value, indent=1) + "\n")


def write_text_lines(path: Path, lines: list[str]) -> None:
    files.write_text_atomically(path, "".join(f"{line}\n" for line in lines))


@contextlib.contextmanager
def locked(out: Path):
    """The index folder, held by this process alone for the block (an advisory lock the kernel drops on exit)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise IndexError_(f"--index {out}: another indexing run is writing it; wait for it to finish") from e
        yield


# ------------------------------------------------------------------------------------------------ generations
def current(out: Path) -> dict | None:
    """index.json, or None for an index never committed."""
    return read_json(out / INDEX) if (out / INDEX).exists() else None


def read_generation(out: Path, meta: dict, mmap: bool = True) -> Rows:
    folder = out / meta["generation"]
    rows = read_json(folder / "rows.json")["rows"]
    try:
        feats = np.load(folder / "features.npy", mmap_mode="r" if mmap else None)
        camids = np.load(folder / "camids.npy")
    except (OSError, ValueError) as e:
        raise IndexError_(f"{folder}: features unreadable ({e}); index the images again into a new --index") from e
    if len(feats) != len(rows) or len(camids) != len(rows):
        raise IndexError_(f"{folder}: {len(feats)} features, {len(camids)} camera ids for {len(rows)} paths; the "
                          f"index is damaged: index the images again into a new --index")
    return Rows([r[0] for r in rows], np.array([r[1] for r in rows], np.int64).reshape(-1),
                np.array([r[2] for r in rows], np.int64).reshape(-1), feats, camids)


def commit(out: Path, rows: Rows, meta: dict) -> None:
    """Writes `rows` as a new generation, makes it current (index.json renamed last), then removes what it replaces:
    older generations, leftovers of killed runs and the parts (which `rows` already holds)."""
    old = current(out)
    number = 1 + (int(old["generation"][1:]) if old else 0)
    name = f"g{number:06d}"
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.save(tmp / "features.npy", np.ascontiguousarray(rows.feats, np.float16))
    np.save(tmp / "camids.npy", rows.camids.astype(np.int32))
    (tmp / "rows.json").write_text(json.dumps({"rows": [[p, int(s), int(m)] for p, s, m in
                                                        zip(rows.paths, rows.sizes, rows.mtimes)]}))
    shutil.rmtree(out / name, ignore_errors=True)
    os.replace(tmp, out / name)
    write_json(out / INDEX, {**meta, "format": FORMAT, "generation": name, "count": len(rows.paths)})
    for entry in out.iterdir():  # everything but the current generation and the fixed files
        if entry.is_dir() and entry.name != name and (entry.name.startswith(("g", ".g")) or entry.name == PARTS):
            shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- parts
def write_part(out: Path, paths: list[str], stats: list[tuple[int, int]], feats: np.ndarray,
               camids: np.ndarray) -> None:
    """One encoded batch, whole or not at all."""
    (out / PARTS).mkdir(exist_ok=True)
    stats = np.asarray(stats, np.int64).reshape(-1, 2)
    files.write_atomically(out / PARTS / f"{uuid.uuid4().hex}.npz", lambda tmp: np.savez(
        tmp, paths=np.array(paths, dtype=str), sizes=stats[:, 0], mtimes=stats[:, 1],
        feats=np.asarray(feats, np.float16), camids=np.asarray(camids, np.int32)))


def read_parts(out: Path, dim: int) -> Rows:
    """Every whole batch written since the last commit (temporaries of a killed write are ignored)."""
    rows = Rows.empty(dim)
    parts = sorted((out / PARTS).glob("[!.]*.npz")) if (out / PARTS).is_dir() else []
    loaded = []
    for part in parts:
        try:
            with np.load(part) as z:
                loaded.append({k: z[k] for k in ("paths", "sizes", "mtimes", "feats", "camids")})
        except (OSError, ValueError, KeyError):
            part.unlink(missing_ok=True)  # cannot happen with atomic writes; such a batch is encoded again
    if loaded:
        rows = Rows([str(p) for z in loaded for p in z["paths"]],
                    *(np.concatenate([z[k] for z in loaded]) for k in ("sizes", "mtimes", "feats", "camids")))
    return rows


def merge(committed: Rows, parts: Rows, present: dict[str, tuple[int, int]], dim: int) -> Rows:
    """The rows of the files still present and unchanged (path, size and mtime as listed now), one per path,
    sorted by path; a part's row replaces the committed row of the same path."""
    sources = (committed, parts)
    winner: dict[str, tuple[int, int]] = {}
    for s, source in enumerate(sources):
        for i, path in enumerate(source.paths):
            if present.get(path) == source.stat(i):
                winner[path] = (s, i)
    order = sorted(winner)
    pick = np.array([winner[p] for p in order], np.int64).reshape(-1, 2)
    rows = Rows(order, np.empty(len(order), np.int64), np.empty(len(order), np.int64),
                np.empty((len(order), dim), np.float16), np.empty(len(order), np.int32))
    for s, source in enumerate(sources):
        take, idx = pick[:, 0] == s, pick[pick[:, 0] == s, 1]
        for field in ("sizes", "mtimes", "feats", "camids"):
            getattr(rows, field)[take] = getattr(source, field)[idx]
    return rows
