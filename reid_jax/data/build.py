"""`python -m reid_jax.data.build NAME --data_dir=DIR [--manual_dir=DIR] [--config=NAME] [--skip_bad] [--force]`,
or for your own dataset `python -m reid_jax.data.build manifest --manifest=FILE.csv|FILE.jsonl --data_dir=DIR
[--name=NAME]`.

Turns a dataset's raw download, in the layout its authors ship, into a TFDS dataset (array_record). Run again, it
rebuilds only when the manual folder (file names, sizes, mtimes) or the options (--skip_bad, the contents of
--part_boxes, --captions and --part_masks; each --config has a folder of its own) differ from those of the build in
--data_dir, and otherwise says that it reused that build; --force rebuilds regardless. The old dataset is replaced
only once the new one is complete (data_builders/prepared.py). Path flags may hold `~` and `$VARS`. Bad input is one
line `error: ...` on stderr, exit status 2 for a bad command line and 1 for anything else (a folder, a file, an item
of the dataset).

--part_masks=FILE.pkl keeps MUVA's released pseudo masks of the train split's images beside the build
(`reid_jax.data.part_masks`); every training image must have one.

A manifest dataset (data_builders/manifest/) is named by --name (default: the manifest's file stem), its builder
config: it lands in DATA_DIR/manifest/NAME/ and a dataset spec opens it as {name: 'manifest', config: NAME}. Its
build is redone when the manifest's contents or any image it names (path, size, mtime) change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tensorflow_datasets as tfds
from absl import app, flags, logging

from data_builders import BUILDERS, builder_class, prepared
from data_builders.common import ManualDirError
from data_builders.manifest import reader as manifest_lib
from reid_jax import data
from reid_jax.data import part_masks as part_masks_lib
from reid_jax.data.records import as_str
from reid_jax.errors import EXIT_USAGE, UserError, expand_path, report, warn

USAGE = ("python -m reid_jax.data.build NAME --data_dir=DIR [--manual_dir=DIR] [--config=NAME] [--skip_bad] "
         "[--force] [--part_boxes=FILE] [--captions=FILE] [--part_masks=FILE.pkl]; for your own dataset NAME is "
         "manifest, with --manifest=FILE.csv|FILE.jsonl [--name=NAME] instead of --manual_dir and --config")
MANIFEST = "manifest"  # the builder of your own datasets


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
    flags.DEFINE_string("manifest", None, "NAME manifest: your dataset's manifest, FILE.csv or FILE.jsonl, one row "
                        "per image (path, pid, camid, split[, captions, domain]; docs/data.md)")
    flags.DEFINE_string("name", None, "NAME manifest: the dataset's name (default: the manifest's file stem); a "
                        "dataset spec opens it as {name: 'manifest', config: NAME}")


def build(name: str, data_dir, manual_dir=None, config=None, skip_bad=False, part_boxes=None, captions=None,
          force=False, part_masks=None, manifest=None):
    """Builds dataset `name` into data_dir unless a build of the same inputs is there; returns the builder.
    For name 'manifest': `manifest` is the file and `config` the dataset's name (default: the file's stem)."""
    return prepare(name, data_dir, manual_dir, config, skip_bad, part_boxes, captions, force, part_masks,
                   manifest)[0]


def prepare(name: str, data_dir, manual_dir=None, config=None, skip_bad=False, part_boxes=None, captions=None,
            force=False, part_masks=None, manifest=None):
    """`build`, returning (builder over data_dir, "built" | "rebuilt" | "reused", why it rebuilt or "")."""
    manifest = _manifest_file(name, manifest, manual_dir)
    config = check_config(name, config, manifest)
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
    if manifest is not None:
        record["inputs"]["manifest"] = manifest_lib.fingerprint(manifest_lib.read(manifest))
        record["paths"]["manifest"] = str(manifest)
    if part_masks is not None:  # recorded only when given: builds without it keep their records
        record["inputs"]["part_masks"] = prepared.file_digest(part_masks)
        record["paths"]["part_masks"] = str(part_masks)
    why = []
    if target.exists():
        old = prepared.read_record(target)
        why = ["--force"] if force else (prepared.changes(old, record) + _part_masks_change(old, record)
                                         + _manifest_change(old, record))
        if not why:
            return data.builder(name, data_dir, config), "reused", ""
    staging = _writing(lambda: prepared.new_staging(dataset_dir))
    try:
        staged = _build_into(staging, name, config, manual_dir, skip_bad, part_boxes, captions, manifest)
        if part_masks is not None:
            _store_part_masks(staging, staged, name, config, part_masks)
        prepared.write_record(staged, record)
        prepared.install(staged, target, staging)
    finally:
        prepared.remove(staging)
    return data.builder(name, data_dir, config), "rebuilt" if why else "built", "; ".join(why)


def _build_into(staging: Path, name, config, manual_dir, skip_bad, part_boxes, captions, manifest=None) -> Path:
    """TFDS builds under `staging` (a data dir of its own); -> the finished version folder there."""
    extra = {"manifest": manifest} if manifest is not None else {}
    b = data.builder(name, staging, config, skip_bad=skip_bad, part_boxes=part_boxes, captions=captions, **extra)
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


def _manifest_change(old: dict | None, new: dict) -> list[str]:
    was = ((old or {}).get("inputs") or {}).get("manifest")
    now = new["inputs"].get("manifest")
    if was == now or old is None or now is None:
        return []
    if not was:
        return ["the existing build has no record of its manifest"]
    why = ["the manifest changed"] if was["sha256"] != now["sha256"] else []
    if was["images"] != now["images"]:
        a, b = was["images"], now["images"]
        why.append(f"the images it names changed: same {b['files']} files and size, names or mtimes differ"
                   if (a["files"], a["bytes"]) == (b["files"], b["bytes"]) else
                   f"the images it names changed: {a['files']} files, {a['bytes']} bytes -> {b['files']} files, "
                   f"{b['bytes']} bytes")
    return why


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
def check_config(name: str, config: str | None, manifest: Path | None = None) -> str | None:
    """The config name, checked against NAME's configs (UsageError listing the valid ones); for a manifest the
    dataset's name (default: the manifest's file stem), checked to be one."""
    if name not in BUILDERS:
        raise UsageError(f"unknown dataset {name!r}; NAME is one of {', '.join(sorted(BUILDERS))}")
    if name == MANIFEST:
        try:
            return manifest_lib.check_name(config or (manifest.stem if manifest else None))
        except UserError as e:
            stem = "" if config or manifest is None else f" (the default, the stem of --manifest={manifest})"
            raise UsageError(f"{e}{stem}") from None
    names = [c.name for c in builder_class(name).BUILDER_CONFIGS]
    if not config or config in names:
        return config or None
    if not names:
        raise UsageError(f"{name} has no configs, so --config={config} means nothing; drop --config")
    raise UsageError(f"unknown --config={config} for {name}; expected one of {', '.join(names)}")


def _manifest_file(name: str, manifest, manual_dir) -> Path | None:
    """--manifest, required by NAME manifest and meaningless for any other NAME (UsageError); the file is checked
    (suffix, existence) as `reader.check_file` does (UserError)."""
    path = expand_path(manifest)
    if name != MANIFEST:
        if path is not None:
            raise UsageError(f"--manifest is for your own dataset (NAME manifest), not {name}; drop it, or pass "
                             f"NAME manifest")
        return None
    if path is None:
        raise UsageError(f"NAME manifest needs --manifest=FILE.csv or FILE.jsonl, the list of your images; usage: "
                         f"{USAGE}")
    if expand_path(manual_dir) is not None:
        raise UsageError(f"NAME manifest takes no --manual_dir: the image paths are relative to the manifest's "
                         f"folder ({path.parent}); drop --manual_dir={manual_dir}")
    return manifest_lib.check_file(path)


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
        b, outcome, why = prepare(argv[1], f.data_dir, f.manual_dir, _config_flag(argv[1]), f.skip_bad,
                                  f.part_boxes, f.captions, f.force, f.part_masks, f.manifest)
    except UserError as e:
        return _report(e)
    counts = ", ".join(f"{k} {v.num_examples}" for k, v in b.info.splits.items())
    logging.info("%s %s", outcome, b.data_dir)
    manifest = argv[1] == MANIFEST
    what = f"{MANIFEST}/{b.builder_config.name}" if manifest else argv[1]
    if outcome == "reused":
        inputs = "manifest, its images" if manifest else "manual folder"
        print(f"reused the existing build of {what} at {b.data_dir} ({counts}): its {inputs} and options are "
              f"unchanged; pass --force to rebuild it")
    else:
        print(f"{outcome} {what} -> {b.data_dir}: {counts}" + (f" (because {why})" if why else ""))
    if manifest:
        print(f"a config opens it as the dataset spec {{name: '{MANIFEST}', config: '{b.builder_config.name}', "
              f"split: one of {', '.join(b.info.splits)}}} (docs/data.md)")
    return 0


def _config_flag(name: str) -> str | None:
    """--config, or for NAME manifest --name (the dataset's name is its config); each refused with the other."""
    f = flags.FLAGS
    if name == MANIFEST and f.config:
        raise UsageError(f"NAME manifest is named with --name, not --config; pass --name={f.config}")
    if name != MANIFEST and f.name:
        has_configs = name in BUILDERS and builder_class(name).BUILDER_CONFIGS
        raise UsageError(f"--name names your own dataset (NAME manifest), not {name}; drop --name"
                         + (" (a builder config is --config)" if has_configs else ""))
    return f.name if name == MANIFEST else f.config


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
