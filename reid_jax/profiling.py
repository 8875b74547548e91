"""Where a compiled step spends its time: a per-op breakdown from a JAX profiler trace.

`op_times(run, hlo_text, steps)` traces `steps` calls of `run()` with `jax.profiler.trace`, reads the Perfetto
JSON the profiler writes next to its XPlane file, and sums the duration of every executed HLO instruction (GPU
kernels, tagged with their `hlo_op`; on CPU, the thunks the runtime's worker threads run) per step. The compiled
module's text names each instruction's opcode, shape and the JAX operation it came from (`metadata op_name`), so
the rows say what an op is, e.g. `jit(step)/transpose(jvp())/dot_general` for a product of the backward pass.

On CPU one instruction may run on several threads at once (XLA splits loops over its thread pool): times are busy
time summed over threads, and can add up to more than the step's wall time.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\(")


def instructions(hlo_text: str) -> dict[str, dict]:
    """Compiled HLO text -> {instruction name: {opcode, shape, source}} (source: the JAX op path, if recorded)."""
    out = {}
    for line in hlo_text.splitlines():
        if m := _INSTRUCTION.match(line):
            name, shape, opcode = m.groups()
            kind = re.search(r"kind=(\w+)", line)
            custom = re.search(r'"kind":"(\w+)"', line)
            source = re.search(r'op_name="([^"]*)"', line)
            out[name] = {"opcode": custom.group(1) if custom else (kind.group(1) if kind else opcode),
                         "shape": shape, "source": source.group(1) if source else ""}
    return out


def _events(trace_dir: Path) -> list[dict]:
    files = sorted(trace_dir.glob("**/*perfetto_trace.json.gz")) or sorted(trace_dir.glob("**/*.trace.json.gz"))
    if not files:
        raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
    data = json.loads(gzip.decompress(files[-1].read_bytes()))
    return data["traceEvents"] if isinstance(data, dict) else data


def op_times(run, hlo_text: str, steps: int = 2) -> list[dict]:
    """Trace `steps` calls of `run()` (each blocking until done) -> rows {op, ms_per_step, opcode, shape, source},
    longest first."""
    known = instructions(hlo_text)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        events = _events(Path(tmp))
    totals = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = (e.get("args") or {}).get("hlo_op") or e.get("name", "")
        if name in known:  # an executed instruction; runtime spans (dispatch, waits) carry other names
            totals[name] += float(e.get("dur", 0.0)) / 1e3  # microseconds -> ms
    rows = [{"op": name, "ms_per_step": ms / steps, **known[name]} for name, ms in totals.items()]
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def category(row: dict) -> str:
    """A coarse class of an op for the summary: the JAX primitive it came from (dot_general, conv, exp, ...), else
    its HLO opcode."""
    source = row["source"].rsplit("/", 1)[-1]
    return re.sub(r"\W.*", "", source) or row["opcode"]


def summary(rows: list[dict]) -> list[tuple[str, float, int]]:
    """(category, ms per step, number of ops), longest first."""
    ms, count = collections.Counter(), collections.Counter()
    for r in rows:
        ms[category(r)] += r["ms_per_step"]
        count[category(r)] += 1
    return [(c, t, count[c]) for c, t in ms.most_common()]
