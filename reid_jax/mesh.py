"""Device mesh ('data', 'fsdp'), parameter and batch shardings, and host batches -> global arrays.

The global batch is split over both axes; a parameter is split over 'fsdp' along its largest axis that divides
evenly once it has at least `fsdp_min_size` elements (small ones, LayerNorms and biases, stay replicated).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from reid_jax import errors

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when the environment describes a multi-process run (a cluster launcher, or
    JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID for a hand-started one)."""
    cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"))
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    elif cluster and int(os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "2"))) > 1:
        jax.distributed.initialize()
    else:
        return
    logging.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count())


def make_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """cfg.fsdp devices per model shard (1 = pure data parallelism); the rest of the devices go to 'data'."""
    n = jax.device_count()
    fsdp = cfg.fsdp
    if n % fsdp:
        raise errors.ConfigError(f"config.mesh.fsdp={fsdp} does not divide the {n} devices")
    # Auto axes: XLA propagates shardings through the step (gathers from the NAM table, losses over the batch).
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=auto)


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """Shard the largest evenly divisible axis over 'fsdp' when the array is large enough."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            return P(*([None] * axis), "fsdp")
    return P()


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, min_size: int):
    """NamedShardings for every array of a (abstract) state pytree."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp, min_size)), abstract_state)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: dict, mesh: jax.sharding.Mesh) -> dict:
    """This process's rows of a global batch (numpy) -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def gather(x: jax.Array) -> np.ndarray:
    """A global array -> the full numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
