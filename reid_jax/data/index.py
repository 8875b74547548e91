"""Per-split metadata (pids, cameras, caption counts, domains) read once without decoding images, and cached.

Samplers, relabelling and the per-caption example space need this for every record; reading it through the
TFDS source with the image left encoded is cheap, and the result is cached beside the dataset as
`reid_jax_index-<split>.npz` (written to a temporary name, then renamed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reid_jax import files
from reid_jax.data.records import as_str


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    pids: np.ndarray  # int64 [N], the dataset's own ids
    camids: np.ndarray  # int64 [N], -1 without cameras
    num_captions: np.ndarray  # int32 [N]
    domains: np.ndarray  # str [N]

    def __len__(self) -> int:
        return len(self.pids)

    @classmethod
    def scan(cls, records: Sequence[dict]) -> SplitIndex:
        """Reads every record's metadata (pass a source whose images are not decoded for speed)."""
        pids, camids, ncap, domains = [], [], [], []
        for r in records:
            pids.append(int(r["pid"]))
            camids.append(int(r["camid"]))
            ncap.append(len(r["captions"]))
            domains.append(as_str(r["domain"]))
        return cls(np.asarray(pids, np.int64), np.asarray(camids, np.int64), np.asarray(ncap, np.int32),
                   np.asarray(domains, dtype=str))

    def save(self, path: Path) -> None:
        files.write_atomically(path, lambda tmp: np.savez(tmp, **dataclasses.asdict(self)))

    @classmethod
    def load(cls, path: Path) -> SplitIndex:
        with np.load(path) as f:
            return cls(**{k.name: f[k.name] for k in dataclasses.fields(cls)})

    def subset(self, domains: Sequence[str] | None = None) -> np.ndarray:
        """Record indices [M] whose domain is in `domains` (all when None)."""
        keep = np.ones(len(self), bool) if not domains else np.isin(self.domains, list(domains))
        return np.flatnonzero(keep)


def relabel(pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pids [N] -> (labels [N] in 0..C-1 by sorted pid, the C unique pids)."""
    unique, labels = np.unique(pids, return_inverse=True)
    return labels.astype(np.int32), unique


def split_index(name: str, split: str, data_dir, config: str | None = None) -> SplitIndex:
    """The cached SplitIndex of a built dataset split (scanned on first use)."""
    from reid_jax import data

    source = data.load_source(name, split, data_dir, config, decode_image=False)
    path = Path(data.builder(name, data_dir, config).data_dir) / f"reid_jax_index-{split}.npz"
    if path.exists():
        return SplitIndex.load(path)
    index = SplitIndex.scan(source)
    index.save(path)
    return index
