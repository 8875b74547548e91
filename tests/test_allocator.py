"""The CPU entry points' malloc settings (`reid_jax.allocator`): when they apply, and the re-execution in place."""

import json
import os
import subprocess
import sys

from reid_jax import allocator


def test_the_settings_apply_on_cpu_only_and_never_over_the_users_own():
    cpu = {"JAX_PLATFORMS": "cpu", "PATH": "/bin"}
    assert allocator.wanted(cpu) == cpu | allocator.SETTINGS
    assert allocator.wanted({"JAX_PLATFORMS": "cpu,cuda"}) is not None
    assert allocator.wanted({"JAX_PLATFORMS": "cuda,cpu"}) is None  # an accelerator computes
    assert allocator.wanted({"JAX_PLATFORMS": "tpu"}) is None
    assert allocator.wanted(cpu | {"REID_JAX_MALLOC": "0"}) is None  # opted out
    assert allocator.wanted(cpu | {"MALLOC_ARENA_MAX": "4"}) is None  # the user's own malloc settings stand
    assert allocator.cpu_only({"JAX_PLATFORMS": " cpu "})


def _allocator_report(env: dict) -> tuple[int, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "reid_jax.allocator"], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return proc.pid, json.loads(out)


def test_the_entry_point_restarts_itself_in_place_under_the_settings():
    env = {k: v for k, v in os.environ.items() if k not in allocator.SETTINGS} | {"JAX_PLATFORMS": "cpu"}
    env.pop(allocator.OPT_OUT, None)
    pid, report = _allocator_report(env)
    assert report["pid"] == pid  # the same process (exec), so a scheduler's signals still reach it
    assert report["settings"] == allocator.SETTINGS | {allocator.OPT_OUT: None}
    pid, report = _allocator_report(env | {allocator.OPT_OUT: "0"})
    assert all(report["settings"][k] is None for k in allocator.SETTINGS)
