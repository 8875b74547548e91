"""`python -m reid_jax.bench gpu_report`: the plan runner (rows collected per entry, the budget, killed entries) on
this CPU, with small settings of the real benches."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from reid_jax import gpu_report
from reid_jax.gpu_report import Entry

ATTENTION = ("attention", "--batch=1", "--tokens=5", "--heads=1", "--head-dim=8", "--repeats=1", "--dtype=float32")
STEP = ("train_step", "--model=tiny", "--batch=2", "--steps=1", "--image-size=64,32")


def test_plan_rows_logs_and_summary(tmp_path):
    plan = [Entry("attention_tiny", ATTENTION, 1), Entry("step_tiny", STEP, 1),
            Entry("too_long", ("attention",), 10_000)]
    rows = gpu_report.run_plan(plan, tmp_path, budget_s=600)
    assert [(r["entry"], r["bench"]) for r in rows] == [("attention_tiny", "attention"), ("attention_tiny", "attention"),
                                                        ("step_tiny", "train_step")]
    xla, cudnn, step = rows
    assert xla["implementation"] == "xla" and xla["tokens"] == 5 and xla["padded_to"] == 6
    assert cudnn["implementation"] == "cudnn" and "error" in cudnn  # no cuDNN on a CPU: a row saying so
    assert step["model"] == "tiny" and step["batch"] == 2 and step["mfu"] is None
    np.testing.assert_allclose(step["pairs_per_s"], 2 / (step["step_ms"] / 1e3), rtol=0.05)  # both rounded
    assert [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()] == rows
    log = (tmp_path / "log.txt").read_text()
    assert "## attention_tiny: exit 0" in log and "## step_tiny: exit 0" in log
    assert "## too_long: skipped" in log and "estimate 10000 s" in log
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# GPU report: cpu\n")
    assert f"| step_tiny | ours | 2 | xla | {step['step_ms']} | {step['pairs_per_s']} |" in summary
    assert "| attention_tiny | cudnn | 5 (6) |" in summary and "cuDNN" in summary
    assert "## The pipeline feeding the step" not in summary  # no `train` row: no table


def test_every_entry_of_the_gpu_plan_is_a_valid_bench_command():
    from reid_jax import bench

    plan = gpu_report.gpu_plan("/data", workers=12)
    assert len({e.name for e in plan}) == len(plan)
    for entry in plan:  # a typo here would cost a lent GPU's minutes, not a test's
        args = bench.parser().parse_args(list(entry.argv))
        assert args.bench == entry.argv[0], entry
    assert sum(e.estimate_s for e in plan[:4]) < 540  # the default budget reaches the step at batch 256


def test_summary_of_the_pipeline_row():
    row = {"entry": "train_b64", "bench": "train", "batch": 64, "workers": 12, "pairs_per_s": 1800.0,
           "step_only_pairs_per_s": 2000.0, "input_wait_ms": 1.5, "host_cores": 9.1, "device": "NVIDIA H200"}
    summary = gpu_report.summary([row])
    assert summary.startswith("# GPU report: NVIDIA H200\n")
    assert "| train_b64 | 64 | 12 | 1800.0 | 2000.0 | 0.90 | 1.5 | 9.1 |" in summary


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_an_entry_past_the_budget_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w').write(" \
             f"str(p.pid)); print('{{\"bench\": \"partial\"}}', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    text, status = gpu_report._run([sys.executable, "-c", script], timeout_s=3)
    assert status == "stopped at the budget" and time.monotonic() - t0 < 30
    assert gpu_report._json_rows(text) == [{"bench": "partial"}]  # what it printed before the kill is kept
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the entry's child outlived the kill")


def test_unknown_entry_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "reid_jax.bench", "gpu_report", f"--out={tmp_path}",
                           f"--data_dir={tmp_path}", "--only", "step_b64", "step_b512"],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode != 0
    assert "--only: no plan entry named ['step_b512']" in done.stderr and "step_b64" in done.stderr
    assert not (tmp_path / "summary.md").exists()
