"""Files written whole or not at all: into a temporary beside the target, then renamed over it.

A rename within one folder is atomic, so a reader (or a run resumed after a kill) sees the old file or the new
one, never a half-written one. The temporary is hidden (`.NAME.tmp-<pid>SUFFIX`), named per process so that two
writers never share one, and keeps the target's suffix, because some writers choose the format by it
(`np.savez` appends '.npz' to any other name, PIL picks the image format).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


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
