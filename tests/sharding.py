"""One check every method's trainer passes: its step on 8 simulated CPU devices (mesh data=4 x fsdp=2, large
parameters sharded over fsdp) equals the same step on one device, in loss and parameters, over 3 steps.

Runs in a subprocess: the 8 CPU devices must be configured before JAX starts."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from flax import nnx
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.numerics import assert_close
    from {config_module} import {config_fn} as make_config
    from reid_jax import mesh as mesh_lib
    from reid_jax.train import {task_module} as task_lib
    from reid_jax.data import device
    from reid_jax.data.pipeline import Shard

    config = make_config({data_dir!r})
    config.mesh.fsdp = 2
    task = task_lib.Task(config, Path({workdir!r}))
    it = iter(task.train_stream(Shard()))
    batches = [next(it) for _ in range(3)]
    graphdef, state0 = nnx.split(task.init_state())

    def step(state, batch, i):
        ts = nnx.merge(graphdef, state)
        rng = jax.random.fold_in(jax.random.key(0), i)
        metrics = task.train_step(ts, device.prepare_images(batch, config.data.aug, rng), rng)
        return nnx.state(ts), metrics

    def params(state):
        flat = nnx.to_flat_state(nnx.state(nnx.merge(graphdef, state), nnx.Param))
        return {{".".join(map(str, k)): np.array(v[...]) for k, v in flat}}  # copies: state0 is donated later

    params_0 = params(state0)

    # one device
    cpu0 = jax.devices()[0]
    single = jax.jit(step)
    state = jax.device_put(state0, cpu0)
    losses_1 = []
    for i, b in enumerate(batches):
        state, m = single(state, jax.device_put(b, cpu0), i)
        losses_1.append(float(m["loss"]))
    params_1 = params(state)

    # 8 devices, mesh data=4 x fsdp=2, large parameters sharded over fsdp
    mesh = mesh_lib.make_mesh(config.mesh)
    assert dict(mesh.shape) == {{"data": 4, "fsdp": 2}}
    shardings = mesh_lib.state_shardings(state0, mesh, config.mesh.fsdp_min_size)
    sharded = jax.jit(step, out_shardings=(shardings, None), donate_argnums=0)
    state = jax.device_put(state0, shardings)
    n_split = sum(1 for s in jax.tree.leaves(shardings) if "fsdp" in str(s.spec))
    assert n_split > 0
    losses_8 = []
    for i, b in enumerate(batches):
        state, m = sharded(state, mesh_lib.global_batch(b, mesh), i)
        losses_8.append(float(m["loss"]))
    params_8 = params(state)
    assert_close(losses_8, losses_1, 1e-5, "losses")  # float32 rounding of values near 10-100
    # Parameters are compared on the scale of how far the step moved them, not of their values (LayerNorm
    # scales near 1 next to 1e-3 steps): a wrong update is then as visible as a wrong loss.
    assert params_8.keys() == params_1.keys()
    moved = max(float(np.abs(params_1[k] - params_0[k]).max()) for k in params_1)
    worst = max(assert_close(params_8[k], params_1[k], {rtol}, k, scale=moved) for k in params_1)
    print("OK", n_split, losses_1, moved, worst)
""")


def assert_sharded_step_equals_single(config_module: str, config_fn: str, task_module: str, data_dir, workdir,
                                      rtol: float = 2e-3) -> str:
    """`config_module.config_fn(data_dir)` builds the config; `reid_jax.train.<task_module>.Task` the task.

    Losses agree to 1e-5 of their value; every parameter to `rtol` of the largest change the 3 single-device steps
    made to any parameter (tests/numerics.py). The gradients' summation order differs between the two, and Adam
    turns a gradient's rounding into an update difference of up to lr x rounding / eps for gradients near eps, so
    the parameters agree less closely than the losses: 1e-4 to 2.4e-4 of the movement at lr 1e-4 (MUVA with XLA's
    default, AVX2 and SSE4.2 kernels; TDE-NAM with the default and AVX2 ones)."""
    script = SCRIPT.format(root=str(ROOT), config_module=config_module, config_fn=config_fn,
                           task_module=task_module, data_dir=str(data_dir), workdir=str(workdir), rtol=rtol)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.startswith("OK")
    return run.stdout
