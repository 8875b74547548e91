"""The training loop every method shares: state on the mesh, one jitted step with the state donated, resume,
logging, periodic evaluation with best-checkpoint keeping, and a stop on a non-finite loss.

A method supplies a *task* object:
  task.steps_per_epoch, task.total_steps          ints
  task.init_state() -> TrainState                 the model, optimizer and any buffers (at their initial values)
  task.prepare(ts, mesh)                          optional: stages that run once before the first step and fill
                                                  buffers (MUVA's stage 1, SCGI's caption prototypes); a fresh
                                                  run saves step 0 after it, so a resumed run never repeats it
  task.start_epoch(ts, mesh)                      optional: runs before the first step of every epoch after the
                                                  first (MUVA rebuilds its identity memory), on the state
  task.train_stream(shard) -> grain.IterDataset   host batches
  task.train_step(ts, batch, rng) -> metrics      mutates `ts` (runs inside jit; images already float32)
  task.evaluate(model, step, workdir, mesh) -> dict  {'eval/<dataset>/<metric>': value} (a `reid_jax.eval`
                                                  evaluator, handed the loop's mesh)
  task.learning_rate(step) -> float
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import ml_collections
from absl import logging
from clu import parameter_overview
from flax import nnx
from tqdm import tqdm

from reid_jax.data import device
from reid_jax.data.pipeline import Shard, close_stream
from reid_jax.errors import UserError, warn
from reid_jax.files import write_text_atomically
from reid_jax import mesh as mesh_lib
from reid_jax.train import preemption
from reid_jax.train.checkpoint import Checkpointer
from reid_jax.train.writer import MetricWriter, evaluated_steps, read_records


class Buffer(nnx.Variable):
    """Training state that is not a parameter (e.g. NAM's per-example similarity table)."""


class Trainable(nnx.Module):
    """What the optimizer updates: the model that is evaluated and exported, and training-only heads (e.g. an ID
    classifier). Parameter names (for config.optim.param_groups) start with 'model.' or 'heads.'."""

    def __init__(self, model: nnx.Module, heads: nnx.Module):
        self.model = model
        self.heads = heads


def trainable_filter(frozen: Sequence[str] = ()):
    """The nnx filter of the parameters a step updates: every nnx.Param whose dotted name in `Trainable`
    ('model.clip.text.transformer.resblocks.0.attn.in_proj.kernel') matches none of the `frozen` regexes."""
    if not frozen:
        return nnx.Param
    pattern = re.compile("|".join(f"(?:{p})" for p in frozen))
    return nnx.All(nnx.Param, lambda path, _: not pattern.search(".".join(map(str, path))))


class TrainState(nnx.Module):
    """Everything a training step changes: model, heads, optimizer (with its step count) and buffers.

    `frozen`: regexes of parameter names that stay fixed (no gradient is computed for them, no optimizer state).
    """

    def __init__(self, model: nnx.Module, tx, buffers: dict | None = None, heads: nnx.Module | None = None,
                 frozen: Sequence[str] = ()):
        self.model = model
        self.heads = heads if heads is not None else nnx.Dict()
        self.frozen = tuple(frozen)
        self.optimizer = nnx.Optimizer(self.trainable(), tx, wrt=trainable_filter(self.frozen))
        for name, value in (buffers or {}).items():
            setattr(self, name, Buffer(value))

    def trainable(self) -> Trainable:
        """What `loss_fn` of `minimize` receives: the model and the heads."""
        return Trainable(self.model, self.heads)

    def minimize(self, loss_fn):
        """One optimizer step on `loss_fn(trainable) -> (loss, aux)` over the parameters that are not frozen (no
        gradient is computed for the frozen ones); returns (loss, aux)."""
        params = self.trainable()
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable_filter(self.frozen)), has_aux=True)
        out, grads = grad_fn(params)
        self.optimizer.update(params, grads)
        return out


class TrainingDiverged(RuntimeError):
    pass


def abstract_state(state, shardings):
    """ShapeDtypeStructs of `state` carrying `shardings` (an orbax restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(float(v)) for v in metrics.values())


def _best_metric(config, results: dict) -> dict[str, float]:
    """{dataset: value of config.eval.keep_best} from 'eval/<dataset>/<metric>' results."""
    key = config.eval.keep_best
    return {k.split("/")[1]: v for k, v in results.items() if k.endswith("/" + key)}


def place_state(config: ml_collections.ConfigDict, task):
    """The task's initial state on the mesh: (mesh, graphdef, state, its shardings)."""
    mesh = mesh_lib.make_mesh(config.mesh)
    graphdef, state = nnx.split(task.init_state())
    shardings = mesh_lib.state_shardings(state, mesh, config.mesh.fsdp_min_size)
    return mesh, graphdef, jax.device_put(state, shardings), shardings


def _crash_point(name: str, step: int) -> None:
    """Fault injection for the crash tests: REID_JAX_CRASH_AT=<name>@<step> kills this process with SIGKILL (or
    sends it SIGTERM for <name> 'sigterm') when the run reaches that point. Unset in normal use."""
    if os.environ.get("REID_JAX_CRASH_AT") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGTERM if name == "sigterm" else signal.SIGKILL)


def _is_eval_step(config, task, step: int) -> bool:
    every = config.eval.every_epochs
    return bool(every) and step % (task.steps_per_epoch * every) == 0 or step == task.total_steps


def _best_so_far(config, workdir: Path, step: int) -> dict[str, float]:
    """{dataset: best config.eval.keep_best} over the evaluations recorded in metrics.jsonl up to `step`: the
    history a resumed run compares new evaluations against (the checkpoint's own record of it predates an
    evaluation of its step)."""
    best = {}
    for record in read_records(Path(workdir) / "metrics.jsonl"):
        if record.get("step", 0) > step:
            continue
        for name, value in _best_metric(config, record).items():
            best[name] = max(best.get(name, -1.0), value)
    return best


def _plain(value):
    """A config value as JSON would give it back (ConfigDicts as dicts, tuples as lists)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, (list, tuple)):
        value = [_plain(v) for v in value]
    return json.loads(json.dumps(value, default=str))


def _resume_fields(config) -> dict:
    """The settings a checkpoint's data position and step count depend on: changing them on resume would
    silently train on another stream (grain's saved position also has one layout per number of workers)."""
    return {"data.batch_size": config.data.batch_size, "seed": config.seed, "data.train": _plain(config.data.train),
            "data.num_workers": config.data.num_workers}


def _check_resume(config, meta: dict, directory: Path) -> None:
    saved = meta.get("resume")
    if not saved:  # a checkpoint from before these fields were recorded
        return
    now = _resume_fields(config)
    changed = [f"{k}: {saved[k]!r} there, {now[k]!r} now" for k in now if k in saved and saved[k] != now[k]]
    if changed:
        raise UserError(f"{directory} was trained with other settings (" + "; ".join(changed) + "). Resume with "
                        "the same values (--config.<field>=...), or start this config in a new --workdir.")


def _warn_suspicious(config, task) -> None:
    """One-line warnings for settings that work but are probably not meant."""
    total, every = task.total_steps, config.train.checkpoint_every_steps
    if every > total:
        warn(f"config.train.checkpoint_every_steps={every} is more than the run's {total} steps: nothing is saved "
             f"before the end, so a kill loses the whole run")
    if config.eval.every_epochs and config.eval.every_epochs > config.train.epochs:
        warn(f"config.eval.every_epochs={config.eval.every_epochs} is more than config.train.epochs="
             f"{config.train.epochs}: only the final evaluation runs")
    if config.data.num_workers > (os.cpu_count() or 1):
        warn(f"config.data.num_workers={config.data.num_workers} is more than this machine's {os.cpu_count()} CPUs")


def _save_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """WORKDIR/config.json: the run's config, which `reid_jax.inference.Encoder` reads to rebuild its model."""
    if jax.process_index() == 0:
        write_text_atomically(Path(workdir) / "config.json", config.to_json(indent=1) + "\n")


def _parameter_table(workdir: Path, model: nnx.Module) -> None:
    """WORKDIR/parameters.txt: every parameter of the model with its shape, dtype and size (clu's table; mean and
    std too when one process holds every array)."""
    if jax.process_index() != 0:
        return
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    table = parameter_overview.get_parameter_overview(params, include_stats=jax.process_count() == 1)
    write_text_atomically(Path(workdir) / "parameters.txt", table + "\n")


def jitted_step(config: ml_collections.ConfigDict, task, graphdef, shardings):
    """The training step `fit` runs: (state, global batch, step) -> (state, metrics), jitted, the state donated.
    The step's rng is fold_in(key(config.seed), step), so a resumed run draws what the uninterrupted one did;
    uint8 images are normalised and erased on the device first (`device.prepare_images`), for every task."""

    @partial(jax.jit, donate_argnums=0, out_shardings=(shardings, None))
    def train_step(state, batch, step):
        ts = nnx.merge(graphdef, state)
        rng = jax.random.fold_in(jax.random.key(config.seed), step)
        metrics = task.train_step(ts, device.prepare_images(batch, config.data.aug, rng), rng)
        return nnx.state(ts), metrics

    return train_step


def prefetch(iterator, mesh, depth: int = 2) -> device.DevicePrefetch:
    """(global batch on the mesh, iterator state after it) pairs, the next `depth` read and transferred in the
    background while a step runs."""
    return device.DevicePrefetch(iterator, lambda local: mesh_lib.global_batch(local, mesh), depth)


def fit(config: ml_collections.ConfigDict, workdir: Path, task) -> nnx.Module:
    """Trains `task` to config.train.epochs (resuming from workdir's newest readable checkpoint); returns the model.

    Every instant is safe to be killed at: a rerun resumes from the last checkpoint and replays identically,
    replacing what the interrupted run wrote past it (metrics records, best models); an evaluation counts as done
    only once its record is in metrics.jsonl, so one cut short is redone. SIGTERM / SIGINT end the current step,
    save it and raise `preemption.Preempted`.
    """
    with contextlib.ExitStack() as cleanup:  # a stop signal can land anywhere: what the run opens is closed
        return _fit(config, Path(workdir), task, cleanup)


def _fit(config: ml_collections.ConfigDict, workdir: Path, task, cleanup: contextlib.ExitStack) -> nnx.Module:
    _warn_suspicious(config, task)
    mesh, graphdef, state, shardings = place_state(config, task)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    iterator = iter(task.train_stream(Shard.from_jax()))
    cleanup.callback(close_stream, iterator)  # its worker processes and shared memory
    start, meta = 0, {}
    if (restored := ckpt.restore_latest(abstract_state(state, shardings))) is not None:
        start, state, data_state, meta = restored
        _check_resume(config, meta, workdir / "checkpoints")
        iterator.set_state(data_state)
        print(f"resumed from {workdir / 'checkpoints'} at step {start}", flush=True)
    # the stream's position after the last batch trained on: what a checkpoint stores (the reader runs ahead)
    consumed = {"state": iterator.get_state()}
    writer = MetricWriter(workdir, resume_step=start)
    cleanup.callback(writer.close)
    _parameter_table(workdir, nnx.merge(graphdef, state).model)
    _save_config(workdir, config)
    meta = meta | {"best": _best_so_far(config, workdir, start), "resume": _resume_fields(config)}
    best_ckpt = {p.name: Checkpointer(p, keep=1) for p in sorted((workdir / "best").glob("*")) if p.is_dir()}
    for c in best_ckpt.values():
        c.drop_after(start)  # saved by the interrupted run after `start`: the replay saves them again

    train_step = jitted_step(config, task, graphdef, shardings)
    saved = {start} if restored is not None else set()

    def settle():
        # one asynchronous save at a time across the run's checkpoint managers (the last step's best model and the
        # final checkpoint save the same step), so every process meets the multi-host barriers in one order
        for c in (ckpt, *best_ckpt.values()):
            c.wait()

    def save(step, state):
        if step not in saved:
            settle()
            ckpt.save(step, state, consumed["state"], meta)
            saved.add(step)

    if restored is None and hasattr(task, "prepare"):
        print("preparing (stages before the first step)...", flush=True)
        ts = nnx.merge(graphdef, state)
        task.prepare(ts, mesh)
        state = jax.device_put(nnx.state(ts), shardings)
        save(0, state)  # what the stages computed survives a kill before the first checkpoint

    def evaluate(step, state, guard):
        results = task.evaluate(nnx.merge(graphdef, state).model, step, workdir, mesh)
        _crash_point("evaluation", step)
        with guard():  # the saves and the record that marks the evaluation done are not cut short
            for name, value in _best_metric(config, results).items():
                if value > meta["best"].get(name, -1.0):
                    meta["best"][name] = value
                    settle()
                    best_ckpt.setdefault(name, Checkpointer(workdir / "best" / name, keep=1))
                    best_ckpt[name].save(step, nnx.state(nnx.merge(graphdef, state).model), None,
                                         {"step": step, config.eval.keep_best: value})
            settle()  # the record below marks the evaluation done: everything it produced is on disk first
            writer.write(step, results)
        _crash_point("after_evaluation", step)
        return results

    total, spe = task.total_steps, task.steps_per_epoch
    bar = tqdm(total=total, initial=start, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    t_log, last, done, batch, ahead = time.perf_counter(), start, start, None, None
    try:
        with preemption.stop_signals() as signals:
            guard = signals.deferred if signals else contextlib.nullcontext
            try:
                if restored is not None and _is_eval_step(config, task, start) and start not in evaluated_steps(
                        workdir):
                    bar.write(f"evaluating step {start}: the interrupted run had not finished this evaluation")
                    evaluate(start, state, guard)
                if start < total:  # the first batches are read and sent while the step compiles
                    ahead = prefetch(iterator, mesh)
                for step in range(start, total):
                    with guard():
                        if step and step % spe == 0 and hasattr(task, "start_epoch"):
                            # after the checkpoint of the epoch's end: a run resumed there redoes it
                            ts = nnx.merge(graphdef, state)
                            task.start_epoch(ts, mesh)
                            state = jax.device_put(nnx.state(ts), shardings)
                        batch, consumed["state"] = next(ahead)
                        if step == start:
                            bar.write("compiling the training step...")
                        state, metrics = train_step(state, batch, step)
                        done = step + 1
                        _crash_point("sigterm", done)  # arrives mid-step: the step still finishes
                        bar.update(1)
                        checkpoint_now = done % config.train.checkpoint_every_steps == 0
                        if done % config.train.log_every == 0 or done == total or checkpoint_now:
                            metrics = jax.device_get(metrics)
                            if not _finite(metrics):  # checked before any save: no checkpoint holds a diverged state
                                raise TrainingDiverged(f"non-finite training metrics at step {done}: {metrics}; the "
                                                       f"last good checkpoint in {workdir / 'checkpoints'} is kept")
                            now = time.perf_counter()
                            rate = (done - last) * config.data.batch_size / (now - t_log)
                            t_log, last = now, done
                            writer.write(done, {"train/" + k: v for k, v in metrics.items()} | {
                                "train/learning_rate": task.learning_rate(step), "train/pairs_per_s": rate,
                                "epoch": done / spe})
                            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
                        if checkpoint_now:
                            save(done, state)
                            _crash_point("checkpoint_save", done)
                    if signum := preemption.should_stop(signals, done):
                        raise preemption.Preempted(signum)
                    if _is_eval_step(config, task, done):
                        bar.write(str({k: round(v, 2) for k, v in evaluate(done, state, guard).items()}))
                if start == total:
                    logging.info("already trained to step %d", total)
                with guard():
                    save(total, state)
            except preemption.Preempted as e:
                if e.mid_step:  # a second signal cut a step short: its state is not step `done`'s
                    raise preemption.Preempted(e.signum, f"{e} during step {done + 1}; no checkpoint saved: rerun "
                                                         f"the same command to resume from the last one") from None
                save(done, state)  # the state after the last finished step: nothing done is lost
                settle()
                raise preemption.Preempted(e.signum, f"{e} at step {done} of {total}; checkpoint saved in "
                                                     f"{workdir / 'checkpoints'}: rerun the same command to resume"
                                           ) from None
    finally:
        bar.close()
        settle()
        batch = None  # the stream's shared memory is freed once no batch refers to it (close_stream)
        if ahead is not None:
            ahead.close()
    return nnx.merge(graphdef, state).model


def evaluate_only(config, workdir: Path, task) -> dict:
    """Evaluates the task's initial model (e.g. a converted CLIP checkpoint: the zero-shot baseline) at step 0."""
    mesh = mesh_lib.make_mesh(config.mesh)
    return _evaluate_and_record(workdir, task, task.init_state().model, 0, mesh)


def evaluate_checkpoint(config, workdir: Path, task) -> dict:
    """Evaluates the newest readable checkpoint in workdir (`--mode=eval`); without one, the model of
    config.init_checkpoint (step 0); UserError when there is neither."""
    workdir = Path(workdir)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    mesh, graphdef, state, shardings = place_state(config, task)
    restored = ckpt.restore_latest(abstract_state(state, shardings))
    if restored is None and config.init_checkpoint:  # e.g. an authors' released model, evaluated as it is
        print(f"no checkpoint in {workdir / 'checkpoints'}: evaluating config.init_checkpoint="
              f"{config.init_checkpoint} as step 0", flush=True)
        return _evaluate_and_record(workdir, task, nnx.merge(graphdef, state).model, 0, mesh)
    if restored is None:
        raise UserError(f"--mode=eval: no checkpoint in {workdir / 'checkpoints'}; pass the --workdir of a "
                        f"training run or a --config.init_checkpoint, or score the initial model with "
                        f"--config.train.epochs=0")
    step, state, _, _ = restored
    return _evaluate_and_record(workdir, task, nnx.merge(graphdef, state).model, step, mesh)


def _evaluate_and_record(workdir: Path, task, model, step: int, mesh) -> dict:
    writer = MetricWriter(Path(workdir))
    try:
        results = task.evaluate(model, step, Path(workdir), mesh)
        writer.write(step, results)
    finally:
        writer.close()
    return results
