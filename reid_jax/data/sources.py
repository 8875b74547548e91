"""Random-access views over dataset sources: a subset of one source's records, and several sources end to end.

Multi-source training (MUVA's domain generalisation: Market-1501 + MSMT17 + CUHK03-NP train splits, tested on an
unseen dataset) and domain-restricted training (some visual domains of one dataset) read through these views.
A source is a random-access sequence of records in the builders' schema (see data_builders/common.py) that may
offer `__getitems__(ids)` for batched reads; every view here is one too, so the grain pipelines take it as is.

Every view comes with a matching `SplitIndex` (`subset_index`, `concat_index`): record i of the view has exactly
the metadata row i of its index, so the samplers never need to scan the view.

Concatenation keeps identities and cameras of different sources apart: the records of source k get
`pid + offsets_pid[k]` and `camid + offsets_cam[k]`, offsets being the cumulative (max pid + 1) and
(max camid + 1) of the sources before it. Negative values (camid -1 = no camera; a negative pid = junk) stay as
they are. With `labels`, every record's `domain` becomes its source's label, so domain-aware code can tell the
sources apart.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from reid_jax.data.index import SplitIndex
from reid_jax.data.records import as_str, read


def _record_ids(records, n: int, what: str) -> np.ndarray:
    """records -> int64 [M], checked to lie in 0..n-1."""
    records = np.asarray(records)
    if records.ndim != 1:
        raise ValueError(f"{what}: records must be a 1-D array of record ids, got shape {records.shape}")
    if records.size == 0:
        return records.astype(np.int64)
    if not np.issubdtype(records.dtype, np.integer):
        raise ValueError(f"{what}: records must be integer record ids, got dtype {records.dtype}")
    records = records.astype(np.int64)
    bad = records[(records < 0) | (records >= n)]
    if bad.size:
        raise ValueError(f"{what}: record ids {bad[:5].tolist()} are outside 0..{n - 1} "
                         f"(the base holds {n} records)")
    return records


def _position(i, n: int, what: str) -> int:
    """A Python sequence index (negative counts from the end) -> 0..n-1, or IndexError."""
    i = operator.index(i)
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise IndexError(f"{what} index {i} out of range for {n} records")
    return j


# --------------------------------------------------------------------------------------------------- subset
class SubsetSource(Sequence):
    """Records `records` of `source`, in that order: view[i] = source[records[i]].

    Args:
      source: a random-access source (len, [i], optionally __getitems__).
      records: int [M] record ids of `source` (repeats allowed).
    """

    def __init__(self, source, records):
        self.source = source
        self.records = _record_ids(records, len(source), "SubsetSource")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i) -> dict:
        return self.source[int(self.records[_position(i, len(self), "SubsetSource")])]

    def __getitems__(self, ids: Sequence[int]) -> list[dict]:
        n = len(self)
        return read(self.source, [int(self.records[_position(i, n, "SubsetSource")]) for i in ids])

    def __repr__(self) -> str:
        return f"SubsetSource({len(self)} of {len(self.source)} records of {self.source!r})"


def subset_index(index: SplitIndex, records) -> SplitIndex:
    """The SplitIndex of `SubsetSource(source, records)` given `index` of `source`: every field at `records` [M]."""
    records = _record_ids(records, len(index), "subset_index")
    return SplitIndex(index.pids[records], index.camids[records], index.num_captions[records],
                      index.domains[records])


# ------------------------------------------------------------------------------------------------ concatenate
def offsets(indexes: Sequence[SplitIndex]) -> tuple[np.ndarray, np.ndarray]:
    """(pid offsets int64 [S], camid offsets int64 [S]): cumulative (max + 1) over the previous sources, counting
    only non-negative ids (a source without cameras, or an empty one, adds nothing)."""
    def span(values: np.ndarray) -> int:
        values = values[values >= 0]
        return int(values.max()) + 1 if values.size else 0

    pid = np.cumsum([0] + [span(np.asarray(ix.pids)) for ix in indexes[:-1]]).astype(np.int64)
    cam = np.cumsum([0] + [span(np.asarray(ix.camids)) for ix in indexes[:-1]]).astype(np.int64)
    return pid, cam


def _shift(values: np.ndarray, offset: int) -> np.ndarray:
    return np.where(values >= 0, values + offset, values).astype(np.int64)


def _check_labels(labels, count: int, what: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)):
        raise TypeError(f"{what}: labels must be one string per source, got the single string {labels!r}")
    labels = [as_str(lb) for lb in labels]
    if len(labels) != count:
        raise ValueError(f"{what}: {len(labels)} labels {labels} for {count} sources")
    return labels


def concat_index(indexes: Sequence[SplitIndex], labels: Sequence[str] | None = None) -> SplitIndex:
    """The SplitIndex of `ConcatSource(sources, indexes, labels)`: the indexes end to end [sum N_k], pids and
    camids shifted by `offsets(indexes)`, domains replaced by each source's label when `labels` is given."""
    indexes = list(indexes)
    if not indexes:
        raise ValueError("concat_index: no indexes to concatenate")
    labels = _check_labels(labels, len(indexes), "concat_index")
    off_pid, off_cam = offsets(indexes)
    domains = [np.asarray(ix.domains, dtype=str) if labels is None else np.full(len(ix), labels[k], dtype=object)
               for k, ix in enumerate(indexes)]
    return SplitIndex(
        np.concatenate([_shift(np.asarray(ix.pids), off_pid[k]) for k, ix in enumerate(indexes)]),
        np.concatenate([_shift(np.asarray(ix.camids), off_cam[k]) for k, ix in enumerate(indexes)]),
        np.concatenate([np.asarray(ix.num_captions, np.int32) for ix in indexes]),
        np.concatenate(domains).astype(str))


class ConcatSource(Sequence):
    """Several sources end to end, identities and cameras kept apart.

    Record i of the view is record i - starts[k] of source k (starts = cumulative lengths), returned as a shallow
    copy with pid + offsets_pid[k], camid + offsets_cam[k] (negative ids kept) and, with `labels`, domain =
    labels[k] (bytes, like the TFDS text fields).

    Args:
      sources: S random-access sources.
      indexes: S SplitIndex, indexes[k] describing sources[k] (the offsets come from their pids / camids).
      labels: optional S strings, one domain label per source.
    """

    def __init__(self, sources: Sequence, indexes: Sequence[SplitIndex], labels: Sequence[str] | None = None):
        self.sources = list(sources)
        indexes = list(indexes)
        if not self.sources:
            raise ValueError("ConcatSource: no sources to concatenate")
        if len(indexes) != len(self.sources):
            raise ValueError(f"ConcatSource: {len(indexes)} indexes for {len(self.sources)} sources")
        for k, (s, ix) in enumerate(zip(self.sources, indexes)):
            if len(s) != len(ix):
                raise ValueError(f"ConcatSource: source {k} has {len(s)} records but its index {len(ix)}")
        self.labels = _check_labels(labels, len(self.sources), "ConcatSource")
        self._domains = None if self.labels is None else [lb.encode() for lb in self.labels]
        self.offsets_pid, self.offsets_cam = offsets(indexes)
        self.starts = np.cumsum([0] + [len(s) for s in self.sources]).astype(np.int64)  # [S + 1]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i) -> tuple[int, int]:
        """Record i of the view -> (source k, record id in source k)."""
        i = _position(i, len(self), "ConcatSource")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def _convert(self, k: int, rec: dict) -> dict:
        out = dict(rec)
        pid, cam = int(rec["pid"]), int(rec["camid"])
        out["pid"] = np.int64(pid + self.offsets_pid[k] if pid >= 0 else pid)
        out["camid"] = np.int64(cam + self.offsets_cam[k] if cam >= 0 else cam)
        if self._domains is not None:
            out["domain"] = self._domains[k]
        return out

    def __getitem__(self, i) -> dict:
        k, j = self.locate(i)
        return self._convert(k, self.sources[k][j])

    def __getitems__(self, ids: Sequence[int]) -> list[dict]:
        """One batched read per source touched; records come back in the order of `ids`."""
        where = [self.locate(i) for i in ids]
        out: list[dict | None] = [None] * len(where)
        for k in sorted({k for k, _ in where}):
            positions = [p for p, (kk, _) in enumerate(where) if kk == k]
            for p, rec in zip(positions, read(self.sources[k], [where[p][1] for p in positions])):
                out[p] = self._convert(k, rec)
        return out

    def __repr__(self) -> str:
        sizes = [len(s) for s in self.sources]
        return f"ConcatSource({len(self)} records: {sizes}, labels={self.labels})"


class PartBoxesSource:
    """`source` with every record's part_boxes replaced by row i of `boxes` [N, 3, 4] (simulated grounding)."""

    def __init__(self, source, boxes: np.ndarray):
        self.source, self.boxes = source, boxes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return dict(self.source[i], part_boxes=self.boxes[i])

    def __getitems__(self, ids) -> list[dict]:
        return [dict(r, part_boxes=self.boxes[i]) for r, i in zip(read(self.source, list(ids)), ids)]
