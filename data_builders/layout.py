"""Manual-folder helpers shared by the real-dataset builders: layout checks and image listing."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from data_builders.common import ManualDirError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def require(builder, manual_dir: Path, names: Iterable[str]) -> None:
    """Raises ManualDirError naming the first of `names` (relative to manual_dir) that does not exist."""
    for name in names:
        if not (manual_dir / name).exists():
            raise ManualDirError(f"{builder.name}: {manual_dir / name} not found; the manual folder {manual_dir} "
                                 f"does not hold the expected layout (shown below)",
                                 builder.MANUAL_DOWNLOAD_INSTRUCTIONS)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def images_in(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (other files, e.g. Thumbs.db, are ignored), sorted for a stable order."""
    paths = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in paths if p.is_file() and is_image(p)), key=lambda p: p.as_posix())
