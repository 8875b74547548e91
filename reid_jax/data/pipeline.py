"""grain input pipelines: training streams and deterministic evaluation batches.

Every stream is a grain `MapDataset` whose elements are *host batches*: the slice of one global batch that this
process feeds (multi-host runs assemble the global batch with `jax.make_array_from_process_local_data`). All
randomness comes from (seed, position in the stream), so a stream is identical for any number of worker processes
and hosts, and its iterator state (`get_state` / `set_state`) resumes mid-epoch.

Streams:
  * `pairs_train`: image-caption pairs (text-to-image); one caption drawn per image visit
    (`caption_mode='random'`) or one example per caption (`'all'`);
  * `pk_train`: image ReID with identity-balanced batches, P identities x K images;
  * `eval_images` / `eval_captions`: fixed order, the tail padded, `valid` marks real rows.

Batch fields: image uint8 [B, H, W, 3] (resized, flipped, cropped: `config.data.aug.on_device`, the default) or
float32 [B, H, W, 3] (normalised and erased on the host), erase int32 [B, 4] (training with on_device: each
example's erasing rectangle top, left, height, width; height 0 = none), resample_rows int32 [B, H, 2, K] and
resample_cols int32 [B, W, 2, K] (training with resize_on_device, the default: image then holds each example's
source image at the top-left of its row, for the device to resize, flip and crop), text int32 [B, L], pid int32 [B]
(contiguous training label; the dataset's own id in evaluation), camid int32 [B], part_boxes float32 [B, 3, 4],
index int32 [B] (the example id: stable across epochs, for per-example state such as NAM's similarity table),
image_index int32 [B] (record id), valid bool [B] (evaluation). uint8 images become the float32 ones on the device:
`reid_jax.data.device.prepare_images` (in the jitted training step and `reid_jax.eval.encode.encode_stream`).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import grain
import ml_collections
import numpy as np
from absl import flags

from reid_jax import tokenizer
from reid_jax.data import transforms
from reid_jax.data.records import as_str, read
from reid_jax.data.index import SplitIndex, relabel


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's share of every global batch: rows [index * B / count, (index + 1) * B / count)."""
    index: int = 0
    count: int = 1

    @classmethod
    def from_jax(cls) -> Shard:
        import jax

        return cls(jax.process_index(), jax.process_count())

    def rows(self, global_batch: int) -> slice:
        if global_batch % self.count:
            raise ValueError(f"global batch {global_batch} is not divisible by {self.count} processes")
        n = global_batch // self.count
        return slice(self.index * n, (self.index + 1) * n)


# ------------------------------------------------------------------------------------------ example spaces
def caption_examples(num_captions: np.ndarray, records: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(record id [E], caption id [E]) of each example: one per record with caption -1 (= draw one at each visit)
    for mode 'random', one per caption for 'all'. Records without captions are left out."""
    records = records[num_captions[records] > 0]
    if mode == "random":
        return records, np.full(len(records), -1, np.int64)
    if mode == "all":
        counts = num_captions[records]
        return np.repeat(records, counts), np.concatenate([np.arange(c) for c in counts]) if len(counts) else records
    raise ValueError(f"caption_mode must be 'random' or 'all', got {mode!r}")


def pk_batch(groups: Sequence[np.ndarray], p: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """P identities drawn without replacement, K records each (with replacement only if it has fewer): [P*K]."""
    chosen = rng.choice(len(groups), size=p, replace=False)
    return np.concatenate([rng.choice(groups[c], size=k, replace=len(groups[c]) < k) for c in chosen])


def identity_walk(groups: Sequence[np.ndarray], p: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch of CLIP-ReID's identity sampler: [num_batches, P*K] record ids.

    Each identity's records are shuffled and cut into chunks of K (an identity with fewer than K records is first
    drawn up to K with replacement; a last incomplete chunk is dropped); then, while P identities still hold
    chunks, P of them are drawn without replacement and each gives its next chunk. Every record appears at most
    once per epoch, and all but the few left over at the end do.
    """
    chunks = []
    for g in groups:
        idx = rng.permutation(g if len(g) >= k else rng.choice(g, size=k, replace=True))
        chunks.append(list(idx[: len(idx) // k * k].reshape(-1, k)))
    available, batches = [c for c in range(len(groups)) if chunks[c]], []
    while len(available) >= p:
        chosen = rng.choice(available, size=p, replace=False)
        batches.append(np.concatenate([chunks[c].pop(0) for c in chosen]))
        available = [c for c in available if chunks[c]]
    return np.stack(batches) if batches else np.zeros((0, p * k), np.int64)


class _Walks:
    """The batches of consecutive identity walks, epoch after epoch, by global batch number; each epoch's walk
    depends only on (seed, epoch), so any batch is found again after a restart (exact resume)."""

    def __init__(self, groups, p: int, k: int, seed: int):
        self.groups, self.p, self.k, self.seed = groups, p, k, seed
        self.starts, self.epochs = [0], []  # first batch number of each epoch computed so far; their walks

    def __call__(self, b: int) -> np.ndarray:
        while b >= self.starts[-1]:
            epoch = len(self.epochs)
            walk = identity_walk(self.groups, self.p, self.k, np.random.default_rng([self.seed, epoch]))
            if not len(walk):
                raise ValueError(f"config.data.pk: no batch of {self.p} identities x {self.k} images can be formed")
            self.epochs.append(walk)
            self.starts.append(self.starts[-1] + len(walk))
        epoch = int(np.searchsorted(self.starts, b, side="right")) - 1
        return self.epochs[epoch][b - self.starts[epoch]]

    def length(self, num_epochs: int | None) -> int:
        """Batches in `num_epochs` walks (None: endless)."""
        if num_epochs is None:
            return _ENDLESS
        if num_epochs > 0:
            self(0)
            while len(self.epochs) < num_epochs:
                self(self.starts[-1])
        return self.starts[num_epochs] if num_epochs > 0 else 0


_ENDLESS = 1 << 40  # batches of an endless walk stream (grain datasets have a length)
SAMPLERS = ("walk", "random")


# ----------------------------------------------------------------------------------------------- loading
def _example_rngs(seed: int, positions: np.ndarray) -> list[np.random.Generator]:
    """One generator per stream position: augmentation independent of batch slicing, hosts and workers."""
    return [np.random.default_rng([seed, int(p)]) for p in positions]


def on_device(aug: ml_collections.ConfigDict) -> bool:
    """Whether the device normalises and erases (`config.data.aug.on_device`; configs saved before the field
    existed: the host, as then)."""
    return bool(aug.get("on_device", False))


def resize_on_device(aug: ml_collections.ConfigDict) -> bool:
    """Whether the device also resizes, flips and crops training images (`config.data.aug.resize_on_device`, with
    on_device; configs saved before the field existed: the host)."""
    return on_device(aug) and bool(aug.get("resize_on_device", False))


class _Augmented:
    """The augmented images of one batch as they are made, and their fields: image, part_boxes and, when the
    device normalises, erase; when it resizes too, the resampling tables (`resample_rows`, `resample_cols`).
    uint8 images (or sources) go straight into one preallocated [B, H, W, 3] array."""

    def __init__(self, aug: ml_collections.ConfigDict, size: int):
        self.aug, self.uint8, self.sources = aug, on_device(aug), resize_on_device(aug)
        alloc = np.zeros if self.sources else np.empty  # a source fills only the top-left of its row
        self.images = alloc((size, *aug.image_size, 3), np.uint8) if self.uint8 else []
        self.boxes, self.erase = [], np.zeros((size, 4), np.int32)
        self.tables = []

    def add(self, rec: dict, rng: np.random.Generator, draws_follow: bool) -> None:
        """Augments `rec`'s image with `rng`; `draws_follow`: something is drawn from `rng` afterwards."""
        boxes = np.asarray(rec["part_boxes"])
        i = len(self.boxes)
        if self.sources:
            boxes, self.erase[i], *tables = transforms.train_transform_source(
                rec["image"], boxes, self.aug, rng, out=self.images[i], draws_follow=draws_follow)
            self.tables.append(tables)
        elif self.uint8:
            _, boxes, self.erase[i] = transforms.train_transform_uint8(rec["image"], boxes, self.aug, rng,
                                                                       out=self.images[i], draws_follow=draws_follow)
        else:
            image, boxes = transforms.train_transform(rec["image"], boxes, self.aug, rng)
            self.images.append(image)
        self.boxes.append(boxes)

    def fields(self) -> dict:
        images = self.images if self.uint8 else np.stack(self.images)
        out = {"image": images, "part_boxes": np.stack(self.boxes)} | ({"erase": self.erase} if self.uint8 else {})
        if self.sources:
            out |= {"resample_rows": np.stack([t[0] for t in self.tables]),
                    "resample_cols": np.stack([t[1] for t in self.tables])}
        return out


def image_words(captions: Sequence[str], context_length: int, width: int) -> np.ndarray:
    """The distinct word tokens of all of an image's captions, sorted and 0-padded: int32 [width] (the words
    the image is known to show, for `losses.word_match`)."""
    ids = tokenizer.tokenize(list(captions), context_length)
    words = np.unique(ids[tokenizer.is_word(ids)])
    if len(words) > width:
        raise ValueError(f"config.data.image_words = {width} is too small: the captions of one image hold "
                         f"{len(words)} distinct tokens; raise it to at least {len(words)}")
    return np.pad(words, (0, width - len(words))).astype(np.int32)


class Swaps(NamedTuple):
    """config.data.swap_words as token ids, group after group: ids [S], and each word's group as the place of its
    first word in `ids` (start [S]) and its number of words (size [S]). A word swaps only within its group."""
    ids: np.ndarray
    start: np.ndarray
    size: np.ndarray

    @property
    def picks(self) -> int:
        """The range of the `pick` draws: each group's number of other words divides it, so that
        `pick % (size - 1)` is uniform in every group (one group of S words: S - 1, as a plain list always drew)."""
        return math.lcm(*(self.size - 1).tolist())


def swap_groups(words: Sequence) -> list[tuple[str, ...]]:
    """config.data.swap_words -> its groups: a tuple of words is one group; a tuple of tuples, one group each."""
    if all(isinstance(w, str) for w in words):
        return [tuple(words)]
    if all(isinstance(g, (tuple, list)) and all(isinstance(w, str) for w in g) for g in words):
        return [tuple(g) for g in words]
    raise ValueError(f"config.data.swap_words must be a tuple of words, or a tuple of groups (tuples of words) "
                     f"that each swap among themselves; got {words!r}")


def swap_table(words: Sequence) -> Swaps:
    """The token ids of config.data.swap_words by group; each word must be one BPE token, each group hold at least
    two words and no word be in two groups."""
    groups = swap_groups(words)
    flat = [w for g in groups for w in g]
    ids = [tokenizer.encode([w])[0] for w in flat]
    split = [w for w, i in zip(flat, ids) if len(i) != 1]
    if split:
        raise ValueError(f"config.data.swap_words: {split} are not single tokens (a swap replaces one token by "
                         f"another); leave them out")
    if any(len(g) < 2 for g in groups):
        raise ValueError(f"config.data.swap_words needs at least two words to swap between in each group, got "
                         f"{[list(g) for g in groups]}")
    twice = sorted({w for w in flat if flat.count(w) > 1})
    if twice:
        raise ValueError(f"config.data.swap_words: {twice} are in more than one group (or twice in one); a word "
                         f"swaps within its one group")
    starts = np.cumsum([0] + [len(g) for g in groups[:-1]])
    return Swaps(np.asarray([i[0] for i in ids], np.int32),
                 np.repeat(starts, [len(g) for g in groups]).astype(np.int32),
                 np.repeat([len(g) for g in groups], [len(g) for g in groups]).astype(np.int32))


def swap_token_ids(words: Sequence) -> np.ndarray:
    """The token id of each word of config.data.swap_words (see swap_table), all groups together: int [S]."""
    return swap_table(words).ids


def swap_words(ids: np.ndarray, swaps: Swaps, chance: np.ndarray, pick: np.ndarray, prob: float) -> np.ndarray:
    """Replaces each token of `ids` [B, L] that is one of `swaps.ids`, where `chance` [B, L] (uniform in [0, 1))
    is below `prob`, by another word of its group: the one `1 + pick % (size - 1)` places further round the group
    (`pick`: int in [0, swaps.picks), [B, L]), never itself. -> [B, L]; the word term's in-context negatives
    (losses.own_word_match)."""
    where = (ids[..., None] == swaps.ids).argmax(-1)  # [B, L]: the token's place in swaps.ids (0 if not one)
    start, size = swaps.start[where], swaps.size[where]
    other = swaps.ids[start + (where - start + 1 + pick % (size - 1)) % size]
    return np.where(np.isin(ids, swaps.ids) & (chance < prob), other, ids).astype(ids.dtype)


def _load_pairs(source, examples, labels, cfg, seed: int, swaps: Swaps | None, items: np.ndarray) -> dict:
    """[B, 2] (stream position, example id) -> a batch of augmented images and one tokenised caption each, plus
    `image_words` [B, W] (every caption's words, see image_words) when cfg.image_words = W > 0, and
    `swapped_text` [B, L] (the caption with some of `swaps` swapped, see swap_words) when cfg.swap_prob > 0."""
    positions, ids = items[:, 0], items[:, 1]
    record_ids, caption_ids = examples[0][ids], examples[1][ids]
    width, swap_prob = cfg.get("image_words", 0), cfg.get("swap_prob", 0.0)
    images, captions, shown, draws = _Augmented(cfg.aug, len(ids)), [], [], []
    for rec, cap, rng in zip(read(source, record_ids), caption_ids, _example_rngs(seed, positions)):
        images.add(rec, rng, draws_follow=cap < 0 or bool(swap_prob))
        cap = int(rng.integers(len(rec["captions"]))) if cap < 0 else cap
        captions.append(as_str(rec["captions"][cap]))
        if width:
            shown.append(image_words([as_str(c) for c in rec["captions"]], cfg.context_length, width))
        if swap_prob:  # drawn last: the image and the caption do not change with the swap
            draws.append((rng.random(cfg.context_length), rng.integers(swaps.picks, size=cfg.context_length)))
    text = tokenizer.tokenize(captions, cfg.context_length)
    batch = images.fields() | {"text": text, "pid": labels[record_ids],
                               "index": ids.astype(np.int32), "image_index": record_ids.astype(np.int32)}
    if width:
        batch["image_words"] = np.stack(shown)
    if swap_prob:
        chance, pick = (np.stack(d) for d in zip(*draws))
        batch["swapped_text"] = swap_words(text, swaps, chance, pick, swap_prob)
    return batch


def _load_images(source, labels, cfg, seed: int, captions: bool, items: np.ndarray) -> dict:
    """[B, 2] (stream position, record id) -> a batch of augmented images (image ReID), with one tokenised caption
    drawn per image visit if `captions`."""
    positions, record_ids = items[:, 0], items[:, 1]
    images, camids, texts = _Augmented(cfg.aug, len(record_ids)), [], []
    for rec, rng in zip(read(source, record_ids), _example_rngs(seed, positions)):
        images.add(rec, rng, draws_follow=captions)
        camids.append(rec["camid"])
        if captions:
            texts.append(as_str(rec["captions"][int(rng.integers(len(rec["captions"])))]))
    batch = images.fields() | {"pid": labels[record_ids], "camid": np.asarray(camids, np.int32),
                               "index": record_ids.astype(np.int32), "image_index": record_ids.astype(np.int32)}
    return batch | ({"text": tokenizer.tokenize(texts, cfg.context_length)} if captions else {})


def _train_labels(index: SplitIndex, records: np.ndarray) -> np.ndarray:
    """Contiguous labels 0..C-1 over the training records' pids (-1 for records outside them): [N]."""
    labels = np.full(len(index), -1, np.int32)
    labels[records] = relabel(index.pids[records])[0]
    return labels


def _exit_with_parent(worker: int, num_workers: int) -> None:
    """Runs in each grain worker: exit as soon as the process that started it is gone (killed with -9, say), so
    no worker (hundreds of MB each) or the resource tracker they keep alive outlives a run."""
    del worker, num_workers
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def close_stream(iterator) -> None:
    """Stops a stream's worker processes and frees the shared memory its batches came through. grain frees a
    batch's shared memory from a background thread once the batch is garbage; waiting for that thread here keeps
    the interpreter's exit from finding (and reporting) them leaked. Drop your references to batches first."""
    if hasattr(iterator, "close"):
        iterator.close()
    gc.collect()
    from grain._src.python.ipc import shared_memory_array  # grain has no public handle on this thread pool

    pool = shared_memory_array.SharedMemoryArray._del_thread_pool
    if pool is not None:
        shared_memory_array.SharedMemoryArray._disable_async_del()  # later frees run at once
        pool.close()
        pool.join()


def _to_iter(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    ds = ds.to_iter_dataset()
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers), worker_init_fn=_exit_with_parent)
    return ds


def _counted(ds: grain.MapDataset, num_workers: int, aug: ml_collections.ConfigDict | None = None
             ) -> grain.IterDataset:
    """An evaluation stream that knows its length (`num_batches`, for progress bars) and, when its images are
    uint8, the `aug` config that normalises them on the device (`aug`, else None)."""
    it = _to_iter(ds, num_workers)
    it.num_batches = len(ds)
    it.aug = aug
    return it


# ----------------------------------------------------------------------------------------------- training
def pairs_train(source, index: SplitIndex, cfg: ml_collections.ConfigDict, *, seed: int,
                shard: Shard = Shard()) -> grain.IterDataset:
    """Shuffled image-caption pairs; `cfg` is config.data (batch_size global, caption_mode, context_length,
    num_epochs (None = forever), num_workers, aug, optional image_words, swap_prob and swap_words)."""
    return _to_iter(pairs_batches(source, index, cfg, seed=seed, shard=shard), cfg.num_workers)


def pairs_batches(source, index: SplitIndex, cfg: ml_collections.ConfigDict, *, seed: int,
                  shard: Shard = Shard()) -> grain.MapDataset:
    """`pairs_train`'s host batches by number, made in the calling thread when indexed (`bench data --inline`)."""
    records = np.arange(len(index))
    examples = caption_examples(index.num_captions, records, cfg.caption_mode)
    labels = _train_labels(index, records)
    rows = shard.rows(cfg.batch_size)
    ds = grain.MapDataset.range(len(examples[0])).shuffle(seed=seed).repeat(cfg.num_epochs)
    ds = ds.map_with_index(lambda position, example: (position, example))
    ds = ds.batch(cfg.batch_size, drop_remainder=True, batch_fn=lambda xs: np.asarray(xs)[rows])
    swaps = swap_table(cfg.swap_words) if cfg.get("swap_prob", 0.0) else None  # a bad word fails here
    return ds.map(partial(_load_pairs, source, examples, labels, cfg, seed, swaps))


def pk_train(source, index: SplitIndex, cfg: ml_collections.ConfigDict, *, seed: int, shard: Shard = Shard(),
             captions: bool = False) -> grain.IterDataset:
    """Identity-balanced batches of P x K images. `cfg.pk.sampler`: 'walk' = CLIP-ReID's sampler, every image
    once per epoch (`identity_walk`; an epoch is then a little under len(records) // (P * K) batches), 'random' =
    P random identities per batch, len(records) // (P * K) batches an epoch. `captions`: add one of each image's
    captions, drawn per visit (`text`, int32 [B, cfg.context_length])."""
    records = np.arange(len(index))
    if captions and np.any(index.num_captions[records] == 0):
        missing = int(np.sum(index.num_captions[records] == 0))
        raise ValueError(f"{missing} of the {len(records)} training images have no caption; build the dataset with "
                         f"captions (`python -m reid_jax.data.build NAME ... --captions=captions.jsonl`)")
    labels = _train_labels(index, records)
    order = np.argsort(labels[records], kind="stable")
    groups = np.split(records[order], np.flatnonzero(np.diff(labels[records][order])) + 1)
    p, k = cfg.pk.identities, cfg.pk.instances
    if p > len(groups):
        raise ValueError(f"config.data.pk.identities={p} but the training set has only {len(groups)} identities")
    batch = p * k
    rows = shard.rows(batch)
    sampler = cfg.pk.get("sampler", "random")
    if sampler == "walk":
        walks = _Walks(groups, p, k, seed)
        ds = grain.MapDataset.range(walks.length(cfg.num_epochs)).map(walks)
    elif sampler == "random":
        ds = grain.MapDataset.range(max(1, len(records) // batch)).repeat(cfg.num_epochs)
        ds = ds.random_map(lambda _, rng: pk_batch(groups, p, k, rng), seed=seed)
    else:
        raise ValueError(f"config.data.pk.sampler must be one of {SAMPLERS}, got {sampler!r}")
    ds = ds.map_with_index(lambda b, ids: np.stack([b * batch + np.arange(batch), ids], axis=1)[rows])
    ds = ds.map(partial(_load_images, source, labels, cfg, seed, captions))
    return _to_iter(ds, cfg.num_workers)


# --------------------------------------------------------------------------------------------- evaluation
def _eval_positions(n: int, batch_size: int, shard: Shard) -> grain.MapDataset:
    """Host batches of positions over 0..n-1 in order; the global tail is padded with -1."""
    global_batch = batch_size * shard.count
    num_batches = -(-n // global_batch)
    padded = np.full(num_batches * global_batch, -1, np.int64)
    padded[:n] = np.arange(n)
    rows = shard.rows(global_batch)
    return grain.MapDataset.range(num_batches).map(lambda b: padded[b * global_batch: (b + 1) * global_batch][rows])


def eval_images(source, cfg: ml_collections.ConfigDict, *, batch_size: int, shard: Shard = Shard(),
                num_workers: int = 0) -> grain.IterDataset:
    """Every record once, in order: image (resized; normalised too unless `config.data.aug.on_device`, whose uint8
    images the stream's `aug` normalises on the device), pid, camid and part boxes as stored, valid."""
    uint8 = on_device(cfg.aug)

    def images(recs) -> np.ndarray:
        if not uint8:
            return np.stack([transforms.eval_transform(r["image"], cfg.aug) for r in recs])
        out = np.empty((len(recs), *cfg.aug.image_size, 3), np.uint8)
        for row, r in zip(out, recs):
            row[...] = transforms.eval_resize(r["image"], cfg.aug)
        return out

    def load(positions):
        valid = positions >= 0
        ids = np.where(valid, positions, 0)
        recs = read(source, ids)
        return {"image": images(recs),
                "pid": np.asarray([r["pid"] for r in recs], np.int32),
                "camid": np.asarray([r["camid"] for r in recs], np.int32),
                "part_boxes": np.stack([np.asarray(r["part_boxes"], np.float32) for r in recs]),
                "image_index": ids.astype(np.int32), "valid": valid}

    return _counted(_eval_positions(len(source), batch_size, shard).map(load), num_workers,
                    cfg.aug if uint8 else None)


def eval_captions(source, index: SplitIndex, cfg: ml_collections.ConfigDict, *, batch_size: int,
                  shard: Shard = Shard()) -> grain.IterDataset:
    """Every caption once, in order: text int32 [B, L], pid (the dataset's), image_index, valid.

    Pass a source opened with `decode_image=False`: only the captions are read.
    """
    rec_of, cap_of = caption_examples(index.num_captions, np.arange(len(index)), "all")

    def load(positions):
        valid = positions >= 0
        safe = np.where(valid, positions, 0)
        recs = read(source, rec_of[safe])
        captions = [as_str(r["captions"][c]) for r, c in zip(recs, cap_of[safe])]
        return {"text": tokenizer.tokenize(captions, cfg.context_length),
                "pid": index.pids[rec_of[safe]].astype(np.int32), "image_index": rec_of[safe].astype(np.int32),
                "valid": valid}

    return _counted(_eval_positions(len(rec_of), batch_size, shard).map(load), 0)
