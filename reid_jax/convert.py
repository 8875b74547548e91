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
import os
import sys
from pathlib import Path

from reid_jax import files
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
# A conversion is written into `.DST.tmp-<pid>-<hex>` beside DST and then swapped in (`reid_jax.files`).


def _output_path(dst) -> Path:
    """DST as an absolute path; a symlink is followed, so the conversion replaces what it points to, not it."""
    return files.resolved_output(dst, "DST", "the output folder", CheckpointError)


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


def _staging(dst: Path, overwrite: bool):
    """Checks DST and creates the temporary folder beside it, up front: a DST that cannot be written fails before
    the source is read. A context manager yielding the folder; on any failure it is removed with the parents it
    created."""
    if restored := files.clean_leftovers(dst, converted.is_converted):
        warn(f"{dst}: restored the earlier conversion that an interrupted --overwrite had moved to {restored.name}")
    _check_dst(dst, overwrite)
    return files.staged_folder(dst, lambda e: CheckpointError(
        f"DST {dst}: cannot create it in {dst.parent} ({e.strerror}); choose a DST in a folder you can write to"))


def _publish(tmp: Path, dst: Path) -> None:
    """Moves the complete conversion `tmp` to DST (`files.publish_folder`: a kill leaves the old or the new one)."""
    files.publish_folder(tmp, dst)


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
