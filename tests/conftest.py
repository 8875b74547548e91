"""Fixtures shared by the test modules, one compilation cache for the whole run, and the XLA flag it compiles with.

Many tests compile the same small steps (the tiny TDE / SCGI / MUVA models), in this process and in the training
runs they start as subprocesses. JAX's persistent cache keys a compiled executable by its program and options, so
with one cache folder for the session (inherited through the environment by pytest-xdist workers and by every
subprocess) each distinct program is compiled once. The folder is removed at the end.
"""

import atexit
import os
import shutil
import tempfile

import pytest

if "REID_JAX_TEST_CACHE" not in os.environ:  # the first pytest process of the run (xdist's controller, or the only)
    os.environ["REID_JAX_TEST_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxcache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    atexit.register(shutil.rmtree, os.environ["REID_JAX_TEST_CACHE"], ignore_errors=True)
    # XLA:CPU spends ~85 ms compiling even a one-op program (each eager op of a new shape is one), and the tests
    # compile thousands of programs for models too small for the generated code's speed to matter. XLA's older
    # loop emitters compile a small program in ~50 ms. (LLVM at -O0 would halve that again, but two compilations
    # of the same features then differed in the last bits, enough to reorder a near tie in a ranking and fail
    # the check that logged metrics are the final model's.) Set here, the flag reaches the xdist workers and
    # every subprocess a test starts; users' runs keep XLA's defaults.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false".strip()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The `small` synthetic_pedestrians set built once as TFDS array_record; tests only read it."""
    from reid_jax.data import build

    d = tmp_path_factory.mktemp("tfds")
    build.build("synthetic_pedestrians", d, config="small")
    return d
