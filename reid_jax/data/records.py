"""Reading records of a source (the builders' schema, data_builders/common.py): batched reads and string fields.

TFDS hands text features (captions, file names, domains) back as bytes; configs and tests hand str. `as_str`
takes either, so the code above it deals in str only.
"""

from __future__ import annotations

from collections.abc import Iterable


def read(source, ids: Iterable) -> list[dict]:
    """Records `ids` (any integers) of `source`, batched through its `__getitems__` when it has one."""
    ids = [int(i) for i in ids]
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(ids))
    return [source[i] for i in ids]


def as_str(value) -> str:
    """A text field, bytes (UTF-8) or anything else, as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
