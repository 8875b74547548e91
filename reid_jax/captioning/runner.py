"""The crash-safe loop shared by `caption` and `ground`: every image under a folder answered exactly once.

  list images (sorted) -> drop those already in the output -> jobs of `batch` images -> a thread pool of
  `concurrency` workers (at most 2 x concurrency jobs in flight) -> results written by this thread only,
  as whole JSONL lines, flushed in small batches (store.py)

An image that fails for good (retries exhausted, or a rejected request) goes to `<out>.failed` (a log, one JSON
line per failure; not read by the dataset builders, whose caption files end in .json/.jsonl) and is tried again
by the next run unless `skip_failed`. `abort_after` consecutive failed images stop the run: that is a server
that is down or misconfigured, not bad images, and marking a million images failed would help no one.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import tqdm
from absl import logging

from reid_jax.captioning import store

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    concurrency: int = 8  # requests in flight (worker threads)
    abort_after: int = 50  # consecutive failed images that stop the run (0 = never)
    skip_failed: bool = False  # skip images a previous run logged as failed (default: try them again)
    limit: int = 0  # answer at most this many new images (0 = all): a trial run
    log_seconds: float = 30.0  # progress line period when stderr is not a terminal (no progress bar)


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


class RunAborted(RuntimeError):
    pass


def list_images(root: str | Path) -> list[str]:
    """Image paths under `root`, relative, POSIX, sorted (the keys of the output lines)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: no such folder; expected a folder of images "
                                f"({', '.join(IMAGE_EXTENSIONS)}), searched recursively")
    keys = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(folder).relative_to(root)
        keys += [(rel / f).as_posix() for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not keys:
        raise FileNotFoundError(f"--images {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or below")
    return sorted(keys)


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


class _Progress:
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
    keys = list_images(images)
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
    summary = {"images": len(keys), "already_done": len(keys) - len(new),
               "skipped_failed": len(skip), "todo": len(todo), "succeeded": counts["succeeded"],
               "failed": counts["failed"], **{k: v for k, v in sorted(stats.counts.items())},
               "elapsed_s": round(elapsed, 3),
               "ms_per_image": round(1000 * elapsed / max(1, counts["succeeded"] + counts["failed"]), 3)}
    return summary


def _loop(todo: list[str], job, writer: store.JsonlWriter, fail_writer: store.JsonlWriter, cfg: RunConfig,
          batch: int, desc: str) -> collections.Counter:
    counts, streak = collections.Counter(), 0
    progress = _Progress(len(todo), desc, cfg.log_seconds)
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
