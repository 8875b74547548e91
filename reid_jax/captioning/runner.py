"""The crash-safe loop shared by `caption` and `ground`: every image under a folder answered exactly once.

  list images (sorted) -> drop those already in the output -> jobs of `batch` images -> a thread pool of
  `concurrency` workers (at most 2 x concurrency jobs in flight) -> results written by this thread only,
  as whole JSONL lines, flushed in small batches (store.py)

An image that fails for good (retries exhausted, or a rejected request) goes to `<out>.failed` (a log, one JSON
line per failure; not read by the dataset builders, whose caption files end in .json/.jsonl) and is tried again
by the next run unless `skip_failed`. `abort_after` consecutive failed images stop the run: that is a server
that is down or misconfigured, not bad images, and marking a million images failed would help no one.
`verdict` turns a finished run into the command's exit: a run where nothing succeeded, or more than
`max_failed_fraction` of the images failed, is a failure, so that `caption ... && data.build ...` stops there.
Only regular files are images: a FIFO, socket or device named like an image is skipped (reading it could block
forever), counted and warned about once.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import tqdm
from absl import logging

from reid_jax.captioning import store
from reid_jax.errors import UserError, warn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    concurrency: int = 8  # requests in flight (worker threads)
    abort_after: int = 50  # consecutive failed images that stop the run (0 = never)
    skip_failed: bool = False  # skip images a previous run logged as failed (default: try them again)
    limit: int = 0  # answer at most this many new images (0 = all): a trial run
    log_seconds: float = 30.0  # progress line period when stderr is not a terminal (no progress bar)
    # more failed images than this fraction of those tried makes the run fail (exit 1), as does no success
    # at all; the lines written are kept and a rerun tries the failed images again
    max_failed_fraction: float = 0.05


@dataclasses.dataclass
class Outcome:
    """What one job says about one image: a record to write, or why it failed."""

    image: str
    record: dict | None = None
    error: str | None = None
    answer: str | None = None  # the last answer of a failed image (for the failure log)


class Stats:
    """Thread-safe counters (retries are counted inside the workers)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n


class RunAborted(UserError, RuntimeError):
    """Too many images in a row failed: the server is down or misconfigured."""


class RunFailed(UserError):
    """The run finished but failed: nothing succeeded, or too many images failed."""


class ImagesError(UserError, FileNotFoundError):
    """--images is not a folder of images."""


def check_folder(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ImagesError(f"--images {root}: no such folder; expected a folder of images "
                          f"({', '.join(IMAGE_EXTENSIONS)}), searched recursively")
    return root


def scan_images(root: str | Path) -> tuple[list[str], list[str]]:
    """(image paths under `root`: relative, POSIX, sorted; the image-named entries that are not regular files)."""
    root = check_folder(root)
    keys, others = [], []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(folder).relative_to(root)
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                # a symlink counts as what it points to; a broken one, a FIFO, socket or device is no image
                (keys if os.path.isfile(os.path.join(folder, name)) else others).append((rel / name).as_posix())
    if not keys:
        raise ImagesError(f"--images {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or below")
    return sorted(keys), sorted(others)


def list_images(root: str | Path) -> list[str]:
    """Image paths under `root`, relative, POSIX, sorted (the keys of the output lines)."""
    return scan_images(root)[0]


def read_image(path: Path) -> bytes:
    """The bytes of a regular file; OSError for anything else. O_NONBLOCK: a FIFO put where an image was after
    the folder was listed must fail here, not block the worker forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        return f.read()


def verdict(summary: dict, cfg: RunConfig, out: Path) -> str | None:
    """Why a finished run failed (None: it did not): nothing succeeded, or too many images failed."""
    failed, tried = summary["failed"], summary["succeeded"] + summary["failed"]
    if tried and not summary["succeeded"]:
        why = f"no image succeeded ({tried} tried, all failed)"
    elif failed > cfg.max_failed_fraction * tried:
        why = f"{failed} of {tried} images failed ({failed / tried:.1%}, more than --max-failed-fraction " \
              f"{cfg.max_failed_fraction:g})"
    else:
        return None
    return (f"{why}; the reasons are in {out}.failed. Fix the cause (the server, --model, the images) and "
            f"rerun the same command: the {summary['succeeded']} lines written are kept and the failed images are "
            f"tried again")


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


class Progress:
    """tqdm on a terminal (rate and ETA); a log line every `period` s otherwise (files, job schedulers)."""

    def __init__(self, total: int, desc: str, period: float):
        self.tty = sys.stderr.isatty()
        self.bar = tqdm.tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=not self.tty)
        self.total, self.desc, self.period, self.n = total, desc, period, 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int, failed: int) -> None:
        self.n += n
        self.bar.update(n)
        self.bar.set_postfix(failed=failed, refresh=False)
        now = time.monotonic()
        if not self.tty and now - self.last >= self.period:
            rate = self.n / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate else float("inf")
            logging.info("%s: %d/%d images, %.1f img/s, ETA %.0f s, %d failed", self.desc, self.n, self.total,
                         rate, eta, failed)
            self.last = now

    def close(self) -> None:
        self.bar.close()


def run(images: str | Path, out: str | Path, job: Callable[[list[str]], list[Outcome]], stats: Stats,
        cfg: RunConfig = RunConfig(), flush: store.FlushConfig = store.FlushConfig(), batch: int = 1,
        desc: str = "images") -> dict:
    """Answers every image under `images` not yet in `out` with `job(keys) -> outcomes`; returns the summary."""
    t0 = time.monotonic()
    keys, others = scan_images(images)
    if others:
        warn(f"--images {images}: skipped {len(others)} entries named like images that are not regular files "
             f"(FIFO, socket, device or broken link), e.g. {others[0]}")
    failed_log = Path(f"{out}.failed")
    writer, done = store.open_output(out, flush)
    fail_writer = store.JsonlWriter(failed_log, store.FlushConfig(every=1))
    try:
        new = [k for k in keys if k not in done]  # lines of images no longer in the folder stay, unused
        skip = (store.logged_keys(failed_log) & set(new)) if cfg.skip_failed else set()
        todo = [k for k in new if k not in skip]
        todo = todo[:cfg.limit] if cfg.limit else todo
        logging.info("%s: %d images, %d already done, %d skipped as failed, %d to do", desc, len(keys),
                     len(keys) - len(new), len(skip), len(todo))
        counts = _loop(todo, job, writer, fail_writer, cfg, batch, desc)
    finally:
        writer.close()
        fail_writer.close()
    elapsed = time.monotonic() - t0
    summary = {"images": len(keys), "not_regular": len(others), "already_done": len(keys) - len(new),
               "skipped_failed": len(skip), "todo": len(todo), "succeeded": counts["succeeded"],
               "failed": counts["failed"], **{k: v for k, v in sorted(stats.counts.items())},
               "elapsed_s": round(elapsed, 3),
               "ms_per_image": round(1000 * elapsed / max(1, counts["succeeded"] + counts["failed"]), 3)}
    return summary


def _loop(todo: list[str], job, writer: store.JsonlWriter, fail_writer: store.JsonlWriter, cfg: RunConfig,
          batch: int, desc: str) -> collections.Counter:
    counts, streak = collections.Counter(), 0
    progress = Progress(len(todo), desc, cfg.log_seconds)
    jobs = _chunks(todo, batch)
    pool = cf.ThreadPoolExecutor(max(1, cfg.concurrency), thread_name_prefix="caption")
    in_flight: set[cf.Future] = set()
    try:
        while True:
            while len(in_flight) < 2 * max(1, cfg.concurrency):  # top up: workers never wait for the writer
                keys = next(jobs, None)
                if keys is None:
                    break
                in_flight.add(pool.submit(job, keys))
            if not in_flight:
                break
            finished, in_flight = cf.wait(in_flight, timeout=writer.cfg.seconds, return_when=cf.FIRST_COMPLETED)
            writer.tick()  # a slow server must not hold finished lines back
            for fut in finished:
                for o in fut.result():  # a bug in a job propagates: stop, keep what is written
                    if o.record is not None:
                        writer.write(o.record)
                        counts["succeeded"] += 1
                        streak = 0
                    else:
                        fail_writer.write({"image": o.image, "error": o.error, "answer": o.answer,
                                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                        counts["failed"] += 1
                        streak += 1
                    progress.update(1, counts["failed"])
                if cfg.abort_after and streak >= cfg.abort_after:
                    raise RunAborted(f"{desc}: {streak} images in a row failed (last: {o.error}); stopped. Is the "
                                     f"server up and are --server / --model right? Rerun to resume (failures are "
                                     f"logged in {fail_writer.path} and tried again)")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        progress.close()
    return counts
