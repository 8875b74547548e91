"""`python -m reid_jax.main --config=configs/<method>.py[:variant] --workdir=DIR [--mode=train|eval]`.

Dispatches on `config.method`. `--mode=train` trains (resuming from DIR) and evaluates as configured; a config
with `train.epochs = 0` only evaluates its initial model (the zero-shot baseline). `--mode=eval` evaluates the
newest readable checkpoint in DIR, or without one the model of `--config.init_checkpoint` (e.g. an authors'
released checkpoint, as it is). Overrides: `--config.data.batch_size=64`.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads: on a CPU this may restart the process (reid_jax/allocator.py)
    from reid_jax import allocator

    allocator.reexec("reid_jax.main")

import atexit
import difflib
import importlib
import os
import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from reid_jax import config_file, errors, mesh as mesh_lib
from reid_jax.train import loop, preemption

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and pictures go", required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and evaluate) or only evaluate")

# config.method -> module with a `Task(config, workdir)`
TASKS = {"tde_nam": "reid_jax.train.tde_nam", "scgi": "reid_jax.train.scgi", "muva": "reid_jax.train.muva"}


def make_task(config, workdir: Path):
    if config.method not in TASKS:
        raise errors.UserError(f"config.method={config.method!r}; expected one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[config.method]).Task(config, workdir)


def _unknown_field(config, key: str) -> str | None:
    """Why `--config.<key>=...` names no field of `config` (None when it does)."""
    node, walked = config, "config"
    for part in key.split("."):
        fields = list(node.keys()) if hasattr(node, "keys") else []
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f" (did you mean {walked}.{close[0]}?)" if close else ""
            return (f"--config.{key}: {walked} has no field {part!r}{hint}; its fields are "
                    f"{', '.join(sorted(fields)) if fields else 'none (it is a value)'}")
        node, walked = node[part], f"{walked}.{part}"
    return None


def _explain_flags_error(args: list[str], error: Exception) -> str:
    """A one-line account of a command line absl / ml_collections could not parse."""
    config_arg = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if config_arg is not None:
        path_text, _, variant = config_arg.partition(":")
        path = errors.expand_path(path_text)
        if not path.is_file():
            found = ", ".join(str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)
                              for p in sorted(Path("configs").glob("*.py")))
            return (f"--config={config_arg}: no such file {path}; expected a config such as {found or 'configs/tde_nam.py'}"
                    f" (optionally :variant)")
        try:
            module = config_file.load_module(path)
            config = module.get_config(variant) if variant else module.get_config()
        except Exception as e:
            return f"--config={config_arg}: {e}"
        for arg in args:
            if arg.startswith("--config.") and "=" in arg:
                if (why := _unknown_field(config, arg[len("--config."):].split("=", 1)[0])) is not None:
                    return why
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if any("--workdir" in ln and "None" in ln for ln in lines):
        return "--workdir=DIR is required: where checkpoints, metrics and pictures go"
    return lines[0] if lines else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error (a missing config file, an unknown variant, a mistyped or ill-typed
    override) turned into one line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # flags.Error, or what ml_collections raises while applying an override
        sys.exit(errors.report(errors.UserError(_explain_flags_error(argv[1:], e)), errors.EXIT_USAGE))


def _exit_now(status: int) -> None:
    """Ends the process after a stop signal: the exit handlers run (multiprocessing releases the stream's locks,
    loggers flush), the rest of the interpreter's teardown is skipped. Everything the run keeps is saved by now
    (fit settles its checkpoints and closes its streams while `Preempted` unwinds), and that teardown is what
    went wrong: after a SIGTERM that landed as XLA finished compiling the first step, it crashed in native code,
    past the last Python frame (a segfault, status 139 instead of 143), in some of the runs stopped then."""
    atexit._run_exitfuncs()  # CPython's own exit path runs these first too
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv) -> int:
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the console readable
        logging.set_verbosity(logging.WARNING)
    mesh_lib.maybe_initialize_distributed()
    try:  # a config file that failed to load is a stand-in that raises on first use
        config = _CONFIG.value
        _ = config is not None and config.method
    except Exception as e:
        return errors.report(errors.UserError(_explain_flags_error(sys.argv[1:], e)), errors.EXIT_USAGE)
    workdir = errors.expand_path(_WORKDIR.value)
    if config is None:
        raise app.UsageError("--config=configs/<method>.py[:variant] is required")
    if _MODE.value == "eval" and not workdir.is_dir() and not config.init_checkpoint:
        return errors.report(errors.UserError(f"--workdir={workdir}: no such folder; --mode=eval evaluates the "
                                              f"checkpoints of a training run in it (or pass a "
                                              f"--config.init_checkpoint to evaluate)"))
    workdir.mkdir(parents=True, exist_ok=True)
    logging.info("devices: %s", jax.devices())
    try:
        with preemption.stop_signals():
            task = make_task(config, workdir)
            if _MODE.value == "eval":
                results = loop.evaluate_checkpoint(config, workdir, task)
            elif config.train.epochs == 0:
                results = loop.evaluate_only(config, workdir, task)
            else:
                loop.fit(config, workdir, task)
                return 0
    except preemption.Preempted as e:
        _exit_now(errors.report(e, e.status))
    except (errors.UserError, FileNotFoundError, loop.TrainingDiverged) as e:
        return errors.report(e)
    print({k: round(v, 2) for k, v in results.items()})
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
