"""The input pipeline's device end: uint8 images resized, flipped, cropped, normalised and erased on the
accelerator, and the next batches put on the devices while the current step runs.

`prepare_images` finishes what `transforms.train_transform_uint8` / `eval_resize` left undone on the host
(`config.data.aug.on_device`): uint8 [B, H, W, 3] -> float32 (x / 255 - mean) / std, and each example's erasing
rectangle (`erase`, from the host's draws) painted with the configured fill. With `resize_on_device` the uint8
images are the decoded sources and `resample` first applies PIL's resize with the flip and crop folded in, from
per-image tables (`reid_jax.data.resample`): the host then only decodes. It runs inside the jitted training step
and before the image encoders of evaluation, so the host sends a quarter of the bytes and does no float work.

`DevicePrefetch` runs `next(iterator)` and the host-to-device transfer of the next batches in a background thread,
and hands each batch over with the iterator state that follows it: a checkpoint stores the position of the
batches actually trained on, not of those read ahead.
"""

from __future__ import annotations

import queue
import threading

import jax
import jax.numpy as jnp
import ml_collections

from reid_jax.data import resample as resample_tables
from reid_jax.data import transforms

# fold_in(step rng, ERASE_NOISE) keys the 'random' fill's noise: a constant no split of the step rng reaches (fold_in
# with a small number equals one of split(rng, n)'s keys), so the tasks' own draws from the step rng are unchanged
ERASE_NOISE = 0x45524153


RESAMPLE_FIELDS = ("resample_rows", "resample_cols")


def prepare_images(batch: dict, aug: ml_collections.ConfigDict, rng: jax.Array | None = None) -> dict:
    """`batch` with uint8 'image' [B, H, W, 3] -> float32 normalised with `aug.mean_std`, each row's 'erase'
    rectangle (int32 [B, 4] top, left, height, width; height 0 = none; the field is dropped) filled with
    `aug.erase_fill`: 'mean' the mean vector in normalised units, 'zero' 0, 'random' N(0, 1) per pixel from
    fold_in(rng, ERASE_NOISE). With 'resample_rows' / 'resample_cols' (`aug.resize_on_device`; dropped too) the
    uint8 images are sources still to resize, flip and crop (`resample`) first. A float 'image' (normalised on
    the host) passes through unchanged."""
    image = batch["image"]
    if image.dtype != jnp.uint8:
        return batch
    if "resample_rows" in batch:
        image = resample(image, batch["resample_rows"], batch["resample_cols"])
    mean, std = (jnp.asarray(v, jnp.float32) for v in transforms.MEANS_STDS[aug.mean_std])
    x = (image.astype(jnp.float32) / 255.0 - mean) / std  # the host's `transforms.normalize`, op for op
    out = {k: v for k, v in batch.items() if k not in ("erase", *RESAMPLE_FIELDS)}
    if "erase" in batch:
        x = _erase(x, batch["erase"], aug, rng, mean)
    return out | {"image": x}


def resample(image: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """PIL's two-pass resize (with the flip and crop folded in) from tables (`reid_jax.data.resample.tables`):
    uint8 sources image [B, h, w, C] (each at the top-left of its row), rows int32 [B, H, 2, K], cols int32
    [B, W, 2, K] -> uint8 [B, H, W, C]. Integer sums as PIL's, so the same bytes."""
    def one(x, rows, cols):
        x = x.astype(jnp.int32)
        across = _round(sum(x[:, cols[:, 0, k]] * cols[None, :, 1, k, None] for k in range(cols.shape[-1])))
        return _round(sum(across[rows[:, 0, k]] * rows[:, 1, k, None, None] for k in range(rows.shape[-1])))
    return jax.vmap(one)(image, rows, cols).astype(jnp.uint8)


def _round(total: jax.Array) -> jax.Array:
    """A pass's fixed-point sums -> pixel values: + 1/2, drop the fraction bits, clip to [0, 255]."""
    bits = resample_tables.PRECISION_BITS
    return jnp.clip((total + (1 << (bits - 1))) >> bits, 0, 255)


def _erase(x: jax.Array, erase: jax.Array, aug, rng, mean: jax.Array) -> jax.Array:
    """x [B, H, W, C] with rectangles erase [B, 4] (top, left, height, width) set to the fill."""
    if aug.erase_fill not in transforms.ERASE_FILLS:
        raise ValueError(f"config.data.aug.erase_fill must be one of {transforms.ERASE_FILLS}, "
                         f"got {aug.erase_fill!r}")
    top, left, height, width = (erase[:, i, None] for i in range(4))
    rows, cols = jnp.arange(x.shape[1]), jnp.arange(x.shape[2])
    in_rows = (rows >= top) & (rows < top + height)  # [B, H]
    in_cols = (cols >= left) & (cols < left + width)  # [B, W]
    inside = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]  # [B, H, W, 1]
    if aug.erase_fill == "random":
        if rng is None:
            raise ValueError("prepare_images: erase_fill='random' needs the step's rng")
        fill = jax.random.normal(jax.random.fold_in(rng, ERASE_NOISE), x.shape, jnp.float32)
    elif aug.erase_fill == "zero":
        fill = jnp.zeros((), jnp.float32)
    else:  # 'mean': IRRA's RandomErasing(value=mean) after Normalize
        fill = mean
    return jnp.where(inside, fill, x)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetch:
    """Iterates (device batch, iterator state after it) over `put(next(iterator))`, `depth` batches read ahead
    in a background thread while the caller computes. `iterator` needs get_state (a grain iterator); an exception
    of `next(iterator)` or `put` (a crashed worker, StopIteration at the end) is raised by the `next` call that
    would have returned that batch. `close()` stops the thread (it is a daemon: a killed process leaves none)."""

    def __init__(self, iterator, put, depth: int = 2):
        self._iterator, self._put = iterator, put
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                host = next(self._iterator)
                state = self._iterator.get_state()  # after exactly the batches handed out so far, this one too
                item = (self._put(host), state)
                del host
                if not self._offer(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._offer(_Failed(e))

    def _offer(self, item) -> bool:
        """Puts `item` in the queue unless closed first (False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, _Failed):
            self._queue.put(item)  # every later call fails the same way
            raise item.error
        return item

    def close(self, timeout_s: float = 60.0) -> None:
        """Stops reading ahead and drops the batches read ahead (their device memory and, for grain's worker
        processes, their shared memory go with them). Waits up to `timeout_s` for a `next(iterator)` in progress."""
        self._stop.set()
        self._drain()
        self._thread.join(timeout_s)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
