"""orbax checkpoints of the whole training state: model, optimizer, step, NAM table (anything in the nnx state),
plus the data iterator's state and a JSON of bookkeeping. Saved asynchronously; restored straight onto the mesh
from an abstract, sharded state. Arrays are stored under dotted names ('model.visual.proj')."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util


def _flat(tree) -> dict[str, object]:
    return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: dict[str, object], like: dict) -> dict:
    keys = {".".join(map(str, k)): k for k in traverse_util.flatten_dict(like)}
    return traverse_util.unflatten_dict({keys[name]: v for name, v in flat.items()})


class Checkpointer:
    """`directory/<step>/{state, data, meta}`; keeps the newest `keep`."""

    def __init__(self, directory: Path, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: nnx.State, data_state: dict | None, meta: dict) -> None:
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
