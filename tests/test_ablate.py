"""`python -m reid_jax.ablate`: the grid, resume, settings markers, tables and curves, against a stand-in for
`reid_jax.main` (FAKE_MAIN below) whose final metrics are known functions of variant and seed; signals against
the real runner process. The stand-in's metrics:

    train/loss at step t = 1 / t + seed + len(variant)           (t = 1..STEPS)
    eval/syn/R1 = 10 * seed + len(variant),  eval/syn/mAP = seed + len(variant) / 2,  eval/syn/R5 = R1 + 1
"""

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
VARIANTS = ("a", "bb", "ccc")

FAKE_MAIN = f'''
import json, os, signal, sys, time
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:])
workdir, variant = Path(args["--workdir"]), args["--config"].rsplit(":", 1)[1]
seed = int(args["--config.seed"])
workdir.mkdir(parents=True, exist_ok=True)
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
print("fake main", variant, seed, flush=True)
if os.environ.get("FAKE_SLEEP"):
    def stop(signum, frame):
        (workdir / "got_signal").write_text(str(signum))
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    (workdir / "started").write_text(str(os.getpid()))
    time.sleep(60)
records = [{{"step": t, "train/loss": 1 / t + seed + len(variant)}} for t in range(1, {STEPS} + 1)]
with open(workdir / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\\n" for r in records)
if os.environ.get("FAKE_FAIL") == f"{{variant}}:{{seed}}":
    print("fake failure", variant, seed)
    sys.exit(3)
r1 = 10 * seed + len(variant)
evals = [(t, r1 - ({STEPS} - t)) for t in ((3, {STEPS}) if os.environ.get("FAKE_TWO_EVALS") else ({STEPS},))]
with open(workdir / "metrics.jsonl", "a") as f:
    f.writelines(json.dumps({{"step": t, "eval/syn/R5": r + 1, "eval/syn/mAP": seed + len(variant) / 2,
                             "eval/syn/R1": r}}) + "\\n" for t, r in evals)
'''

CONFIG = '''
VARIANTS = {"a": dict, "bb": dict, "ccc": dict}
def get_config(arg=""):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of cfg.py; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[arg]()
'''


@pytest.fixture
def env(tmp_path):
    """A folder with fake_main.py and cfg.py; returns (tmp_path, environment for the runner, calls file)."""
    (tmp_path / "fake_main.py").write_text(FAKE_MAIN)
    (tmp_path / "cfg.py").write_text(CONFIG)
    calls = tmp_path / "calls.jsonl"
    environ = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "FAKE_CALLS": str(calls),
               "JAX_PLATFORMS": "cpu"}
    return tmp_path, environ, calls


def ablate_cmd(tmp, *flags, config=None, variants=",".join(VARIANTS), seeds="0,1,2"):
    return [sys.executable, "-m", "reid_jax.ablate", str(config or tmp / "cfg.py"), f"--variants={variants}",
            f"--seeds={seeds}", f"--workdir={tmp / 'grid'}", "--main_module=fake_main", *flags]


def ablate(env, *flags, extra_env=None, **kw):
    tmp, environ, _ = env
    return subprocess.run(ablate_cmd(tmp, *flags, **kw), capture_output=True, text=True, cwd=ROOT,
                          env={**environ, **(extra_env or {})}, timeout=120)


def calls(env) -> list[tuple[str, int]]:
    """(variant, seed) of every fake run so far, in order."""
    path = env[2]
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(r[0].rsplit(":", 1)[1], int(r[2].split("=")[1])) for r in rows]


def r1(variant, seed):
    return 10 * seed + len(variant)


def test_grid_tables_and_curves(env):
    tmp = env[0]
    done = ablate(env, "--set=data.data_dir=/x", "--set=config.train.epochs=2", "--init_checkpoint=/ckpt",
                  extra_env={"FAKE_TWO_EVALS": "1"})
    assert done.returncode == 0, done.stderr
    grid = [(v, s) for v in VARIANTS for s in (0, 1, 2)]
    assert calls(env) == grid
    # the command of each run: config:variant, its folder, the seed, init_checkpoint, the overrides verbatim
    argv = json.loads(env[2].read_text().splitlines()[4])  # bb seed 1
    assert argv == [f"--config={tmp / 'cfg.py'}:bb", f"--workdir={tmp / 'grid/bb/seed_1'}", "--config.seed=1",
                    "--config.init_checkpoint=/ckpt", "--config.data.data_dir=/x", "--config.train.epochs=2"]
    lines = done.stdout.splitlines()
    assert lines[4].startswith("[5/9] bb seed 1: running ... done in ") and "eval/syn/R1=12.00" in lines[4]
    marker = json.loads((tmp / "grid/bb/seed_1/ablate_done.json").read_text())
    assert marker["metrics"] == {"eval/syn/R1": 12, "eval/syn/mAP": 2.0, "eval/syn/R5": 13}
    assert marker["step"] == STEPS and marker["command"][1:3] == ["-m", "fake_main"] and marker["wall_s"] >= 0

    summary = json.loads((tmp / "grid/ablation.json").read_text())
    assert summary["metrics"] == ["eval/syn/R1", "eval/syn/mAP", "eval/syn/R5"]
    for v in VARIANTS:
        r = summary["variants"][v]
        values = np.array([r1(v, s) for s in (0, 1, 2)], float)
        assert r["n"] == 3 and r["per_seed"]["2"]["eval/syn/R1"] == r1(v, 2)
        np.testing.assert_allclose(r["mean"]["eval/syn/R1"], values.mean())
        np.testing.assert_allclose(r["sd"]["eval/syn/R1"], values.std(ddof=1))
        np.testing.assert_allclose(r["mean"]["eval/syn/mAP"], np.mean([s + len(v) / 2 for s in (0, 1, 2)]))

    md = (tmp / "grid/ablation.md").read_text().splitlines()
    assert md[2] == "| variant | n | eval/syn/R1 | eval/syn/mAP | eval/syn/R5 | per seed (eval/syn/R1) |"
    values = [r1("ccc", s) for s in (0, 1, 2)]
    row = f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
    assert md[-1].startswith(f"| ccc | 3 | {row} | ") and md[-1].endswith("| 0: 3.00, 1: 13.00, 2: 23.00 |")
    assert len(md) == 4 + len(VARIANTS)

    svg = ET.parse(tmp / "grid/curves.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    means = [p for p in svg.iter(f"{ns}polyline") if p.get("class") == "mean"]
    # two panels (train/loss; R1, evaluated twice): a mean line per variant in each, each seed's line too
    assert [p.get("data-variant") for p in means] == [*VARIANTS, *VARIANTS]
    assert sum(p.get("class") == "seed" for p in svg.iter(f"{ns}polyline")) == 2 * len(VARIANTS) * 3
    assert [len(p.get("points").split()) for p in means] == [STEPS] * 3 + [2] * 3
    assert {t.text for t in svg.iter(f"{ns}text")} >= {*VARIANTS, "train/loss", "eval/syn/R1", "step"}
    # the loss mean line: y of the mean over seeds at each step, so its shape equals the seeds' mean curve
    ys = np.array([float(xy.split(",")[1]) for xy in means[0].get("points").split()])
    loss = np.mean([[1 / t + s + 1 for t in range(1, STEPS + 1)] for s in (0, 1, 2)], axis=0)
    np.testing.assert_allclose(np.diff(ys) / (ys[-1] - ys[0]), np.diff(loss) / (loss[-1] - loss[0]), atol=0.01)


def test_rerun_skips_finished_and_reruns_failed(env):
    tmp = env[0]
    first = ablate(env, extra_env={"FAKE_FAIL": "bb:1"})
    assert first.returncode == 1
    err = first.stderr.splitlines()
    run_dir = tmp / "grid/bb/seed_1"
    assert err[0].startswith("error: bb seed 1 failed (exit status 3)") and f"{run_dir / 'run.log'}" in err[0]
    assert "fake failure bb 1" in err[1:]  # the tail of run.log
    assert calls(env) == [("a", 0), ("a", 1), ("a", 2), ("bb", 0), ("bb", 1)]
    assert not (run_dir / "ablate_done.json").exists() and not (tmp / "grid/ablation.md").exists()

    second = ablate(env)
    assert second.returncode == 0, second.stderr
    assert calls(env)[5:] == [("bb", 1), ("bb", 2), ("ccc", 0), ("ccc", 1), ("ccc", 2)]
    assert "[1/9] a seed 0: finished before, eval/syn/R1=1.00" in second.stdout
    assert (run_dir / "run.log").read_text().count("fake main bb 1") == 2  # appended

    third = ablate(env)  # everything finished: nothing runs, the tables are written again
    assert third.returncode == 0 and len(calls(env)) == 10


def test_changed_settings_refused(env):
    tmp = env[0]
    assert ablate(env, seeds="0").returncode == 0
    changed = ablate(env, "--set=train.epochs=9", seeds="0")
    assert changed.returncode == 1 and len(changed.stderr.splitlines()) == 1
    assert changed.stderr.startswith(f"error: {tmp / 'grid/a/seed_0'} was run with other settings")
    assert "--config.train.epochs=9" in changed.stderr and "another --workdir" in changed.stderr
    assert len(calls(env)) == 3

    # an unfinished run's folder is guarded too (by the settings it was started with)
    assert ablate(env, variants="a", seeds="1", extra_env={"FAKE_FAIL": "a:1"}).returncode == 1
    other = ablate(env, "--init_checkpoint=/other", variants="a", seeds="1")
    assert other.returncode == 1 and f"{tmp / 'grid/a/seed_1'} was run with other settings" in other.stderr
    assert len(calls(env)) == 4


def test_table_only_shows_missing_runs(env):
    tmp = env[0]
    assert ablate(env, seeds="0", variants="a,bb").returncode == 0
    table = ablate(env, "--table_only", seeds="0,1", variants="a,bb,ccc")
    assert table.returncode == 0, table.stderr
    assert len(calls(env)) == 2
    summary = json.loads((tmp / "grid/ablation.json").read_text())
    assert summary["variants"]["a"]["n"] == 1 and summary["variants"]["a"]["sd"]["eval/syn/R1"] is None
    assert summary["variants"]["ccc"] == {"per_seed": {}, "n": 0, "mean": {}, "sd": {}}
    md = (tmp / "grid/ablation.md").read_text().splitlines()
    assert md[4] == "| a | 1 | 1.00 | 0.50 | 2.00 | 0: 1.00, 1: missing |"
    assert md[6] == "| ccc | 0 | missing | missing | missing | 0: missing, 1: missing |"
    ET.parse(tmp / "grid/curves.svg")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_sleeping(env):
    tmp, environ, _ = env
    # started with SIGINT ignored, as under a test runner's worker or nohup: the child must still get it back
    runner = subprocess.Popen(ablate_cmd(tmp, seeds="0", variants="a"), cwd=ROOT, text=True,
                              env={**environ, "FAKE_SLEEP": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    started = tmp / "grid/a/seed_0/started"
    deadline = time.monotonic() + 60
    while not started.exists():
        assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
        time.sleep(0.05)
    return runner, int(started.read_text()), tmp / "grid/a/seed_0"


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_reaches_child(env, sig):
    runner, child, run_dir = _start_sleeping(env)
    assert os.getpgid(child) == child  # its own process group
    runner.send_signal(sig)
    out, err = runner.communicate(timeout=30)
    assert runner.returncode == 128 + sig, err
    # the child traps SIGTERM; a SIGINT to the runner is passed on as SIGINT, which the stand-in does not trap
    if sig == signal.SIGTERM:
        assert (run_dir / "got_signal").read_text() == str(int(sig))
    assert err.startswith(f"error: stopped by {sig.name} during a seed 0") and len(err.splitlines()) == 1
    assert _wait_gone(child) and not (run_dir / "ablate_done.json").exists()


def test_sigkill_of_runner_terminates_child(env):
    runner, child, run_dir = _start_sleeping(env)
    runner.kill()
    runner.wait()
    assert _wait_gone(child)
    assert (run_dir / "got_signal").read_text() == str(int(signal.SIGTERM))  # PR_SET_DEATHSIG


@pytest.mark.parametrize("how, expected", [
    ({"config": ROOT / "configs/tde_nam.py", "variants": "ablation_nam,bogus"},
     "error: --variants: unknown variant 'bogus' of configs/tde_nam.py; expected one of pretrain, "),
    ({"config": "/nonexistent/cfg.py"}, "error: CONFIG /nonexistent/cfg.py: no such file"),
    ({"variants": " , "}, "error: --variants is empty"),
    ({"seeds": "0,x"}, "error: --seeds=0,x: expected comma-separated integers"),
    ({"seeds": "0,0"}, "error: --seeds=0,0 names an item twice"),
])
def test_bad_command_lines(env, how, expected):
    done = ablate(env, **how)
    assert done.returncode == 2 and done.stderr.startswith(expected) and len(done.stderr.splitlines()) == 1
    assert not calls(env) and not (env[0] / "grid").exists()


def test_real_run_end_to_end(data_dir, tmp_path):
    """One real `reid_jax.main` run (tests/cli_config.py: the tiny model, one epoch of 18 steps on the `small` set,
    an evaluation at the end; that config ignores the variant name). The table holds the last eval record of the
    run's own metrics.jsonl; a rerun skips it."""
    cmd = [sys.executable, "-m", "reid_jax.ablate", "tests/cli_config.py", "--variants=ablation_none", "--seeds=0",
           f"--workdir={tmp_path}", f"--set=data.data_dir={data_dir}", "--set=train.epochs=1"]
    environ = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environ, timeout=300)
    run_dir = tmp_path / "ablation_none/seed_0"
    assert done.returncode == 0, done.stderr + (run_dir / "run.log").read_text()[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if "eval/synthetic/R1" in r][-1]
    summary = json.loads((tmp_path / "ablation.json").read_text())
    r = summary["variants"]["ablation_none"]
    assert r["per_seed"]["0"] == {k: v for k, v in last_eval.items() if k.startswith("eval/")}
    assert r["mean"]["eval/synthetic/R1"] == last_eval["eval/synthetic/R1"] and r["sd"]["eval/synthetic/R1"] is None
    assert summary["metrics"][:2] == ["eval/synthetic/R1", "eval/synthetic/mAP"]
    svg = ET.parse(tmp_path / "curves.svg").getroot()
    mean = [p for p in svg.iter("{http://www.w3.org/2000/svg}polyline") if p.get("class") == "mean"]
    loss_steps = {r["step"] for r in records if "train/loss" in r}
    assert len(mean) == 1 and len(mean[0].get("points").split()) == len(loss_steps) > 1

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environ, timeout=120)
    assert again.returncode == 0 and "[1/1] ablation_none seed 0: finished before" in again.stdout
    assert (run_dir / "run.log").read_text().count("\n$ ") == 1


@pytest.mark.parametrize("lo, hi", [(2.301, 2.305), (1, 18), (0, 12000), (3.2, 31.5), (-0.7, 0.05)])
def test_axis_ticks(lo, hi):
    from reid_jax.ablate import _ticks

    values, labels = zip(*_ticks(lo, hi))
    step = values[1] - values[0]
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert lo - 1e-12 <= values[0] and values[-1] <= hi + 1e-12 and 3 <= len(values) <= 8
    assert np.allclose(np.diff(values), step) and min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-9
    assert values[0] - step < lo and values[-1] + step > hi  # none left out
    assert len(set(labels)) == len(labels) and np.allclose([float(s) for s in labels], values)
