"""`python -m reid_jax.data.build NAME --data_dir=DIR [--manual_dir=DIR] [--config=NAME] [--skip_bad] [--force]`.

Turns a dataset's raw download, in the layout its authors ship, into a TFDS dataset (array_record). Run again, it
rebuilds only when the manual folder (file names, sizes, mtimes) or the options (--skip_bad, the contents of
--part_boxes, --captions and --part_masks; each --config has a folder of its own) differ from those of the build in
--data_dir, and otherwise says that it reused that build; --force rebuilds regardless. The old dataset is replaced
only once the new one is complete (data_builders/prepared.py). Path flags may hold `~` and `$VARS`. Bad input is one
line `error: ...` on stderr, exit status 2 for a bad command line and 1 for anything else (a folder, a file, an item
of the dataset).

--part_masks=FILE.pkl keeps MUVA's released pseudo masks of the train split's images beside the build
(`reid_jax.data.part_masks`); every training image must have one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tensorflow_datasets as tfds
from absl import app, flags, logging

from data_builders import BUILDERS, builder_class, prepared
from data_builders.common import ManualDirError
from reid_jax import data
from reid_jax.data import part_masks as part_masks_lib
from reid_jax.data.records import as_str
from reid_jax.errors import EXIT_USAGE, UserError, expand_path, report, warn

USAGE = ("python -m reid_jax.data.build NAME --data_dir=DIR [--manual_dir=DIR] [--config=NAME] [--skip_bad] "
         "[--force] [--part_boxes=FILE] [--captions=FILE] [--part_masks=FILE.pkl]")


class UsageError(UserError):
    """A bad command line: unknown NAME or --config, a missing flag (exit status 2)."""


def _define_flags() -> None:
    """CLI flags, defined only when run as a program so that importing `build` defines none."""
    flags.DEFINE_string("manual_dir", None, "folder holding the raw download")
    flags.DEFINE_string("data_dir", None, "where the TFDS dataset is written (required)")
    flags.DEFINE_string("config", None, "builder config (e.g. small/demo for synthetic_pedestrians)")
    flags.DEFINE_bool("skip_bad", False, "skip corrupt images and malformed entries, counting them")
    flags.DEFINE_bool("force", False, "rebuild even when the manual folder and options are those of the existing "
                      "build")
    flags.DEFINE_string("part_boxes", None, "parts.jsonl from `reid_jax.captioning ground`")
    flags.DEFINE_string("captions", None, "captions.jsonl from `reid_jax.captioning caption` (added to each image's "
                        "captions; for image-ReID sets, CLIP-SCGI's synthesized captions)")
    flags.DEFINE_string("part_masks", None, "MUVA's released pseudo masks (the authors' blobs/*.pkl) of the train "
                        "split's images")


def build(name: str, data_dir, manual_dir=None, config=None, skip_bad=False, part_boxes=None, captions=None,
          force=False, part_masks=None):
    """Builds dataset `name` into data_dir unless a build of the same inputs is there; returns the builder."""
    return prepare(name, data_dir, manual_dir, config, skip_bad, part_boxes, captions, force, part_masks)[0]


def prepare(name: str, data_dir, manual_dir=None, config=None, skip_bad=False, part_boxes=None, captions=None,
            force=False, part_masks=None):
    """`build`, returning (builder over data_dir, "built" | "rebuilt" | "reused", why it rebuilt or "")."""
    config = check_config(name, config)
    data_dir = _data_dir(data_dir)
    part_boxes, captions = _input_file("part_boxes", part_boxes), _input_file("captions", captions)
    part_masks = _input_file("part_masks", part_masks)
    b = data.builder(name, data_dir, config)
    manual_dir = _manual_dir(b, expand_path(manual_dir))
    target, dataset_dir = Path(b.data_dir), data_dir / name
    _writing(lambda: dataset_dir.mkdir(parents=True, exist_ok=True))
    prepared.recover(dataset_dir)
    # Fingerprinted before building: a file changed during the build makes the next run rebuild, never reuse.
    record = prepared.record(manual_dir, skip_bad, part_boxes, captions, exclude=data_dir)
    if part_masks is not None:  # recorded only when given: builds without it keep their records
        record["inputs"]["part_masks"] = prepared.file_digest(part_masks)
        record["paths"]["part_masks"] = str(part_masks)
    why = []
    if target.exists():
        old = prepared.read_record(target)
        why = ["--force"] if force else prepared.changes(old, record) + _part_masks_change(old, record)
        if not why:
            return data.builder(name, data_dir, config), "reused", ""
    staging = _writing(lambda: prepared.new_staging(dataset_dir))
    try:
        staged = _build_into(staging, name, config, manual_dir, skip_bad, part_boxes, captions)
        if part_masks is not None:
            _store_part_masks(staging, staged, name, config, part_masks)
        prepared.write_record(staged, record)
        prepared.install(staged, target, staging)
    finally:
        prepared.remove(staging)
    return data.builder(name, data_dir, config), "rebuilt" if why else "built", "; ".join(why)


def _build_into(staging: Path, name, config, manual_dir, skip_bad, part_boxes, captions) -> Path:
    """TFDS builds under `staging` (a data dir of its own); -> the finished version folder there."""
    b = data.builder(name, staging, config, skip_bad=skip_bad, part_boxes=part_boxes, captions=captions)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual_dir) if manual_dir else None))
    return Path(b.data_dir)


def _part_masks_change(old: dict | None, new: dict) -> list[str]:
    was = ((old or {}).get("inputs") or {}).get("part_masks")
    now = new["inputs"].get("part_masks")
    if was == now or old is None:
        return []
    if was and now:
        return ["the --part_masks file changed"]
    return [f"--part_masks was {'given' if was else 'not given'}, now {'given' if now else 'not given'}"]


def _store_part_masks(staging: Path, staged: Path, name: str, config, pkl: Path) -> None:
    """The pkl's masks of the staged build's train split, written into its version folder."""
    b = data.builder(name, staging, config)
    if part_masks_lib.SPLIT not in b.info.splits:
        raise UserError(f"--part_masks: {name} has no {part_masks_lib.SPLIT!r} split (it has "
                        f"{sorted(b.info.splits)}); the masks are for a ReID training set")
    source = data.load_source(name, part_masks_lib.SPLIT, staging, config, decode_image=False)
    names = [as_str(source[i]["file_name"]) for i in range(len(source))]
    count = part_masks_lib.store(staged, pkl, names)
    logging.info("%s: part masks of %d training images stored from %s", name, count, pkl)


# ------------------------------------------------------------------------------------------- input checks
def check_config(name: str, config: str | None) -> str | None:
    """The config name, checked against NAME's configs (UsageError listing the valid ones)."""
    if name not in BUILDERS:
        raise UsageError(f"unknown dataset {name!r}; NAME is one of {', '.join(sorted(BUILDERS))}")
    names = [c.name for c in builder_class(name).BUILDER_CONFIGS]
    if not config or config in names:
        return config or None
    if not names:
        raise UsageError(f"{name} has no configs, so --config={config} means nothing; drop --config")
    raise UsageError(f"unknown --config={config} for {name}; expected one of {', '.join(names)}")


def _data_dir(data_dir) -> Path:
    path = expand_path(data_dir)
    if path is None:
        raise UsageError(f"--data_dir is required: the folder TFDS datasets are written to (e.g. --data_dir=~/tfds); "
                         f"usage: {USAGE}")
    if path.exists() and not path.is_dir():
        raise UserError(f"--data_dir={path} is a file; expected a folder to write TFDS datasets into")
    return path


def _input_file(flag: str, text) -> Path | None:
    path = expand_path(text)
    if path is not None and not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        if flag == "part_masks":
            raise UserError(f"--part_masks={path} is {what}; expected the authors' pseudo-mask .pkl of this dataset")
        source = "`python -m reid_jax.captioning ground`" if flag == "part_boxes" else \
            "`python -m reid_jax.captioning caption`"
        raise UserError(f"--{flag}={path} is {what}; expected the JSONL file written by {source}")
    if path is not None:
        try:
            path.open("rb").close()
        except OSError as e:
            raise UserError(f"--{flag}={path} cannot be read ({e.strerror}); check its permissions") from None
    return path


def _manual_dir(b, path: Path | None) -> Path | None:
    """The manual folder, checked to be a non-empty folder (ManualDirError with the dataset's instructions)."""
    if not b._needs_manual_dir():
        if path is not None:
            warn(f"{b.name} draws its own images; --manual_dir={path} is ignored")
        return None
    problem = None
    if path is None:
        problem = "needs --manual_dir, the folder holding the raw download"
    elif path.exists() and not path.is_dir():
        problem = f"the manual folder {path} is a file; pass --manual_dir=the folder the download unzips to"
    elif not path.is_dir() or _empty(path):
        problem = f"the manual folder {path} is missing or empty"
    if problem:
        raise ManualDirError(f"{b.name}: {problem} (where to get the data and its expected layout follow)",
                             b.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return path


def _empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError as e:
        raise ManualDirError(f"the manual folder {folder} cannot be read ({e.strerror}); check its permissions") \
            from None


def _writing(make):
    """Runs `make()`, which creates something under --data_dir, turning an OSError into a one-line error."""
    try:
        return make()
    except OSError as e:
        raise UserError(f"cannot write under --data_dir ({e.strerror}: {e.filename}); pass a --data_dir you can "
                        f"write to") from None


# --------------------------------------------------------------------------------------------------- CLI
def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag a usage error (one line, exit status 2) instead of absl's status 1."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(report(UsageError(f"{e}; usage: {USAGE}"), EXIT_USAGE))


def _report(e: UserError) -> int:
    if isinstance(e, UsageError):
        return report(e, EXIT_USAGE)
    if isinstance(e, ManualDirError):  # the error on one line, then where to get the data and its layout
        status = report(UserError(e.message))
        print(e.instructions, file=sys.stderr)
        return status
    return report(e)


def main(argv):
    f = flags.FLAGS
    try:
        if len(argv) != 2:
            raise UsageError(f"expected one dataset NAME, got {len(argv) - 1} arguments {argv[1:]}; "
                             f"usage: {USAGE}; NAME is one of {', '.join(sorted(BUILDERS))}")
        b, outcome, why = prepare(argv[1], f.data_dir, f.manual_dir, f.config, f.skip_bad, f.part_boxes,
                                  f.captions, f.force, f.part_masks)
    except UserError as e:
        return _report(e)
    counts = ", ".join(f"{k} {v.num_examples}" for k, v in b.info.splits.items())
    logging.info("%s %s", outcome, b.data_dir)
    if outcome == "reused":
        print(f"reused the existing build of {argv[1]} at {b.data_dir} ({counts}): its manual folder and options "
              f"are unchanged; pass --force to rebuild it")
    else:
        print(f"{outcome} {argv[1]} -> {b.data_dir}: {counts}" + (f" (because {why})" if why else ""))
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
