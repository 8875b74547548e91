"""Files and folders written whole or not at all: into a temporary beside the target, then renamed over it.

A rename within one folder is atomic, so a reader (or a run resumed after a kill) sees the old file or the new
one, never a half-written one. The temporary is hidden (`.NAME.tmp-<pid>SUFFIX`), named per process so that two
writers never share one, and keeps the target's suffix, because some writers choose the format by it
(`np.savez` appends '.npz' to any other name, PIL picks the image format).

An output folder DST (a conversion, an export) goes the same way, in three steps:

    dst = resolved_output(flag_value, "--out", "the export folder", MyError)
    if restored := clean_leftovers(dst, is_whole):  # what killed runs left beside DST
        warn(...)
    ...check that DST may be replaced...
    with staged_folder(dst, lambda e: MyError(...)) as tmp:  # `.DST.tmp-<pid>-<hex>`, beside DST
        ...write into tmp...
        publish_folder(tmp, dst)  # swapped in whole

The pid in the temporary's name lets a later run tell the leftovers of a killed run (dead pid) from those of a
run still going; `clean_leftovers` removes the former, and puts back an old DST that a kill left outside DST.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from reid_jax.errors import expand_path


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Calls `write(tmp)` and renames tmp to `path`; a failed write leaves `path` as it was and no temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's own error is the one to report
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """`text` as UTF-8 to `path`, atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------- output folders
# `.DST.tmp-<pid>-<hex>`: a folder being written; `.DST.old-<pid>-<hex>`: the old DST between the two renames of
# `publish_folder`'s fallback (`.DST.old-<pid>`: the name earlier versions used).
_LEFTOVER = r"\.(tmp|old)-(\d+)(?:-[0-9a-f]+)?"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def resolved_output(path, flag: str, expected: str, error: type[Exception]) -> Path:
    """The output folder `path` (`~` and `$VARS` expanded) as an absolute path; a symlink is followed, so the
    output replaces what it points to, not it. An empty or unresolvable path raises `error`, naming `flag`
    ('DST', '--out') and what was `expected` ('the output folder')."""
    expanded = expand_path(path)
    if expanded is None:
        raise error(f"{flag} is empty; expected the path of {expected}")
    try:
        return expanded.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise error(f"{flag} {expanded}: cannot be resolved ({e}); choose another path") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def clean_leftovers(dst: Path, is_whole: Callable[[Path], bool]) -> Path | None:
    """Removes what killed runs left beside `dst` (folders of dead pids; a live run's stay). An old folder a kill
    left outside an absent `dst` goes back to `dst` if `is_whole` says it is complete; returns where it was (for
    the caller to warn about), else None."""
    if not dst.parent.is_dir():
        return None
    restored = None
    pattern = re.compile(re.escape(f".{dst.name}") + _LEFTOVER)
    for entry in sorted(dst.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir() or _alive(int(m[2])):
            continue
        if m[1] == "old" and not dst.exists() and is_whole(entry):
            entry.rename(dst)  # killed between the two renames of `publish_folder`'s fallback: the old one is whole
            restored = entry
        else:
            shutil.rmtree(entry, ignore_errors=True)
    return restored


@contextlib.contextmanager
def staged_folder(dst: Path, cannot_create: Callable[[OSError], Exception]) -> Iterator[Path]:
    """Creates `dst`'s missing parents and an empty temporary folder beside it, and yields the temporary; on any
    failure inside, removes it and the parents it created. Where they cannot be created, raises
    `cannot_create(the OSError)` with nothing left behind."""
    created: list[Path] = []
    try:
        created = _make_parents(dst)
        tmp = _make_temp(dst)
    except OSError as e:
        _remove_created(created)
        raise cannot_create(e) from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _make_parents(dst: Path) -> list[Path]:
    """Creates DST's missing parent folders; returns those created (outermost first), to undo on failure."""
    missing, folder = [], dst.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir()
    return missing[::-1]


def _make_temp(dst: Path) -> Path:
    while True:
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()  # mode 0o777 & ~umask, as mkdir(1) (tempfile.mkdtemp's 0o700 would hide it from the group)
            return tmp
        except FileExistsError:
            continue


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass


def exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or file system lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another libc
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_folder(tmp: Path, dst: Path) -> None:
    """Moves the complete folder `tmp` to `dst`. A kill at any instant leaves the old or the new one at `dst`:
    the swap is one atomic exchange where the OS has it; otherwise two renames, and should a kill fall between
    them, the next run puts the old folder back (`clean_leftovers`)."""
    if not dst.exists():
        tmp.rename(dst)
    elif exchange(tmp, dst):
        shutil.rmtree(tmp)  # it now holds the old folder
    else:
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        dst.rename(old)
        try:
            tmp.rename(dst)
        except BaseException:
            old.rename(dst)
            raise
        shutil.rmtree(old)
