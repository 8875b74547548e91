"""PyTorch CLIP checkpoints -> reid-jax CLIP parameters; the `python -m reid_jax.convert` CLI.

    python -m reid_jax.convert ViT-B-16.pt clip_b16_384x128 --image-size=384,128 [--stride=16]

SRC is an OpenAI CLIP (TorchScript archive or state dict), an open_clip state dict (.pt / .bin / .safetensors)
or a Hugging Face `CLIPModel` folder; `reid_jax.weights` reads it and maps it to our parameters, and writes and
reads the output folder (`weights.converted`). This module is the command: DST is checked before the source is
read, and written as a temporary folder beside it that replaces DST only once complete; --overwrite replaces an
earlier conversion only, never another folder.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

from reid_jax.errors import UserError, expand_path, report, warn
from reid_jax.models import posemb as posemb_lib
from reid_jax.models.clip import CLIPConfig
from reid_jax.weights import converted, released
from reid_jax.weights.converted import FORMAT, PARAMS_DIR
from reid_jax.weights.mapping import Source, describe, model_config, read_source, source_of
from reid_jax.weights.readers import CONFIG_FILE, CheckpointError


def save_converted(dst, source: Source, cfg: CLIPConfig, posemb_interpolation: str, overwrite: bool = False):
    """Writes DST = {config.json, params/ (orbax)}; DST appears only once complete (see `_staging`, `_publish`)."""
    dst = _output_path(dst)
    with _staging(dst, overwrite) as tmp:
        converted.write(tmp, source, cfg, posemb_interpolation)
        _publish(tmp, dst)
    return dst


# ------------------------------------------------------------------------------- the output folder (DST)
# A conversion is written into `.DST.tmp-<pid>-<hex>` beside DST and then swapped in; the pid in the name lets a
# later run tell the leftovers of a killed run (dead pid) from those of a run still going.
_LEFTOVER = r"\.(tmp|old)-(\d+)(?:-[0-9a-f]+)?"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _output_path(dst) -> Path:
    """DST as an absolute path; a symlink is followed, so the conversion replaces what it points to, not it."""
    path = expand_path(dst)
    if path is None:
        raise CheckpointError("DST is empty; expected the path of the output folder")
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise CheckpointError(f"DST {path}: cannot be resolved ({e}); choose another path") from None


def _check_dst(dst: Path, overwrite: bool) -> None:
    """Refuses a DST that must not or cannot be replaced, before anything is read or written."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"DST {dst}: exists and is not a folder; DST is the folder the conversion is written "
                              f"to: choose a path that does not exist yet (nothing was changed)")
    if dst.is_dir() and not overwrite:
        raise CheckpointError(f"{dst}: already exists; choose another DST or pass --overwrite (which replaces an "
                              f"earlier conversion only)")
    if dst.is_dir() and not converted.is_converted(dst):
        raise CheckpointError(f"DST {dst}: is not an earlier reid-jax conversion (no {CONFIG_FILE} with format "
                              f"{FORMAT}); --overwrite replaces only those, so it was left untouched: choose another "
                              f"DST, or move that folder away yourself")
    extra = sorted(set(os.listdir(dst)) - {CONFIG_FILE, PARAMS_DIR}) if dst.is_dir() else []
    if extra:
        raise CheckpointError(f"DST {dst}: an earlier conversion that also holds {extra[:5]}, which --overwrite "
                              f"would delete; move them out of it first (nothing was changed)")
    ancestor = dst.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointError(f"DST {dst}: {ancestor} is a file, not a folder; choose a DST under a folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def _clean_leftovers(dst: Path) -> None:
    """Removes what killed runs left beside DST; an old conversion a kill left outside DST goes back to DST."""
    if not dst.parent.is_dir():
        return
    pattern = re.compile(re.escape(f".{dst.name}") + _LEFTOVER)
    for entry in sorted(dst.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir() or _alive(int(m[2])):
            continue
        if m[1] == "old" and not dst.exists() and converted.is_converted(entry):
            entry.rename(dst)  # killed between the two renames of `_publish`'s fallback: the old one is whole
            warn(f"{dst}: restored the earlier conversion that an interrupted --overwrite had moved to {entry.name}")
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _make_parents(dst: Path) -> list[Path]:
    """Creates DST's missing parent folders; returns those created (outermost first), to undo on failure."""
    missing, folder = [], dst.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir()
    return missing[::-1]


def _make_temp(dst: Path) -> Path:
    while True:
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()  # mode 0o777 & ~umask, as mkdir(1) (tempfile.mkdtemp's 0o700 would hide it from the group)
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def _staging(dst: Path, overwrite: bool):
    """Checks DST and creates the temporary folder beside it, up front: a DST that cannot be written fails before
    the source is read. Yields the folder; on any failure it is removed with the parents it created."""
    _clean_leftovers(dst)
    _check_dst(dst, overwrite)
    created: list[Path] = []
    try:
        created = _make_parents(dst)
        tmp = _make_temp(dst)
    except OSError as e:
        _remove_created(created)
        raise CheckpointError(f"DST {dst}: cannot create it in {dst.parent} ({e.strerror}); choose a DST in a "
                              f"folder you can write to") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or file system lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another libc
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, dst: Path) -> None:
    """Moves the complete conversion `tmp` to DST. A kill at any instant leaves the old or the new one at DST:
    the swap is one atomic exchange where the OS has it; otherwise two renames, and should a kill fall between
    them, the next run puts the old conversion back (`_clean_leftovers`)."""
    if not dst.exists():
        tmp.rename(dst)
    elif _exchange(tmp, dst):
        shutil.rmtree(tmp)  # it now holds the old conversion
    else:
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        dst.rename(old)
        try:
            tmp.rename(dst)
        except BaseException:
            old.rename(dst)
            raise
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------------- CLI
def _parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.split(","))
        return h, w
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size expects H,W such as 384,128; got {text!r}") from None


def _read(src: Path, args, overrides: dict) -> tuple[Source, tuple[int, int], int]:
    """(SRC as a Source, the default input size and stride). An authors' released training checkpoint (IRRA,
    MLLM4Text-ReID, CLIP-ReID, MUVA) is read into its method's CLIP first, and defaults to its training input."""
    module, state = released.read(src) if src.is_file() else (None, None)
    if module is None:
        source = read_source(src, state)
        return source, (224, 224), source.arch["vision"]["patch_size"]
    clip = module.clip(src, state, args.image_size, args.stride, overrides)
    v = clip.config.vision
    return source_of(clip, src, module.KIND), v.image_size, v.stride


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="OpenAI .pt, open_clip .pt/.bin/.safetensors, or a Hugging Face CLIPModel folder")
    parser.add_argument("dst", help="output folder (orbax parameters + config.json)")
    parser.add_argument("--image-size", type=_parse_hw, default=None,
                        help="H,W of the ReID input (default 224,224; an authors' release: its training size)")
    parser.add_argument("--stride", type=int, default=None,
                        help="patch stride (default: the patch size; 12 = CLIP-ReID's overlap at patch 16; an "
                             "authors' release: its own)")
    parser.add_argument("--posemb-interpolation", choices=posemb_lib.METHODS, default="bilinear")
    parser.add_argument("--activation", choices=("quick_gelu", "gelu"), default=None,
                        help="override the activation (LAION open_clip models use gelu; OpenAI's quick_gelu)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is an earlier conversion (any other folder is left alone)")
    args = parser.parse_args(argv)
    try:
        src, dst = expand_path(args.src), _output_path(args.dst)
        if src is None:
            raise CheckpointError("SRC is empty; expected a CLIP checkpoint file or folder")
        with _staging(dst, args.overwrite) as tmp:  # DST is checked and claimed before the source is read
            overrides = {"activation": args.activation} if args.activation else {}
            source, size, stride = _read(src, args, overrides)
            cfg = model_config(source.arch, args.image_size or size, args.stride or stride, overrides)
            converted.write(tmp, source, cfg, args.posemb_interpolation)
            _publish(tmp, dst)
    except UserError as e:
        return report(e)
    except OSError as e:  # the disk filled, a folder vanished mid-write: DST is still the old one or absent
        return report(CheckpointError(f"DST {args.dst}: writing the conversion failed ({e}); nothing was replaced"))
    print(f"wrote {dst}: {source.kind} checkpoint, {describe(cfg)}, grid {cfg.vision.grid} "
          f"({args.posemb_interpolation} from {source.posemb_grid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
