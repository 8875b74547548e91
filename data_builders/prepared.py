"""Where a build lands: a record of what it was built from, reuse or rebuild, and an atomic swap into place.

A finished build's TFDS version folder (`DATA_DIR/NAME[/CONFIG]/VERSION`) holds `reid_jax_build.json`: a
fingerprint of its inputs (every file of the manual folder by relative path, size and mtime; --skip_bad; the
contents of the --part_boxes and --captions files). The record lives inside the folder so that it moves with
the data it describes: no instant shows a dataset with another build's record.

A rebuild never touches the existing build until the new one is complete: TFDS writes into a staging folder
`DATA_DIR/NAME/.building-HOST-PID/`, the record is added, and the finished version folder is swapped with the old
one in one atomic exchange (Linux renameat2; elsewhere two renames, undone by the next build if killed between
them). A build killed at any instant leaves the previous dataset readable and, at most, a staging folder that
the next build on this host removes.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

from reid_jax.files import write_text_atomically

RECORD = "reid_jax_build.json"
STAGING_PREFIX = ".building-"
FORMAT = 1  # of the record; a record of another format counts as changed inputs


# ------------------------------------------------------------------------------------------------ fingerprint
def folder_digest(folder: Path, exclude: Path | None = None) -> dict:
    """{"files", "bytes", "sha256"} over every file under `folder` (relative path, size, mtime): a cheap stat
    walk, no contents read. Symlinked folders are followed once; `exclude` (the data dir, if inside) is skipped."""
    h, files, size = hashlib.sha256(), 0, 0
    seen, skip = set(), exclude.resolve() if exclude else None
    for top, dirs, names in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen or (skip and Path(top).resolve() == skip):
            dirs[:] = []  # a symlink loop, or the build's own output
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(top, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling symlink: its name is still part of the tree
                st = os.lstat(path)
            rel = os.path.relpath(path, folder)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            files, size = files + 1, size + st.st_size
    return {"files": files, "bytes": size, "sha256": h.hexdigest()}


def file_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record(manual_dir: Path | None, skip_bad: bool, part_boxes: Path | None, captions: Path | None,
           exclude: Path | None = None) -> dict:
    """What a build is made from: "inputs" decide reuse; "paths" are for the reader."""
    return {"format": FORMAT,
            "inputs": {"manual_dir": folder_digest(manual_dir, exclude) if manual_dir else None,
                       "skip_bad": bool(skip_bad), "part_boxes": file_digest(part_boxes),
                       "captions": file_digest(captions)},
            "paths": {"manual_dir": _str(manual_dir), "part_boxes": _str(part_boxes), "captions": _str(captions)}}


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def read_record(version_dir: Path) -> dict | None:
    """The record of the build in `version_dir`, or None (built before records existed, or unreadable)."""
    try:
        return json.loads((version_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def changes(old: dict | None, new: dict) -> list[str]:
    """Why the build `old` describes is not the one `new` asks for; [] when it is."""
    if old is None or old.get("format") != FORMAT:
        return ["the existing build has no record of what it was built from"]
    was, now, why = old.get("inputs", {}), new["inputs"], []
    if was.get("manual_dir") != now["manual_dir"]:
        why.append(_folder_change(was.get("manual_dir"), now["manual_dir"]))
    if was.get("skip_bad") != now["skip_bad"]:
        why.append(f"--skip_bad was {was.get('skip_bad')}, now {now['skip_bad']}")
    for flag in ("part_boxes", "captions"):
        if was.get(flag) != now[flag]:
            why.append(f"the --{flag} file changed" if was.get(flag) and now[flag] else
                       f"--{flag} was {'given' if was.get(flag) else 'not given'}, now "
                       f"{'given' if now[flag] else 'not given'}")
    return why


def _folder_change(was: dict | None, now: dict | None) -> str:
    if not was or not now:
        return "the manual folder changed"
    if (was["files"], was["bytes"]) == (now["files"], now["bytes"]):
        return f"the manual folder changed: same {now['files']} files and size, names or mtimes differ"
    return (f"the manual folder changed: {was['files']} files, {was['bytes']} bytes -> {now['files']} files, "
            f"{now['bytes']} bytes")


def write_record(version_dir: Path, rec: dict) -> None:
    """Written under a temporary name and renamed, so the record is never half-written."""
    write_text_atomically(version_dir / RECORD, json.dumps(rec, indent=1, sort_keys=True) + "\n")


# -------------------------------------------------------------------------------------------- staging, swap
def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def new_staging(dataset_dir: Path) -> Path:
    """A fresh staging folder for this process under DATA_DIR/NAME (same filesystem: renames are atomic)."""
    staging = dataset_dir / f"{STAGING_PREFIX}{_host()}-{os.getpid()}"
    if staging.exists():  # a leftover of an earlier process that had our pid
        remove(staging)
    staging.mkdir(parents=True)
    return staging


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover(dataset_dir: Path) -> None:
    """Cleans up after builds on this host that were killed: a version folder moved aside by a swap that did not
    finish is put back, then their staging folders are removed. Other hosts' staging folders are left alone."""
    if not dataset_dir.is_dir():
        return
    for staging in dataset_dir.glob(f"{STAGING_PREFIX}*"):
        host, _, pid = staging.name[len(STAGING_PREFIX):].rpartition("-")
        if host != _host() or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        remove(staging)


def remove(staging: Path) -> None:
    """Removes a staging folder, first putting back a version folder a swap moved aside into it and did not
    replace (killed or failed between the two renames of `install`'s fallback)."""
    replaced = staging / "replaced"
    for info in sorted(replaced.glob("**/dataset_info.json")) if replaced.is_dir() else ():
        target = staging.parent / info.parent.relative_to(replaced)
        if not target.exists():
            os.rename(info.parent, target)
    shutil.rmtree(staging, ignore_errors=True)


def install(staged: Path, target: Path, staging: Path) -> None:
    """Puts the finished version folder `staged` at `target`; an existing build there ends up under `staging`
    (for `remove`). No instant shows `target` missing or partly written, save between the two renames of the
    fallback, which `remove` undoes (run by the caller, or by `recover` after a kill)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.rename(staged, target)
    elif not _exchange(staged, target):
        aside = staging / "replaced" / target.relative_to(staging.parent)
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, aside)
        os.rename(staged, target)


AT_FDCWD, RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not Linux/glibc
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # filesystem or kernel without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))
