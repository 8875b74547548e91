"""`python -m reid_jax.main` killed at any instant: each rerun of the same command finishes the run as if it had
never stopped (same metrics records, bit-identical parameters), SIGTERM saves the step it finished, no process
outlives its run, and bad input gets one line. The runs are real subprocesses on the tiny synthetic set.

Schedule (tests/cli_config.py, evaluation every epoch): 36 steps, 18 per epoch, checkpoints every 4 steps, so the
evaluation at 18 falls between checkpoints 16 and 20 and the final one (36) on a checkpoint step.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from reid_jax.weights import runs

ROOT = Path(__file__).resolve().parents[1]
TIMING = "train/pairs_per_s"  # the one record field that depends on the clock


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """run(workdir, *flags, crash_at=None, workers=0) -> (CompletedProcess, [pids of processes it left alive])."""
    cache = tmp_path_factory.mktemp("jax_cache")  # compiled steps shared by the runs: reruns skip compilation

    def go(workdir, *flags, crash_at=None, workers=0):
        tag = uuid.uuid4().hex  # inherited by every process the run starts, so survivors can be found
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "REID_JAX_TEST_TAG": tag,
               "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        env.pop("REID_JAX_CRASH_AT", None)
        if crash_at:
            env["REID_JAX_CRASH_AT"] = crash_at
        cmd = [sys.executable, "-m", "reid_jax.main", "--config=tests/cli_config.py", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", "--config.eval.every_epochs=1",
               f"--config.data.num_workers={workers}", *flags]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        return done, _survivors(tag)

    return go


def _survivors(tag: str, wait_s: float = 15.0) -> list[int]:
    """Pids of processes carrying REID_JAX_TEST_TAG=tag still alive after up to wait_s seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and f"REID_JAX_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes() \
                        and (proc / "stat").read_text().split(")")[-1].split()[0] != "Z":
                    alive.append(int(proc.name))
            except OSError:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != TIMING} for line in lines]


def _final_params(workdir: Path) -> dict:
    step, params = runs.latest_arrays(workdir / "checkpoints")
    assert step == 36
    return params


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """An uninterrupted run (no worker processes; the stream is the same with any number of workers)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    done, left = run(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not left and "leaked" not in done.stderr, done.stderr[-2000:]
    return workdir


@pytest.fixture(scope="module")
def interrupted(run, tmp_path_factory):
    """One workdir stopped at five instants, rerun after each: [(what, CompletedProcess, survivors)]."""
    workdir = tmp_path_factory.mktemp("interrupted")
    history = []
    for crash_at in ("checkpoint_save@8",  # kill -9 while the step-8 checkpoint is being written
                     "sigterm@10",  # the scheduler's SIGTERM in mid-epoch
                     "after_evaluation@18",  # kill -9 after the evaluation at 18 saved its best model, before 20
                     "evaluation@36",  # kill -9 during the final evaluation, on a checkpoint step
                     None):  # the last rerun finishes
        done, left = run(workdir, crash_at=crash_at, workers=1)
        history.append((crash_at, done, left))
    return workdir, history


def test_a_run_killed_at_any_instant_finishes_as_if_uninterrupted(reference, interrupted):
    workdir, history = interrupted
    statuses = {what: done.returncode for what, done, _ in history}
    assert statuses == {"checkpoint_save@8": -signal.SIGKILL, "sigterm@10": 128 + signal.SIGTERM,
                        "after_evaluation@18": -signal.SIGKILL, "evaluation@36": -signal.SIGKILL, None: 0}, \
        history[-1][1].stderr[-3000:]
    for what, done, left in history:
        assert not left, f"{what}: processes {left} outlived the run"
    assert _records(workdir) == _records(reference)  # every step and evaluation once, with the same values
    ref, got = _final_params(reference), _final_params(workdir)
    assert sorted(ref) == sorted(got)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert sorted(p.name for p in (workdir / "best" / "synthetic").iterdir()) == \
        sorted(p.name for p in (reference / "best" / "synthetic").iterdir())
    assert (workdir / "retrieval_synthetic_36.png").exists()


def test_sigterm_saves_the_finished_step_and_says_how_to_resume(interrupted):
    _, history = interrupted
    done = dict((what, done) for what, done, _ in history)["sigterm@10"]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM at step 10 of 36; checkpoint saved in ") and \
        last.endswith("rerun the same command to resume"), done.stderr[-2000:]
    resumed = dict((what, done) for what, done, _ in history)["after_evaluation@18"]
    assert "at step 10" in resumed.stdout  # resumed where SIGTERM stopped: nothing lost, nothing repeated


def test_a_damaged_checkpoint_and_a_torn_metrics_line_fall_back(run, reference, interrupted, tmp_path):
    workdir, _ = interrupted
    for f in (workdir / "checkpoints" / "36" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * f.stat().st_size)  # every byte of the state zeroed: unreadable
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 37, "train/lo')  # a write torn by a kill
    done, left = run(workdir, workers=1)
    assert done.returncode == 0 and not left, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert any("checkpoints/36 is damaged" in w and "resuming from the previous one" in w for w in warnings), done.stderr
    assert any("metrics.jsonl: dropping a torn last line" in w for w in warnings), done.stderr
    assert "Traceback" not in done.stderr
    assert (workdir / "corrupt_checkpoints" / "checkpoints-36").is_dir()  # set aside, not deleted
    assert _records(workdir) == _records(reference)  # replayed 33..36 and the final evaluation, once
    ref, got = _final_params(reference), _final_params(workdir)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def _one_error_line(done) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("flags, status, says", [
    (["--config.train.epoch=3"], 2, "config.train has no field 'epoch' (did you mean config.train.epochs?)"),
    (["--config.data.batch_size=abc"], 2, "--config.data.batch_size=abc"),
    (["--config.data.batch_size=0"], 1, "config.data.batch_size=0: expected a positive multiple"),
    (["--config.data.batch_size=4096"], 1, "is larger than the training set (288 examples"),
])
def test_bad_flags_get_one_line(run, tmp_path, flags, status, says):
    done, _ = run(tmp_path / "w", *flags)
    assert done.returncode == status and says in _one_error_line(done)


@pytest.mark.parametrize("config, says", [
    ("configs/scgi.py:nope", "unknown variant 'nope' of configs/scgi.py; expected one of market1501"),
    ("configs/tde_nam.py:finetune_xyz", "unknown variant finetune_xyz of configs/tde_nam.py"),
    ("configs/tde_nam.py:ablation_foo", "unknown variant 'ablation_foo' of configs/tde_nam.py"),
    ("configs/tdenam.py", "no such file"),
])
def test_a_bad_config_argument_gets_one_line(tmp_path, config, says):
    cmd = [sys.executable, "-m", "reid_jax.main", f"--config={config}", f"--workdir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2 and says in _one_error_line(done)


def test_eval_mode_without_checkpoints_is_an_error(run, tmp_path):
    (tmp_path / "empty").mkdir()
    for workdir in (tmp_path / "empty", tmp_path / "mistyped"):
        done, _ = run(workdir, "--mode=eval")
        assert done.returncode == 1, done.stderr[-2000:]
        assert "--mode=eval" in _one_error_line(done)
        assert not (workdir / "metrics.jsonl").exists() and not list(workdir.glob("*.png"))
    assert not (tmp_path / "mistyped").exists()


def test_resuming_with_other_settings_is_refused(run, interrupted):
    workdir, _ = interrupted
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    done, _ = run(workdir, "--config.data.batch_size=8", workers=1)
    assert done.returncode == 1
    assert "data.batch_size: 16 there, 8 now" in _one_error_line(done)
    done, _ = run(workdir, workers=0)
    assert done.returncode == 1
    assert "data.num_workers: 1 there, 0 now" in _one_error_line(done)
    done, _ = run(workdir, "--config.model.overrides.embed_dim=32", workers=1)
    assert done.returncode == 1
    line = _one_error_line(done)
    assert "was written by a run with another model or method" in line and "visual.proj" in line
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before  # nothing moved or deleted


def test_a_stop_signal_is_not_swallowed_by_a_librarys_except_exception():
    """A SIGTERM that lands outside a training step raises `Preempted` where the program is, possibly inside a
    library call wrapped in `except Exception` (an import's fallback, a retry loop). It must still reach the
    command, as KeyboardInterrupt would: a stop that is swallowed lets the run go on (or fail with another error)
    until the scheduler's SIGKILL."""
    from reid_jax.train import preemption

    def library_call():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs here and raises
            return "went on"
        except Exception:  # noqa: BLE001 - what a library may do
            return "swallowed"

    with pytest.raises(preemption.Preempted) as stopped:
        with preemption.StopSignals():
            library_call()
    assert stopped.value.status == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not None  # the handlers were put back


def test_a_stop_signal_that_lands_in_a_gc_callback_is_not_lost(monkeypatch):
    """Python drops an exception raised inside a gc callback ("Exception ignored in ..."), and JAX runs one at
    every collection: a SIGTERM that lands there was lost, and the run trained on to its end. The request is kept:
    the next guarded step refuses to start, and leaving the handlers' scope raises it."""
    import gc

    from reid_jax.train import preemption

    def callback(phase, info):
        if phase == "start":
            gc.callbacks.remove(callback)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs here, inside the callback, and its exception is dropped

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))  # "Exception ignored in"
    with pytest.raises(preemption.Preempted) as stopped:
        with preemption.StopSignals() as signals:
            gc.callbacks.append(callback)
            gc.collect()
            assert dropped == [preemption.Preempted]  # swallowed, as it was
            assert signals.requested == signal.SIGTERM
            with pytest.raises(preemption.Preempted):
                with signals.deferred():
                    pytest.fail("a step started after the stop")
            assert preemption.should_stop(signals, 3) == signal.SIGTERM
    assert stopped.value.status == 128 + signal.SIGTERM  # raised on leaving the scope
