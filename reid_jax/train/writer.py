"""Metrics out: `WORKDIR/metrics.jsonl` (one JSON object per line) and TensorBoard events (tensorboardX).

Only process 0 writes. On resume, records past the restored step (written after the last checkpoint of the
interrupted run) are dropped so the log reads as one run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax


class MetricWriter:
    def __init__(self, workdir: Path, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
        self.file = open(self.path, "a")

    def _truncate(self, step: int) -> None:
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, float) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
