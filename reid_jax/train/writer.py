"""Metrics out: `WORKDIR/metrics.jsonl` (one JSON object per line) and TensorBoard events (tensorboardX).

Only process 0 writes. On resume, records past the restored step (written after the last checkpoint of the
interrupted run) are dropped so the log reads as one run; a last line torn by a kill is dropped too. An
evaluation's record is written once it completed (pictures and best model included), so the steps with an
'eval/...' record are the evaluations that happened (`evaluated_steps`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

from reid_jax import files
from reid_jax.errors import UserError, warn


def read_records(path: Path) -> list[dict]:
    """The JSON records of a metrics.jsonl; a torn last line (a kill mid-write) is left out with a warning."""
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise UserError(f"{path}, line {n}: not a JSON record ({line[:60]!r}); the file was edited or "
                                f"damaged: delete or mend that line, then rerun") from None
            warn(f"{path}: dropping a torn last line ({line[:60]!r}), left by an interrupted write")
    return records


def evaluated_steps(workdir: Path) -> set[int]:
    """Steps whose evaluation completed (they have an 'eval/...' record)."""
    return {r["step"] for r in read_records(Path(workdir) / "metrics.jsonl") if any(k.startswith("eval/") for k in r)}


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
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= step]
        files.write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

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
