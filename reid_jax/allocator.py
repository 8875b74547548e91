"""Host memory for XLA:CPU: keep the step's scratch memory mapped between steps.

XLA:CPU allocates one scratch buffer per execution of a compiled program (2.1 GB for the ViT-B/16 + text training
step at batch 8) from a worker thread and frees it at the end. glibc serves an allocation that large with a fresh
`mmap` and returns it with `munmap`, so every step faults in half a million 4 KB pages again (about 1 s of kernel
time per 6 s step on a 2-core EPYC) and, right after another process has churned memory, even more (3.6-4.7 s with
transparent huge pages). With one malloc arena, no `mmap` for large blocks and no trimming of the heap's top,
glibc keeps the block after the first step and hands it back on the next: no page faults at all.

The entry points that run steps (`reid_jax.main`, `reid_jax.bench`, `reid_jax.ablate`) call `reexec` first
thing: when the process will compute on the CPU and the settings are not in place yet, it replaces itself (same
pid, same arguments) with the same command under them; glibc reads them only at start-up. Skipped on machines
with an accelerator (the scratch memory is the device's there, and one arena would serialise the input threads'
allocations), where the user set any of the variables already, and with REID_JAX_MALLOC=0.
`python -m reid_jax.allocator` prints what applies here.
"""

from __future__ import annotations

import glob
import json
import os
import sys

SETTINGS = {  # glibc's malloc tunables (mallopt(3)), as environment variables
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main heap, which can grow to any size
    "MALLOC_MMAP_MAX_": "0",  # large blocks come from that heap too, not from a fresh mmap each time
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),  # and freed memory at its top stays mapped for the next step
}
OPT_OUT = "REID_JAX_MALLOC"


def cpu_only(environ) -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS names cpu first, or (unset) the machine shows no NVIDIA,
    TPU or other accelerator device file."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*"))


def wanted(environ) -> dict[str, str] | None:
    """The environment to re-execute under, or None when nothing should change."""
    if (environ.get(OPT_OUT) == "0" or not sys.platform.startswith("linux") or any(k in environ for k in SETTINGS)
            or not cpu_only(environ)):
        return None
    return dict(environ) | SETTINGS


def reexec(module: str) -> None:
    """Replaces this process with `python -m module <same arguments>` under `SETTINGS` when `wanted` says so;
    returns otherwise. Call it before anything else runs (no threads, no open work): nothing survives the exec."""
    env = wanted(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


if __name__ == "__main__":
    reexec("reid_jax.allocator")
    print(json.dumps({"cpu_only": cpu_only(os.environ), "pid": os.getpid(),
                      "settings": {k: os.environ.get(k) for k in (*SETTINGS, OPT_OUT)}}))
