"""orbax checkpoints of the whole training state: model, optimizer, step, NAM table (anything in the nnx state),
plus the data iterator's state and a JSON of bookkeeping. Saved asynchronously; restored straight onto the mesh
from an abstract, sharded state. Arrays are stored under dotted names ('model.visual.proj')."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from reid_jax.errors import UserError, warn


def _flat(tree) -> dict[str, object]:
    return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: dict[str, object], like: dict) -> dict:
    keys = {".".join(map(str, k)): k for k in traverse_util.flatten_dict(like)}
    return traverse_util.unflatten_dict({keys[name]: v for name, v in flat.items()})


class Checkpointer:
    """`directory/<step>/{state, data, meta}`; keeps the newest `keep`."""

    def __init__(self, directory: Path, keep: int = 2, async_save: bool = True):
        # orbax names its multi-host barriers after the step folder ('async_write_complete.18'): without a prefix of
        # its own, this manager and another saving the same step (a best-model one) would share barriers
        prefix = re.sub(r"\W", "_", "_".join(Path(directory).absolute().parts[-2:]))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix))
        # handlers named up front: a fresh process can then read a step's metadata before restoring it
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def drop_after(self, step: int) -> None:
        """Deletes the checkpoints past `step`: written by an interrupted run after the step it resumes from, they
        are replayed (identically), and a replay must not meet its own earlier save."""
        for s in self.manager.all_steps():
            if s > step:
                self.manager.delete(s)

    def save(self, step: int, state: nnx.State, data_state: dict | None, meta: dict) -> None:
        """Saves `step` (asynchronously); a checkpoint already at `step` (a replay's) is replaced."""
        if step in self.manager.all_steps():
            self.wait()
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flat(nnx.to_pure_dict(state))),
            data=ocp.args.JsonSave(data_state or {}), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract: nnx.State) -> tuple[nnx.State, dict, dict]:
        """`abstract`: the state's ShapeDtypeStructs carrying their target shardings."""
        like = nnx.to_pure_dict(abstract)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_flat(like)), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        state = jax.tree.map(lambda x: x, abstract)
        nnx.replace_by_pure_dict(state, _unflat(out.state, like))
        return state, dict(out.data or {}), dict(out.meta or {})

    def check_fits(self, step: int, abstract: nnx.State) -> None:
        """Raises UserError when checkpoint `step` holds other arrays (names or shapes) than `abstract`: the run was
        started with another architecture or method (a config change, not damage; nothing is deleted)."""
        saved = {k: tuple(v.shape) for k, v in self.manager.item_metadata(step)["state"].items()}
        want = {k: tuple(v.shape) for k, v in _flat(nnx.to_pure_dict(abstract)).items()}
        problems = [f"{k}: saved {list(saved[k])}, this config {list(v)}" for k, v in want.items()
                    if k in saved and saved[k] != v]
        problems += [f"{k} missing from the checkpoint" for k in want if k not in saved]
        problems += [f"{k} not in this config's model" for k in saved if k not in want]
        if problems:
            directory = self.manager.directory
            raise UserError(f"{directory}/{step} was written by a run with another model or method ("
                            + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3
                                                         else "")
                            + "). Resume with the config that run used, or start this config in a new --workdir.")

    def restore_latest(self, abstract: nnx.State) -> tuple[int, nnx.State, dict, dict] | None:
        """(step, state, data state, meta) of the newest checkpoint that reads back, or None when there is none.

        Checkpoints newer than the one that reads back are damaged (a kill or a full disk mid-write): each is moved
        to `<directory>/../corrupt_checkpoints/` with a one-line warning. When none reads back nothing is moved
        and UserError says why; one written for another model raises UserError.
        """
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self.check_fits(step, abstract)
                state, data, meta = self.restore(step, abstract)
            except UserError:
                raise
            except Exception as e:  # orbax raises many types for damaged files
                failed.append((step, e))
                continue
            for bad, error in failed:
                self._set_aside(bad, error)
            return step, state, data, meta
        if failed:
            step, e = failed[0]
            raise UserError(f"no checkpoint in {self.manager.directory} reads back (step {step}: {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); move the folder away to start afresh")
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        directory = Path(self.manager.directory)
        aside = directory.parent / "corrupt_checkpoints" / f"{directory.name}-{step}"
        reason = " ".join(str(error).split())[:200]
        warn(f"checkpoint {directory / str(step)} is damaged ({type(error).__name__}: {reason}); moved to {aside}; "
             f"resuming from the previous one")
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(aside, ignore_errors=True)
            (directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
