"""Ablation grids: `python -m reid_jax.ablate CONFIG --variants=a,b --seeds=0,1,2 --workdir=DIR`.

    python -m reid_jax.ablate configs/tde_nam.py --variants=ablation_nam,ablation_uniform,ablation_none \
        --seeds=0,1,2 --workdir=DIR [--init_checkpoint=RUN] [--set=data.data_dir=D ...] [--table_only]

Runs `python -m reid_jax.main --config=CONFIG:VARIANT --workdir=DIR/VARIANT/seed_S --config.seed=S` (plus
`--config.init_checkpoint=RUN` and each `--set=X` as `--config.X`) for every variant and seed, one after another;
each run's output is appended to DIR/VARIANT/seed_S/run.log. Then writes, atomically:
  DIR/ablation.json  every run's final `eval/...` metrics, and per variant their mean, sample sd and count
  DIR/ablation.md    the same as a markdown table: a row per variant, "mean ± sd" per metric (R1, mAP first)
  DIR/curves.svg     train/loss against step (and the first eval metric, where runs evaluated more than once),
                     a line per variant: the mean over seeds at the steps all of them logged; thin lines per seed

Resume: a run whose `reid_jax.main` exited 0 gets DIR/VARIANT/seed_S/ablate_done.json (its final eval metrics,
command, and the wall time of the call that finished it); rerunning the same command skips those runs and reruns
the others, which resume from their checkpoints. Each run folder records its settings (ablate_command.json) before
it starts: a folder run with other settings (CONFIG, --init_checkpoint, --set) is an error, never silently mixed.
SIGTERM / SIGINT are passed on to the running child, which saves a checkpoint; the runner then exits with 128 + the
signal number. If the runner is killed outright, the kernel sends the child SIGTERM (PR_SET_DEATHSIG). A failed
run stops the grid. --table_only writes the three files from what is there, unfinished runs shown as missing.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads: on a CPU this may restart the process (reid_jax/allocator.py)
    from reid_jax import allocator

    allocator.reexec("reid_jax.ablate")

import ctypes
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple
from xml.sax.saxutils import escape

from absl import app, flags

from reid_jax import config_file, files
from reid_jax.errors import EXIT_USAGE, UserError, expand_path, report
from reid_jax.train.writer import read_records

USAGE = ("python -m reid_jax.ablate CONFIG --variants=a,b --seeds=0,1,2 --workdir=DIR [--init_checkpoint=PATH] "
         "[--set=data.x=y ...] [--table_only]")
DONE, COMMAND = "ablate_done.json", "ablate_command.json"
FIRST_METRICS = ("R1", "mAP")  # table and curve order: these first, every other metric after
TAIL_LINES = 20  # of a failed run's run.log, printed under the error
# the SVG's look: panel size in px, margins (left, right, top, bottom), line colours, ticks per axis
PANEL_W, PANEL_H, MARGIN, TICKS = 640, 280, (70, 170, 30, 40), 5
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


class UsageError(UserError):
    """A bad command line (exit status 2)."""


class RunError(UserError):
    """A run failed (`tail`: the last lines of its run.log) or the runner got a signal (`status` 128 + signum)."""

    def __init__(self, message: str, status: int = 1, tail: str = ""):
        super().__init__(message)
        self.status, self.tail = status, tail


# ------------------------------------------------------------------------------------------------ the grid
def check_variants(config: Path, variants: list[str]) -> None:
    """Builds each variant's config once: an unreadable CONFIG or an unknown variant is a UsageError, before any run."""
    if not config.is_file():
        raise UsageError(f"CONFIG {config}: no such file; expected a config such as configs/tde_nam.py")
    try:
        module = config_file.load_module(config)
    except Exception as e:
        raise UsageError(f"CONFIG {config}: cannot be loaded ({type(e).__name__}: {e})") from None
    for v in variants:
        try:
            module.get_config(v)
        except Exception as e:  # configs/common.select's ValueError names the valid variants
            raise UsageError(f"--variants: {e}") from None


class Run(NamedTuple):
    variant: str
    seed: int
    dir: Path  # DIR/VARIANT/seed_S
    args: list[str]  # the `reid_jax.main` arguments that define the run (all but --workdir)


def plan(config: Path, variants, seeds, workdir: Path, init_checkpoint: str, sets: list[str]) -> list[Run]:
    """The grid, variant-major; `sets` are config overrides without `--config.`."""
    extra = [f"--config.init_checkpoint={init_checkpoint}"] if init_checkpoint else []
    return [Run(v, s, workdir / v / f"seed_{s}", [f"--config={config}:{v}", f"--config.seed={s}", *extra,
                                                  *(f"--config.{x}" for x in sets)]) for v in variants for s in seeds]


def check_settings(run: Run) -> dict | None:
    """The run's done marker (None if unfinished); UserError if its folder was run with other arguments."""
    for name in (DONE, COMMAND):
        if (path := run.dir / name).exists() and (old := json.loads(path.read_text())["settings"]) != run.args:
            then, now = sorted(set(old) - set(run.args)) or "none", sorted(set(run.args) - set(old)) or "none"
            diff = f"{then} then, {now} now"
            raise UserError(f"{run.dir} was run with other settings ({diff}, per its {name}); pass another "
                            f"--workdir, or delete that folder to run it again")
    return json.loads((run.dir / DONE).read_text()) if (run.dir / DONE).exists() else None


def final_metrics(run_dir: Path) -> tuple[int, dict]:
    """(step, {eval metric: value}) of the run's last evaluation, from its metrics.jsonl."""
    evals = [r for r in read_records(run_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    if not evals:
        raise UserError(f"{run_dir}: the run ended but its metrics.jsonl has no eval/ record; an ablation compares "
                        f"evaluations: configure one at the end of training (config.eval)")
    step = max(r["step"] for r in evals)
    return step, {k: v for r in evals if r["step"] == step for k, v in r.items() if k.startswith("eval/")}


def _die_with_parent(runner: int) -> None:
    """In the child before exec: SIGINT back to its default (an ignored SIGINT would be inherited through exec,
    e.g. from a test runner's worker, and the child would never see a forwarded Ctrl-C); SIGTERM when the runner
    dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_DEATHSIG = 1
        if os.getppid() != runner:  # the runner died before prctl took effect
            os._exit(128 + signal.SIGTERM)


def run_child(cmd: list[str], log_path: Path) -> tuple[int, int | None]:
    """Runs `cmd` in its own process group (so a Ctrl-C in the terminal reaches it once, through the runner),
    output appended to log_path; a SIGTERM / SIGINT to the runner is passed on to it. Returns (its exit status,
    the first signal the runner got or None)."""
    got = []

    def forward(signum, frame):
        got.append(signum)
        child.send_signal(signum)

    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 process_group=0, preexec_fn=functools.partial(_die_with_parent, os.getpid()))
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            status = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if child.poll() is None:  # the runner itself failed: leave nothing behind
                child.kill()
                child.wait()
    return status, (got[0] if got else None)


def run_one(run: Run, main_module: str) -> dict:
    """Runs `run` to its end and writes its done marker (returned); RunError if it failed or was stopped."""
    run.dir.mkdir(parents=True, exist_ok=True)
    files.write_text_atomically(run.dir / COMMAND, json.dumps({"settings": run.args}, indent=1))
    cmd = [sys.executable, "-m", main_module, run.args[0], f"--workdir={run.dir}", *run.args[1:]]
    start = time.monotonic()
    status, signum = run_child(cmd, run.dir / "run.log")
    what, log = f"{run.variant} seed {run.seed}", run.dir / "run.log"
    if signum and status != 0:
        raise RunError(f"stopped by {signal.Signals(signum).name} during {what} ({run.dir} keeps its last "
                       f"checkpoint); rerun the same command to resume", 128 + signum)
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-TAIL_LINES:])
        raise RunError(f"{what} failed (exit status {status}) in {run.dir}; see {log}, whose last lines follow",
                       tail=tail)
    step, metrics = final_metrics(run.dir)
    done = {"settings": run.args, "command": cmd, "step": step, "wall_s": round(time.monotonic() - start, 1),
            "metrics": metrics}
    files.write_text_atomically(run.dir / DONE, json.dumps(done, indent=1))
    if signum:  # it finished as the signal came: it is complete, but the grid stops
        raise RunError(f"stopped by {signal.Signals(signum).name} after {what}; rerun the same command to run the "
                       f"rest", 128 + signum)
    return done


def run_grid(runs: list[Run], main_module: str = "reid_jax.main") -> None:
    """Runs every run without a done marker, in order; prints one progress line per run."""
    for n, run in enumerate(runs, 1):
        print(f"[{n}/{len(runs)}] {run.variant} seed {run.seed}: ", end="", flush=True)
        if done := check_settings(run):
            print(f"finished before, {_brief(done['metrics'])}", flush=True)
            continue
        print("running ... ", end="", flush=True)
        try:
            done = run_one(run, main_module)
        except RunError:
            print("stopped or failed", flush=True)
            raise
        print(f"done in {done['wall_s']:.0f} s, {_brief(done['metrics'])}", flush=True)


def _brief(metrics: dict) -> str:
    return ", ".join(f"{k}={metrics[k]:.2f}" for k in metric_order(metrics)[:2])


# ---------------------------------------------------------------------------------------------- the table
def metric_order(names) -> list[str]:
    """R1 then mAP (of every test set, in name order) first, then every other metric by name."""
    def key(name):
        last = name.rsplit("/", 1)[-1]
        return (FIRST_METRICS.index(last) if last in FIRST_METRICS else len(FIRST_METRICS), name)
    return sorted(names, key=key)


def summarize(runs: list[Run], config: str, seeds) -> dict:
    """ablation.json's content from the done markers. sd is the sample standard deviation (ddof=1), null (None)
    for a variant with one finished seed; a metric's mean and sd are over the seeds that have it."""
    variants = {}
    for run in runs:
        per_seed = variants.setdefault(run.variant, {})
        if done := check_settings(run):
            per_seed[str(run.seed)] = done["metrics"]
    out = {"config": config, "seeds": list(seeds), "variants": {}}
    for v, per_seed in variants.items():
        values = {m: [r[m] for r in per_seed.values() if m in r] for m in set().union(*per_seed.values())}
        out["variants"][v] = {
            "per_seed": per_seed, "n": len(per_seed),
            "mean": {m: statistics.fmean(x) for m, x in values.items()},
            "sd": {m: statistics.stdev(x) if len(x) > 1 else None for m, x in values.items()}}
    out["metrics"] = metric_order(set().union(*(r["mean"] for r in out["variants"].values())))
    return out


def markdown(summary: dict) -> str:
    """A row per variant: n, "mean ± sd" per metric, and each seed's value of the first metric."""
    metrics, seeds = summary["metrics"], summary["seeds"]
    first = metrics[0] if metrics else "first metric"
    lines = [f"Ablation of `{summary['config']}`, seeds {', '.join(map(str, seeds))}; mean ± sample sd over seeds.",
             "", "| variant | n | " + " | ".join(metrics) + f" | per seed ({first}) |",
             "|---" * (len(metrics) + 3) + "|"]
    for v, r in summary["variants"].items():
        cells = [f"{r['mean'][m]:.2f} ± {r['sd'][m]:.2f}" if r["sd"].get(m) is not None
                 else f"{r['mean'][m]:.2f}" if m in r["mean"] else "missing" for m in metrics]
        each = ", ".join(f"{s}: {r['per_seed'][str(s)][first]:.2f}" if first in r["per_seed"].get(str(s), {})
                         else f"{s}: missing" for s in seeds)
        lines.append(f"| {v} | {r['n']} | " + " | ".join(cells) + f" | {each} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- the curves
def curves(runs: dict[str, list[Path]], eval_metric: str | None) -> str:
    """SVG text: a panel of train/loss, and of `eval_metric` where some run evaluated more than once."""
    panels = [("train/loss", {v: [_series(d, "train/loss") for d in ds] for v, ds in runs.items()})]
    evals = {v: [_series(d, eval_metric) for d in ds] for v, ds in runs.items()} if eval_metric else {}
    if any(len(s) > 1 for seeds in evals.values() for s in seeds):
        panels.append((eval_metric, evals))
    body = [_panel(i * PANEL_H, title, series) for i, (title, series) in enumerate(panels)]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{PANEL_W}" height="{PANEL_H * len(panels)}" '
            f'font-family="sans-serif" font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def _series(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_records(run_dir / "metrics.jsonl")
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}


def _ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """About TICKS round values (steps of 1, 2 or 5 x 10^k) inside [lo, hi], with labels as precise as the step."""
    raw = (hi - lo) / (TICKS - 1) or 1.0
    power = math.floor(math.log10(raw))
    step = min((m * 10.0 ** power for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    decimals = max(0, -math.floor(math.log10(step)))
    return [(k * step, f"{k * step:.{decimals}f}") for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _mean_curve(seeds: list[dict[int, float]]) -> dict[int, float]:
    """The mean over seeds at the steps all of them have."""
    shared = set.intersection(*(set(s) for s in seeds)) if seeds else set()
    return {t: statistics.fmean(s[t] for s in seeds) for t in shared}


def _panel(top: int, title: str, series: dict[str, list[dict]]) -> str:
    """One panel: per-seed lines (thin), per-variant means at the steps all seeds share, axes, ticks, legend."""
    points = [(t, y) for seeds in series.values() for s in seeds for t, y in s.items()]
    if not points:
        return f'<text x="{MARGIN[0]}" y="{top + PANEL_H / 2}">{escape(title)}: no records</text>'
    (x0, x1), (y0, y1) = ((min(p[i] for p in points), max(p[i] for p in points)) for i in (0, 1))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-9)
    left, right, bottom = MARGIN[0], PANEL_W - MARGIN[1], top + PANEL_H - MARGIN[3]
    sx = lambda t: left + (t - x0) / (x1 - x0) * (right - left)
    sy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top - MARGIN[2])
    line = lambda s: " ".join(f"{sx(t):.1f},{sy(y):.1f}" for t, y in sorted(s.items()))
    out = [f'<text x="{left}" y="{top + 18}" font-size="13">{escape(title)}</text>',
           f'<path d="M{left},{top + MARGIN[2]} V{bottom} H{right}" stroke="black" fill="none"/>']
    out += [f'<text x="{sx(t):.1f}" y="{bottom + 15}" text-anchor="middle">{s}</text>' for t, s in _ticks(x0, x1)]
    out += [f'<text x="{left - 5}" y="{sy(y) + 4:.1f}" text-anchor="end">{s}</text>' for y, s in _ticks(y0, y1)]
    out.append(f'<text x="{(left + right) / 2}" y="{bottom + 32}" text-anchor="middle">step</text>')
    for i, (v, seeds) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        out += [f'<polyline class="seed" points="{line(s)}" stroke="{colour}" stroke-opacity="0.3" fill="none"/>'
                for s in seeds]
        out.append(f'<polyline class="mean" data-variant="{escape(v)}" points="{line(_mean_curve(seeds))}" '
                   f'stroke="{colour}" stroke-width="2" fill="none"/>')
        y = top + MARGIN[2] + 16 * i
        out.append(f'<path d="M{right + 10},{y} h20" stroke="{colour}" stroke-width="2"/>'
                   f'<text x="{right + 35}" y="{y + 4}">{escape(v)}</text>')
    return "\n".join(out)


def write_reports(runs: list[Run], workdir: Path, config: str, seeds) -> None:
    """DIR/ablation.json, ablation.md and curves.svg from the finished runs."""
    summary = summarize(runs, config, seeds)
    dirs = {v: [workdir / v / f"seed_{s}" for s in r["per_seed"]] for v, r in summary["variants"].items()}
    files.write_text_atomically(workdir / "ablation.json", json.dumps(summary, indent=1) + "\n")
    files.write_text_atomically(workdir / "ablation.md", markdown(summary))
    files.write_text_atomically(workdir / "curves.svg", curves(dirs, (summary["metrics"] or [None])[0]))


# ---------------------------------------------------------------------------------------------------- CLI
def _names(text: str, flag: str) -> list[str]:
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items:
        raise UsageError(f"{flag} is empty; expected a comma-separated list; usage: {USAGE}")
    if len(set(items)) < len(items):
        raise UsageError(f"{flag}={text} names an item twice; list each once")
    return items


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in _names(text, "--seeds")]
    except ValueError:
        raise UsageError(f"--seeds={text}: expected comma-separated integers such as 0,1,2") from None


def _sets(values: list[str]) -> list[str]:
    out = [v.removeprefix("--").removeprefix("config.") for v in values]
    if bad := [v for v in out if "=" not in v or v.startswith("=")]:
        raise UsageError(f"--set={bad[0]}: expected a config field and a value, e.g. --set=data.data_dir=DIR")
    return out


def main(argv) -> int:
    f = flags.FLAGS
    try:
        if len(argv) != 2:
            raise UsageError(f"expected one CONFIG, got {len(argv) - 1} arguments {argv[1:]}; usage: {USAGE}")
        config, variants, seeds = expand_path(argv[1]).absolute(), _names(f.variants, "--variants"), _seeds(f.seeds)
        if (workdir := expand_path(f.workdir)) is None:
            raise UsageError(f"--workdir is required: the folder of the runs and tables; usage: {USAGE}")
        runs = plan(config, variants, seeds, workdir, str(expand_path(f.init_checkpoint) or ""), _sets(f.set))
        check_variants(config, variants)
        if f.table_only and not workdir.is_dir():
            raise UserError(f"--workdir={workdir}: no such folder; run the grid first (without --table_only)")
        if not f.table_only:
            run_grid(runs, f.main_module)
        write_reports(runs, workdir, argv[1], seeds)
    except UserError as e:
        status = report(e, EXIT_USAGE if isinstance(e, UsageError) else getattr(e, "status", 1))
        if getattr(e, "tail", ""):
            print(e.tail, file=sys.stderr)
        return status
    print(f"wrote {workdir / 'ablation.md'}, ablation.json, curves.svg")
    return 0


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(report(UsageError(f"{e}; usage: {USAGE}"), EXIT_USAGE))


def _define_flags() -> None:
    """CLI flags, defined only when run as a program so that importing `ablate` defines none."""
    flags.DEFINE_string("variants", None, "comma-separated variants of CONFIG")
    flags.DEFINE_string("seeds", None, "comma-separated integer seeds (config.seed)")
    flags.DEFINE_string("workdir", None, "runs go to DIR/VARIANT/seed_S, tables to DIR")
    flags.DEFINE_string("init_checkpoint", "", "config.init_checkpoint of every run")
    flags.DEFINE_multi_string("set", [], "a config override for every run: --set=data.data_dir=D")
    flags.DEFINE_bool("table_only", False, "write the tables and curves of what is there; run nothing")
    flags.DEFINE_string("main_module", "reid_jax.main", "the module each run starts (tests use a stand-in)")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
