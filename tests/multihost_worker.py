"""One process of a training run, for test_train's two-process test (not collected by pytest).

usage: python tests/multihost_worker.py DATA_DIR WORKDIR OUT.npz [PROCESS_ID NUM_PROCESSES PORT]
With a process id, the run joins a `jax.distributed` job on 127.0.0.1 with gloo CPU collectives (2 CPU devices per
process); process 0 writes the trained parameters to OUT.npz.
"""

import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    data_dir, workdir, out = sys.argv[1:4]
    if len(sys.argv) > 4:
        pid, count, port = (int(x) for x in sys.argv[4:7])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_num_cpu_devices", 2)
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=pid)
    import numpy as np
    from flax import nnx

    sys.path.insert(0, str(ROOT))
    from reid_jax import mesh as mesh_lib
    from reid_jax.train import loop, tde_nam
    from tests.test_train import tiny_config

    config = tiny_config(data_dir, epochs=1)
    model = loop.fit(config, Path(workdir), tde_nam.Task(config, Path(workdir)))
    params = [mesh_lib.gather(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    if jax.process_index() == 0:
        np.savez(out, *params)
