"""Index a folder of images with a trained model, then ask it: `build(model, images, out)`, `Index.open(out)`.

    build("runs/tde", "photos/", "photos.index")             # encodes what is new, drops what was removed
    idx = Index.open("photos.index")
    idx.query(text="a woman in a red coat with a black backpack", top=10)   # -> [Hit(rank, path, score), ...]
    idx.query(image="me.jpg", top=10)

A gallery image goes through the model's own test transform (`Encoder.preprocess`: size, interpolation, mean and
std from the model) and its feature (`Encoder.image_features`) is stored L2-normalised in float16, so a query's
score is a cosine similarity. The folder's format and why a killed run loses at most one batch: `store`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import time
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from reid_jax import losses, tokenizer
from reid_jax.captioning.runner import Progress
from reid_jax.errors import UserError, expand_path, warn
from reid_jax.inference import Encoder
from reid_jax.search import images as images_lib
from reid_jax.search import store, topk
from reid_jax.search.store import IndexError_


@dataclasses.dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    path: str  # relative to the indexed folder
    score: float  # cosine similarity of the query and the gallery image's features


@dataclasses.dataclass
class BuildConfig:
    batch: int = 64  # images per device step (rounded up to a multiple of the local device count)
    workers: int = 0  # image decoding threads; 0 = one per core
    dtype: str = "auto"  # compute dtype: bfloat16 on GPU / TPU, float32 on CPU
    log_seconds: float = 30.0  # progress line period when stderr is not a terminal


# ------------------------------------------------------------------------------------------------ the model
def model_identity(encoder: Encoder, model_path: Path, dim: int) -> dict:
    """What makes two indexes comparable: the same parameters (digest) at the same input."""
    return {"source": str(model_path.resolve()), "kind": encoder.kind, "digest": encoder.digest(),
            "image_size": list(encoder.image_size), "stride": encoder.info.get("stride"),
            "interpolation": encoder.interpolation, "mean": list(encoder.mean), "std": list(encoder.std),
            "dim": dim, "text": encoder.has_text}


def _check_same_model(out: Path, stored: dict, mine: dict) -> None:
    if stored["digest"] != mine["digest"] or stored["image_size"] != mine["image_size"]:
        raise IndexError_(f"--index {out} holds features of another model ({stored['source']}, {stored['kind']}, "
                          f"input {stored['image_size']}, digest {stored['digest'][:12]}); this one is "
                          f"{mine['source']} ({mine['kind']}, input {mine['image_size']}, digest "
                          f"{mine['digest'][:12]}): features of two models are not comparable. Index into a new "
                          f"--index folder, or pass the index's own model")


def _feature_dim(encoder: Encoder) -> int:
    images = jax.ShapeDtypeStruct((1, *encoder.image_size, 3), jnp.float32)
    camids = jax.ShapeDtypeStruct((1,), jnp.int32) if encoder.num_cameras else None
    return int(jax.eval_shape(encoder.image_features_on_device, images, camids).shape[-1])


def _check_camid(encoder: Encoder, camid, what: str) -> None:
    if encoder.num_cameras and camid is None:
        raise UserError(f"{encoder.source} ({encoder.kind}) adds a camera embedding ({encoder.num_cameras} cameras) "
                        f"to every image feature: pass {what}")
    if camid is not None and not encoder.num_cameras:
        warn(f"{encoder.source} ({encoder.kind}) has no camera embedding: the camera ids are not used")
    if isinstance(camid, int) and encoder.num_cameras and not 0 <= camid < encoder.num_cameras:
        raise UserError(f"--camid {camid}: expected 0 .. {encoder.num_cameras - 1} for this model's cameras")


# ------------------------------------------------------------------------------------------------- indexing
def read_camids(path: Path | None) -> dict[str, int] | None:
    """--camids FILE: JSON {relative path: camera id}, or CSV / text lines `relative path,camera id`."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"--camids {path}: cannot read it ({e.strerror or e})") from e
    try:
        if path.suffix == ".json":
            table = json.loads(text)
            if not isinstance(table, dict):
                raise ValueError("not a JSON object")
            return {str(k): int(v) for k, v in table.items()}
        table = {}
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.startswith("#"):
                name, _, cam = line.rpartition(",")
                if not name:
                    raise ValueError(f"line {n}: {line!r} is not `path,camid`")
                table[name.strip()] = int(cam)
        return table
    except (ValueError, TypeError) as e:
        raise UserError(f"--camids {path}: {e}; expected a JSON object {{relative path: camera id}} or lines "
                        f"`relative path,camera id`") from e


class _Batcher:
    """Reads, decodes and transforms batches of images on a thread pool, one batch ahead of the device."""

    def __init__(self, encoder: Encoder, root: Path, workers: int):
        self.encoder, self.root = encoder, root
        self.pool = cf.ThreadPoolExecutor(workers or os.cpu_count() or 1)

    def _one(self, rel: str):
        try:
            image = images_lib.decode(images_lib.read_image(self.root / rel), rel)
            return self.encoder.preprocess(image), None
        except (OSError, UserError) as e:
            return None, " ".join(str(e).split())

    def submit(self, names: list[str]) -> list[cf.Future]:
        return [self.pool.submit(self._one, rel) for rel in names]

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


_ENCODE_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Encoder -> its jitted step (compiled once)


def _encode_fn(encoder: Encoder):
    """A jitted function: float32 [B, H, W, 3] (+ camids) -> float16 [B, D] unit rows, B split over the local
    devices."""
    if encoder in _ENCODE_FNS:
        return _ENCODE_FNS[encoder]
    mesh = jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices(),
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))

    @jax.jit
    def encode(images, camids):
        return losses.l2_normalize(encoder.image_features_on_device(images, camids).astype(jnp.float32)).astype(
            jnp.float16)

    def run(images: np.ndarray, camids: np.ndarray | None) -> jax.Array:
        cams = None if camids is None else jax.device_put(camids, sharding)
        return encode(jax.device_put(images, sharding), cams)

    _ENCODE_FNS[encoder] = run
    return run


def _todo(listed: dict[str, tuple[int, int]], committed: store.Rows, parts: store.Rows) -> list[str]:
    """Files listed now that no committed row or whole batch holds with their current size and mtime."""
    have = {p: committed.stat(i) for i, p in enumerate(committed.paths)}
    have.update({p: parts.stat(i) for i, p in enumerate(parts.paths)})
    return [p for p, st in listed.items() if have.get(p) != st]


def build(model, images, out, camids=None, cfg: BuildConfig = BuildConfig(), encoder: Encoder | None = None) -> dict:
    """Indexes every image under `images` into the folder `out` with the model at `model` (anything
    `Encoder.load` reads); returns a summary {images, encoded, kept, removed, skipped, indexed, seconds,
    encode_seconds (reading, decoding, encoding and writing the batches), images_per_s (of those)}."""
    t0 = time.monotonic()
    model_path, root, out = expand_path(model), expand_path(images), expand_path(out)
    names, others = images_lib.scan_images(root)
    if others:
        warn(f"--images {root}: skipped {len(others)} entries named like images that are not regular files, e.g. "
             f"{others[0]}")
    cam_table = read_camids(expand_path(camids))
    if cam_table is not None and (missing := [n for n in names if n not in cam_table]):
        raise UserError(f"--camids {camids}: no camera id for {len(missing)} of the {len(names)} images, e.g. "
                        f"{missing[0]}; give one per image (relative path under --images)")
    if out.exists() and not out.is_dir():
        raise IndexError_(f"--index {out}: a file, not a folder; pass a new or existing index folder")
    with store.locked(out):
        encoder = encoder or Encoder.load(model_path, dtype=cfg.dtype)
        _check_camid(encoder, cam_table, "each image's camera id with --camids FILE")
        if cam_table and encoder.num_cameras and (bad := {c for c in cam_table.values()
                                                          if not 0 <= c < encoder.num_cameras}):
            raise UserError(f"--camids {camids}: camera ids {sorted(bad)[:5]} outside 0 .. {encoder.num_cameras - 1}")
        dim = _feature_dim(encoder)
        identity = model_identity(encoder, model_path, dim)
        if (out / store.MODEL).exists():
            _check_same_model(out, store.read_json(out / store.MODEL), identity)
        else:
            store.write_json(out / store.MODEL, identity)
        meta = store.current(out)
        if meta is not None and Path(meta["root"]) != root.resolve():
            raise IndexError_(f"--index {out} indexes {meta['root']}, not {root.resolve()}; index this folder into a "
                              f"new --index, or pass --images {meta['root']}")
        committed = store.read_generation(out, meta) if meta else store.Rows.empty(dim)
        parts = store.read_parts(out, dim)
        listed = {n: _stat(root / n) for n in names}
        todo = _todo(listed, committed, parts)
        logging.info("index %s: %d images, %d to encode", out, len(names), len(todo))
        t_encode = time.monotonic()
        skipped = _encode_all(encoder, root, out, todo, listed, cam_table, cfg)
        t_encode = time.monotonic() - t_encode
        fresh = store.read_parts(out, dim)  # this run's batches and those of a killed run
        merged = store.merge(committed, fresh, listed, dim)
        if meta is None or fresh.paths or merged.paths != committed.paths:
            store.commit(out, merged, {"root": str(root.resolve()), "dim": dim})
        store.write_text_lines(out / store.SKIPPED, [f"{n}\t{why}" for n, why in skipped])
    seconds = time.monotonic() - t0
    summary = {"images": len(names), "encoded": len(todo) - len(skipped), "kept": len(names) - len(todo),
               "removed": len(set(committed.paths) - set(listed)), "skipped": len(skipped),
               "indexed": len(merged.paths), "seconds": round(seconds, 3), "encode_seconds": round(t_encode, 3),
               "images_per_s": round(len(todo) / t_encode, 2) if todo else None}
    if skipped:
        warn(f"skipped {len(skipped)} file(s) that are not readable images, e.g. {skipped[0][0]} ({skipped[0][1]}); "
             f"the list: {out / store.SKIPPED}")
    return summary


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


def _encode_all(encoder: Encoder, root: Path, out: Path, todo: list[str], listed: dict, cam_table, cfg):
    """Encodes `todo` batch by batch, each batch written as a part; returns the [(name, why)] skipped."""
    if not todo:
        return []
    devices = jax.local_device_count()
    batch = -(-cfg.batch // devices) * devices
    encode = _encode_fn(encoder)
    batcher = _Batcher(encoder, root, cfg.workers)
    progress = Progress(len(todo), "index", cfg.log_seconds)
    skipped = []
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    try:
        pending = batcher.submit(chunks[0])
        for i, names in enumerate(chunks):
            results = [f.result() for f in pending]
            if i + 1 < len(chunks):  # decode the next batch while this one is on the device
                pending = batcher.submit(chunks[i + 1])
            ok = [j for j, (x, _) in enumerate(results) if x is not None]
            skipped += [(names[j], results[j][1]) for j in range(len(names)) if results[j][0] is None]
            if ok:
                x = np.zeros((batch, *encoder.image_size, 3), np.float32)
                x[:len(ok)] = np.stack([results[j][0] for j in ok])
                cams = None if cam_table is None else np.zeros(batch, np.int32)
                if cams is not None:
                    cams[:len(ok)] = [cam_table[names[j]] for j in ok]
                feats = np.asarray(encode(x, cams))[:len(ok)]
                good = [names[j] for j in ok]
                store.write_part(out, good, [listed[n] for n in good], feats,
                                 np.full(len(ok), -1, np.int32) if cams is None else cams[:len(ok)])
            progress.update(len(names), len(skipped))
    finally:
        progress.close()
        batcher.close()
    return skipped


# ------------------------------------------------------------------------------------------------- querying
class Index:
    """An index folder opened for queries. Its model is loaded on the first query (or given as `encoder`)."""

    def __init__(self, out: Path, model: dict, meta: dict, rows: store.Rows, encoder: Encoder | None):
        self.out, self.model_info, self.meta, self.rows = out, model, meta, rows
        self.root = Path(meta["root"])
        self.paths = rows.paths
        self.kind, self.has_text = model["kind"], bool(model["text"])
        self._encoder = encoder

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"Index({str(self.out)!r}, {len(self)} images of {str(self.root)!r}, model {self.kind})"

    @classmethod
    def open(cls, path, model=None, encoder: Encoder | None = None) -> Index:
        """The index at `path`; `model` (a path) or `encoder`: use this model for queries instead of the one that
        built the index, which must then be the same model (same parameters and input)."""
        out = expand_path(path)
        if out is None or not (out / store.MODEL).is_file() or not (out / store.INDEX).is_file():
            raise IndexError_(f"--index {out}: not a reid-jax search index (no {store.MODEL} / {store.INDEX}); "
                              f"build one with `python -m reid_jax.search index --model PATH --images DIR --index "
                              f"{out}`")
        info, meta = store.read_json(out / store.MODEL), store.current(out)
        index = cls(out, info, meta, store.read_generation(out, meta), None)
        if model is not None or encoder is not None:
            index._use(encoder if model is None else index._load(expand_path(model)))
        return index

    def _load(self, source: Path) -> Encoder:
        """The model at `source`, at the input the index was made with."""
        return Encoder.load(source, image_size=self.model_info["image_size"], stride=self.model_info.get("stride"),
                            dtype="auto")

    def _use(self, encoder: Encoder) -> None:
        """Answers queries with `encoder`, once it is known to be the index's model."""
        _check_same_model(self.out, self.model_info, model_identity(encoder, Path(encoder.source),
                                                                    self.model_info["dim"]))
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            source = Path(self.model_info["source"])
            if not source.exists():
                raise IndexError_(f"--index {self.out}: its model {source} is gone; pass --model with the same model")
            self._use(self._load(source))
        return self._encoder

    def query_features(self, text: str | None = None, image=None, camid: int | None = None) -> np.ndarray:
        """The query's unit feature, float32 [D]."""
        if (text is None) == (image is None):
            raise UserError("give exactly one query: text (--text) or an image (--image)")
        if text is not None:
            if not self.has_text:
                raise UserError(f"this index's model ({self.kind}, {self.model_info['source']}) encodes images only: "
                                f"ask it with an image query (--image), or index with a text-image model (a CLIP or "
                                f"a TDE+NAM run) for text queries")
            feats = self.encoder.text_features(tokenizer.tokenize(text, self.encoder.context_length))
        else:
            _check_camid(self.encoder, camid, "the query image's camera id (--camid C)")
            x = self.encoder.preprocess(images_lib.load(image))[None]
            feats = self.encoder.image_features(x, None if camid is None else [camid])
        return np.asarray(losses.l2_normalize(jnp.asarray(feats[0], jnp.float32)))

    def query(self, text: str | None = None, image=None, camid: int | None = None, top: int = 10,
              backend: str = "jax") -> list[Hit]:
        """The `top` gallery images closest to a text or an image (a path, bytes, a PIL image or a uint8 array)."""
        if backend not in ("jax", "faiss"):
            raise UserError(f"--backend {backend!r}: expected 'jax' or 'faiss'")
        q = self.query_features(text, image, camid)
        if backend == "faiss":
            scores, ids = topk.faiss_top_k(self.rows.feats, q, top, self.out / self.meta["generation"] / "faiss.index")
        else:
            scores, ids = topk.top_k(self.rows.feats, q, top)
        return [Hit(r + 1, self.paths[i], float(s)) for r, (s, i) in enumerate(zip(scores[0], ids[0]))]
