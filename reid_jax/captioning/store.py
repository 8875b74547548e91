"""Append-only JSONL outputs that survive crashes: what is done, a torn last line, batched flushing, one writer.

Only whole lines are ever appended, in one `write` per batch, by one thread; so after a crash (even SIGKILL)
the file is every line flushed before it plus, at worst, one torn last line. `open_output` cuts that torn tail
(its image is simply done again) and returns the images already done, which a restarted run skips: every image
ends up in the file exactly once. An advisory lock (flock, released by the kernel when the process dies) stops
two runs from writing the same file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path

from absl import logging

from reid_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class FlushConfig:
    every: int = 32  # lines: at most this many done answers are lost to a crash
    seconds: float = 2.0  # ... or this much time, whichever comes first
    fsync: bool = False  # also survive a power cut (slower; a process crash is survived without it)


class OutputError(UserError, ValueError):
    """An output file that this tool cannot safely append to; the message names the file and line."""


def repair_tail(path: Path) -> int:
    """Cuts a torn (newline-less) last line off `path`; returns the number of bytes removed."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        block, end = 1 << 16, size
        while end > 0:  # find the last newline, reading backwards
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        f.truncate(keep)
        return size - keep


def done_keys(path: Path, key: str = "image") -> set[str]:
    """The `key` of every line of a repaired JSONL file; a malformed complete line is an error (file:line)."""
    keys = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[key]
            except (ValueError, KeyError, TypeError):
                value = None
            if isinstance(value, str):
                keys.add(value)
            else:
                raise OutputError(f"{path}:{lineno}: expected a JSON object with a string {key!r} (a line this "
                                  f"tool wrote); found {line.strip()[:200]!r}. This file was not written by this "
                                  "tool or was edited: fix or delete the line, or choose another --out")
    return keys


def logged_keys(path: Path, key: str = "image") -> set[str]:
    """Like done_keys for a log (the failure record): tolerant, malformed lines are ignored."""
    keys = set()
    if not path.exists():
        return keys
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                keys.add(json.loads(line)[key])
            except (ValueError, KeyError, TypeError):
                continue
    return keys


class JsonlWriter:
    """Appends records as lines, in batches (see FlushConfig). Holds the file's lock until closed."""

    def __init__(self, path: Path, cfg: FlushConfig = FlushConfig()):
        self.path, self.cfg = path, cfg
        if path.exists() and not path.is_file():  # opening a FIFO to append would block until a reader comes
            raise OutputError(f"{path}: exists and is not a regular file; expected a JSONL file (or a new path): "
                              "choose another --out")
        try:
            self._f = open(path, "a", encoding="utf-8", newline="\n")
        except OSError as e:
            raise OutputError(f"{path}: cannot be written ({e.strerror}); choose an --out in a folder you can write "
                              "to") from None
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise OutputError(f"{path}: another run is writing this file (it holds its lock); wait for it to "
                              "finish or stop it, or choose another --out") from None
        self._pending: list[str] = []
        self._last = time.monotonic()

    def write(self, record: dict) -> None:
        self._pending.append(json.dumps(record, ensure_ascii=False) + "\n")
        if len(self._pending) >= self.cfg.every:
            self.flush()
        else:
            self.tick()

    def tick(self) -> None:
        """Flushes if the oldest unflushed line has waited `seconds` (call it while waiting for answers)."""
        if self._pending and time.monotonic() - self._last >= self.cfg.seconds:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._f.write("".join(self._pending))  # one write per batch: only the last line can tear
            self._pending.clear()
        self._f.flush()
        if self.cfg.fsync:
            os.fsync(self._f.fileno())
        self._last = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()  # closing releases the lock


def open_output(path: str | Path, cfg: FlushConfig = FlushConfig()) -> tuple[JsonlWriter, set[str]]:
    """(writer appending to `path`, images already in it). Repairs a torn tail first, under the lock."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create its folder ({e.strerror}); choose an --out in a folder you can "
                          "write to") from None
    writer = JsonlWriter(path, cfg)  # lock before repairing: never cut a line another run is writing
    try:
        cut = repair_tail(path)
        if cut:
            logging.warning("%s: removed a torn last line (%d bytes, from an interrupted run); that image will be "
                            "done again", path, cut)
        return writer, done_keys(path)
    except Exception:
        writer.close()
        raise
