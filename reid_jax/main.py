"""`python -m reid_jax.main --config=configs/<method>.py[:variant] --workdir=DIR [--mode=train|eval]`.

Dispatches on `config.method`. `--mode=train` trains (resuming from DIR) and evaluates as configured; a config
with `train.epochs = 0` only evaluates its initial model (the zero-shot baseline). `--mode=eval` evaluates the
latest checkpoint in DIR (or the initial model when there is none). Overrides: `--config.data.batch_size=64`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from reid_jax.train import loop, mesh as mesh_lib
from reid_jax.train.checkpoint import Checkpointer
from reid_jax.train.writer import MetricWriter

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and pictures go", required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and evaluate) or only evaluate")

# config.method -> module with a `Task(config, workdir)`
TASKS = {"tde_nam": "reid_jax.train.tde_nam", "scgi": "reid_jax.train.scgi", "muva": "reid_jax.train.muva"}


def make_task(config, workdir: Path):
    if config.method not in TASKS:
        raise ValueError(f"config.method={config.method!r}; expected one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[config.method]).Task(config, workdir)


def evaluate_latest(config, workdir: Path, task) -> dict:
    """Evaluates the newest checkpoint in workdir (the initial model if there is none)."""
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    step = ckpt.latest_step()
    if step is None:
        logging.info("no checkpoint in %s: evaluating the initial model", workdir)
        return loop.evaluate_only(config, workdir, task)
    _, graphdef, state, shardings = loop.place_state(config, task)
    state, _, _ = ckpt.restore(step, loop.abstract_state(state, shardings))
    results = task.evaluate(nnx.merge(graphdef, state).model, step, workdir)
    writer = MetricWriter(workdir)
    writer.write(step, results)
    writer.close()
    return results


def main(argv) -> int:
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the console readable
        logging.set_verbosity(logging.WARNING)
    mesh_lib.maybe_initialize_distributed()
    config, workdir = _CONFIG.value, Path(_WORKDIR.value).expanduser()
    if config is None:
        raise app.UsageError("--config=configs/<method>.py[:variant] is required")
    workdir.mkdir(parents=True, exist_ok=True)
    logging.info("devices: %s", jax.devices())
    try:
        task = make_task(config, workdir)
        if _MODE.value == "eval":
            results = evaluate_latest(config, workdir, task)
        elif config.train.epochs == 0:
            results = loop.evaluate_only(config, workdir, task)
        else:
            loop.fit(config, workdir, task)
            return 0
    except (FileNotFoundError, loop.TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print({k: round(v, 2) for k, v in results.items()})
    return 0


if __name__ == "__main__":
    app.run(main)
