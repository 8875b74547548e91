"""A model reid-jax loads, exported for deployment without reid-jax: StableHLO (`jax.export`) and ONNX (jax2onnx).

    python -m reid_jax.export --model PATH --out DIR [--format stablehlo,onnx] [--image-size H,W] [--stride S]
        [--camera-coefficient C] [--tolerance 1e-4] [--platforms cpu,cuda,tpu] [--opset N]

PATH is anything `reid_jax.inference.Encoder.load` reads. DIR gets one file per exported function and format:

    image.stablehlo, text.stablehlo    `jax.export` serialisations: `jax.export.deserialize(data).call(x)`
    image.onnx, text.onnx              ONNX models, for onnxruntime and other ONNX runtimes
    export.json                        the manifest: kind, input size, mean / std, each function's inputs and
                                       outputs, the files, the parity measured

`text.*` only for models with a text tower. Each function has a dynamic batch dimension and takes exactly what
`Encoder.image_features` / `text_features` take: float32 [B, H, W, 3] images normalised with the manifest's mean
/ std, plus int32 camera ids [B] for models with a camera embedding (SIE); int32 token ids [B, L]. The weights
are constants inside the files. Before DIR is written each file is read back and run on random inputs at batch
sizes 1 and 3 against the JAX model; a relative error max |a - b| / max |b| above --tolerance fails the export.
DIR is built as a temporary folder beside it and swapped in once complete and checked.

`load(DIR)` runs an export with jax alone (onnxruntime for format='onnx'): it imports no reid-jax model code.
docs/export.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from reid_jax import files
from reid_jax.errors import EXIT_USAGE, UserError, expand_path, report, warn

FORMATS = ("stablehlo", "onnx")
SUFFIXES = {"stablehlo": ".stablehlo", "onnx": ".onnx"}
MANIFEST = "export.json"
FORMAT = "reid-jax-export/1"  # export.json's "format": what `load` reads and a new export may replace
BATCH = "b"  # the dynamic batch dimension's name, in the files and the manifest
PARITY_BATCHES = (1, 3)  # two sizes, so the dynamic batch is exercised
PARITY_SEED = 0
DEFAULT_TOLERANCE = 1e-4  # max |exported - model| / max |model| at float32
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
ONNX_MAX_BYTES = 2 ** 31 - 1  # protobuf's limit on one serialised message: a single-file ONNX model
# the ONNX route's packages: jax2onnx without its dependencies (its pins clash with ours; it needs only these)
ONNX_PIP = "pip install onnx==1.23.2 onnx-ir==1.1.0 onnxruntime==1.32.0 && pip install --no-deps jax2onnx==0.17.1"
_QUIET_LOGGERS = ("jax2onnx", "onnx_ir")  # per-plugin import warnings (equinox, dm_pix absent) and serde notes


class ExportError(UserError):
    """An export that cannot be made or does not match the model; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """An input or output: shape with BATCH for the dynamic batch dimension."""
    name: str
    shape: tuple
    dtype: str

    def spec(self, batch) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(batch if d == BATCH else d for d in self.shape), np.dtype(self.dtype))

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass
class Function:
    """One function to export: `fn(*inputs) -> features`, traceable, the weights closed over as constants;
    `reference` is the Encoder's own method, `sample(rng, n)` random inputs of batch n."""
    name: str  # 'image_features' | 'text_features'
    stem: str  # file name without suffix
    fn: Callable
    inputs: tuple[Tensor, ...]
    reference: Callable[..., np.ndarray]
    sample: Callable[[np.random.Generator, int], tuple[np.ndarray, ...]]

    def output(self) -> Tensor:
        out = jax.eval_shape(self.fn, *[t.spec(1) for t in self.inputs])
        return Tensor("features", (BATCH, *out.shape[1:]), str(out.dtype))


# ------------------------------------------------------------------------------------ what is exported
def functions(enc) -> list[Function]:
    """The functions of a loaded `reid_jax.inference.Encoder`: image_features, and text_features where it has
    a text tower."""
    h, w = enc.image_size
    cameras = enc.num_cameras
    image, state = enc.image_fn, enc.state
    images = Tensor("images", (BATCH, h, w, 3), "float32")

    def sample_images(rng, n):
        x = rng.normal(size=(n, h, w, 3)).astype(np.float32)
        return (x, rng.integers(0, cameras, n).astype(np.int32)) if cameras else (x,)

    if cameras:
        fns = [Function("image_features", "image", lambda x, c: image(state, x, c),
                        (images, Tensor("camids", (BATCH,), "int32")), enc.image_features, sample_images)]
    else:
        fns = [Function("image_features", "image", lambda x: image(state, x, None), (images,),
                        enc.image_features, sample_images)]
    if enc.text_fn is not None:
        text = enc.text_fn  # traced directly, not through the Encoder's jit, which would capture both towers
        length, vocab = _text_shape(enc)
        fns.append(Function("text_features", "text", lambda ids: text(state, ids),
                            (Tensor("ids", (BATCH, length), "int32"),), enc.text_features,
                            lambda rng, n: (_token_ids(rng, n, length, vocab),)))
    return fns


def _text_shape(enc) -> tuple[int, int]:
    """(context length, vocabulary size) of the model's text tower (OpenAI's 77, 49408 where it does not say)."""
    cfg = getattr(getattr(enc.model, "config", None), "text", None)
    return (cfg.context_length, cfg.vocab_size) if cfg is not None else (77, 49408)


def _token_ids(rng: np.random.Generator, n: int, length: int, vocab: int) -> np.ndarray:
    """int32 [n, length] in OpenAI's layout: SOT (vocab - 2), random ids, EOT (vocab - 1, the largest), zeros."""
    ids = np.zeros((n, length), np.int32)
    for i in range(n):
        end = int(rng.integers(1, length))
        ids[i, 0], ids[i, end] = vocab - 2, vocab - 1
        ids[i, 1:end] = rng.integers(1, vocab - 2, size=end - 1)
    return ids


# --------------------------------------------------------------------------------------------- writers
def write_stablehlo(fn: Function, path: Path, platforms: Sequence[str]) -> None:
    """`fn` with a symbolic batch, lowered for `platforms`, serialised to `path`."""
    batch, = jax.export.symbolic_shape(BATCH)
    try:
        exported = jax.export.export(jax.jit(fn.fn), platforms=tuple(platforms))(*[t.spec(batch)
                                                                                    for t in fn.inputs])
    except Exception as e:  # a model whose code needs a concrete batch size, a platform without a lowering
        raise ExportError(f"{fn.name}: jax.export failed ({type(e).__name__}: {e}); try --platforms cpu, or "
                          f"report it with the model's kind") from e
    path.write_bytes(exported.serialize())


def write_onnx(fn: Function, path: Path, opset: int | None) -> int:
    """`fn` with a dynamic batch as an ONNX model in one file at `path`; returns its opset."""
    import jax2onnx
    import onnx

    batch, = jax.export.symbolic_shape(BATCH)
    options = {} if opset is None else {"opset": opset}
    try:
        with _quiet(_QUIET_LOGGERS):
            model = jax2onnx.to_onnx(fn.fn, [t.spec(batch) for t in fn.inputs], model_name=fn.name,
                                     input_names=[t.name for t in fn.inputs], output_names=["features"],
                                     **options)
    except Exception as e:  # an operation jax2onnx has no plugin for
        raise ExportError(f"{fn.name}: jax2onnx could not convert it ({type(e).__name__}: {e}); export "
                          f"--format stablehlo instead") from e
    size = model.ByteSize()
    if size > ONNX_MAX_BYTES:
        raise ExportError(f"{fn.name}: the ONNX model takes {size / 2 ** 30:.1f} GiB, above the 2 GiB of one ONNX "
                          f"file; export --format stablehlo instead")
    onnx.save_model(model, str(path))
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _quiet(names: Sequence[str]):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def onnx_available() -> str | None:
    """None if the ONNX route can run here, else why not (with the pip line)."""
    missing = []
    for module in ("jax2onnx", "onnx", "onnx_ir", "onnxruntime"):
        try:
            with _quiet(_QUIET_LOGGERS):
                __import__(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return None
    return f"--format onnx needs {', '.join(missing)}, not installed here; install them with: {ONNX_PIP}"


# ------------------------------------------------------------------------------------------ runners
def stablehlo_runner(path: Path) -> Callable[..., np.ndarray]:
    """A serialised export as a function of numpy arrays (compiled once per batch size)."""
    exported = jax.export.deserialize(bytearray(Path(path).read_bytes()))
    call = jax.jit(exported.call)
    return lambda *xs: np.asarray(call(*xs))


def onnx_runner(path: Path, providers: Sequence[str] | None = None) -> Callable[..., np.ndarray]:
    """An ONNX file as a function of numpy arrays, through onnxruntime (CPU unless `providers` say otherwise)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the failure raised says what went wrong
    session = onnxruntime.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    names = [i.name for i in session.get_inputs()]
    return lambda *xs: session.run(None, dict(zip(names, xs, strict=True)))[0]


RUNNERS = {"stablehlo": stablehlo_runner, "onnx": onnx_runner}


def parity(fn: Function, run: Callable[..., np.ndarray], batches: Sequence[int] = PARITY_BATCHES
           ) -> dict[int, float]:
    """{batch size: max |run - reference| / max |reference|} on random inputs, the same for every format."""
    inputs = fn.sample(np.random.default_rng(PARITY_SEED), max(batches))
    errors = {}
    for n in batches:
        xs = [x[:n] for x in inputs]
        want, got = np.asarray(fn.reference(*xs), np.float64), np.asarray(run(*xs), np.float64)
        if got.shape != want.shape:
            raise ExportError(f"{fn.name}: the export gives shape {list(got.shape)} at batch {n}, the model "
                              f"{list(want.shape)}; this is a bug, please report it")
        errors[n] = float(np.abs(got - want).max() / np.abs(want).max())
    return errors


# ------------------------------------------------------------------------------------------- export
def export(model, out, formats: Sequence[str] = ("stablehlo",), *, image_size=None, stride=None,
           camera_coefficient=None, tolerance: float = DEFAULT_TOLERANCE,
           platforms: Sequence[str] = DEFAULT_PLATFORMS, opset: int | None = None) -> dict:
    """Exports `model` (a path `Encoder.load` reads, with its image_size / stride / camera_coefficient, or a loaded
    Encoder) to the folder `out` in `formats`; returns the manifest. `out` is replaced only once the new export is
    complete and every file is within `tolerance` of the model."""
    formats, platforms = _check_formats(formats), _check_platforms(platforms)
    if "onnx" in formats and (why := onnx_available()):
        raise ExportError(why)
    if not tolerance >= 0:
        raise ExportError(f"--tolerance {tolerance}: expected a number >= 0 (the default is {DEFAULT_TOLERANCE})")
    out = _output_path(out)
    with _staging(out) as tmp:  # --out is checked and claimed before the model is read
        from reid_jax.inference import Encoder

        if isinstance(model, Encoder) and (image_size, stride, camera_coefficient) != (None, None, None):
            raise ExportError("image_size, stride and camera_coefficient apply to a model path; this Encoder is "
                              "loaded already: pass them to Encoder.load")
        enc = model if isinstance(model, Encoder) else Encoder.load(model, image_size, stride, camera_coefficient)
        manifest = _write(enc, tmp, formats, platforms, opset, tolerance)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        files.publish_folder(tmp, out)
    return manifest


def _write(enc, folder: Path, formats: Sequence[str], platforms: Sequence[str], opset: int | None,
           tolerance: float) -> dict:
    """Writes every function in every format into `folder`, reads each file back and measures its parity; stops
    at the first one above `tolerance`."""
    manifest = {"format": FORMAT, "kind": enc.kind, "source": os.path.abspath(enc.source),
                "image_size": list(enc.image_size), "mean": list(enc.mean), "std": list(enc.std),
                "info": json.loads(json.dumps(enc.info, default=str)), "functions": {}}
    if "stablehlo" in formats:
        manifest["stablehlo"] = {"platforms": list(platforms), "jax": jax.__version__}
    for fn in functions(enc):
        entry = {"inputs": [t.to_json() for t in fn.inputs], "outputs": [fn.output().to_json()], "files": {},
                 "max_rel_error": {}}
        for fmt in formats:
            path = folder / f"{fn.stem}{SUFFIXES[fmt]}"
            if fmt == "stablehlo":
                write_stablehlo(fn, path, platforms)
            else:
                manifest["onnx"] = {"opset": write_onnx(fn, path, opset), **_onnx_versions()}
            entry["files"][fmt] = path.name
            errors = _check(fn, fmt, path)
            if max(errors.values()) > tolerance:
                figures = ", ".join(f"{e:.2e} at batch {n}" for n, e in errors.items())
                raise ExportError(f"{fn.name} exported as {fmt} differs from the model by more than --tolerance "
                                  f"{tolerance:g} (max |export - model| / max |model|: {figures}); --out is left "
                                  f"as it was")
            entry["max_rel_error"][fmt] = {str(n): e for n, e in errors.items()}
        manifest["functions"][fn.name] = entry
    manifest["tolerance"] = tolerance
    return manifest


def _check(fn: Function, fmt: str, path: Path) -> dict[int, float]:
    """The parity of the file just written, run as `load` runs it."""
    try:
        return parity(fn, RUNNERS[fmt](path))
    except ExportError:
        raise
    except Exception as e:
        if fmt != "onnx":
            raise
        # jax2onnx can emit operators onnxruntime lacks a kernel for (EyeLike on bool, for one)
        raise ExportError(f"{fn.name}: onnxruntime cannot run the ONNX model jax2onnx made of it "
                          f"({type(e).__name__}: {e}); export it with --format stablehlo") from e


def _onnx_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("jax2onnx", "onnx", "onnxruntime")}


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """'stablehlo,onnx' or a list of them (repeated flags) -> the formats in order, once each."""
    names = [f.strip().lower() for item in ([formats] if isinstance(formats, str) else formats)
             for f in item.split(",") if f.strip()]
    bad = [f for f in names if f not in FORMATS]
    if bad or not names:
        raise ExportError(f"--format {','.join(bad) or repr('')}: expected {' or '.join(FORMATS)} (both: "
                          f"--format stablehlo,onnx)")
    return tuple(dict.fromkeys(names))


def _check_platforms(platforms: str | Sequence[str]) -> tuple[str, ...]:
    """'cpu,cuda' or a list of platforms -> the platforms, which must include this machine's (to be checked)."""
    names = [p.strip() for item in ([platforms] if isinstance(platforms, str) else platforms)
             for p in item.split(",") if p.strip()]
    bad = [p for p in names if p not in PLATFORMS]
    if bad or not names:
        raise ExportError(f"--platforms {','.join(bad) or repr('')}: expected some of {', '.join(PLATFORMS)} "
                          f"(the default is {','.join(DEFAULT_PLATFORMS)})")
    here = jax.export.default_export_platform()
    if here not in names:
        raise ExportError(f"--platforms {','.join(names)}: the export is checked here, on {here}, so it must be "
                          f"one of them: add {here}")
    return tuple(dict.fromkeys(names))


# ------------------------------------------------------------------------------ the output folder (DIR)
# As `reid_jax.convert` writes its DST: a temporary folder `.DIR.tmp-<pid>-<hex>` beside DIR, swapped in whole
# (`reid_jax.files`).
def is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _files(folder: Path) -> set[str]:
    """The files an export in `folder` consists of (the manifest and what it lists)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    return {MANIFEST, *(f for entry in manifest["functions"].values() for f in entry["files"].values())}


def _output_path(out) -> Path:
    return files.resolved_output(out, "--out", "the export folder", ExportError)


def _check_out(out: Path) -> None:
    """Refuses an --out that must not be replaced: a file, or a folder that holds anything but an export."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder; choose a path that does not exist yet, an "
                          f"empty folder or an earlier export (nothing was changed)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_export(out):
        raise ExportError(f"--out {out}: is not an earlier reid-jax export (no {MANIFEST} with format {FORMAT}), "
                          f"and only those are replaced; choose another --out, or move that folder away (nothing "
                          f"was changed)")
    extra = sorted(set(os.listdir(out)) - _files(out))
    if extra:
        raise ExportError(f"--out {out}: an earlier export that also holds {extra[:5]}, which replacing it would "
                          f"delete; move them out of it first (nothing was changed)")


def _staging(out: Path):
    """Checks --out and creates the temporary folder beside it: a context manager yielding it; on failure it is
    removed with the parent folders it created."""
    if restored := files.clean_leftovers(out, is_export):
        warn(f"{out}: restored the earlier export that an interrupted export had moved to {restored.name}")
    _check_out(out)
    return files.staged_folder(out, lambda e: ExportError(
        f"--out {out}: cannot create it in {out.parent} ({e.strerror}); choose a folder you can write to"))


# --------------------------------------------------------------------------------------------- loading
class ExportedEncoder:
    """An export run with jax (or onnxruntime): `image_features` / `text_features` as on the Encoder."""

    def __init__(self, directory: Path, manifest: dict, fmt: str, providers=None):
        self.directory, self.manifest, self.format = directory, manifest, fmt
        self.kind = manifest["kind"]
        self.image_size = tuple(manifest["image_size"])
        self.mean, self.std = tuple(manifest["mean"]), tuple(manifest["std"])
        fns = manifest["functions"]
        if any(fmt not in entry["files"] for entry in fns.values()):
            raise ExportError(f"{directory}: holds no {fmt} files ({MANIFEST} lists "
                              f"{sorted(next(iter(fns.values()))['files'])}); export it with --format {fmt}")
        self.camera_ids = any(t["name"] == "camids" for t in fns["image_features"]["inputs"])
        make = (lambda p: onnx_runner(p, providers)) if fmt == "onnx" else stablehlo_runner
        self._run = {name: make(directory / entry["files"][fmt]) for name, entry in fns.items()}

    def __repr__(self) -> str:
        return (f"ExportedEncoder(kind={self.kind!r}, image_size={self.image_size}, format={self.format!r}, "
                f"directory={str(self.directory)!r})")

    def image_features(self, images, camids=None) -> np.ndarray:
        """float32 [B, H, W, 3] (normalised with `mean` / `std`), int camera ids [B] where the model uses them
        (`camera_ids`; ignored otherwise) -> float32 [B, D]."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != (*self.image_size, 3):
            raise ValueError(f"images must be float32 [B, {self.image_size[0]}, {self.image_size[1]}, 3] (NHWC, "
                             f"normalised with mean / std), got {list(images.shape)}")
        if not self.camera_ids:
            return self._run["image_features"](images)
        if camids is None:
            raise ValueError(f"this {self.kind} model has a camera embedding (SIE): pass the images' zero-based "
                             f"camera ids, camids int [B]")
        return self._run["image_features"](images, np.asarray(camids, np.int32).reshape(len(images)))

    def text_features(self, ids) -> np.ndarray:
        """int32 [B, L] token ids (OpenAI's layout, L as exported: the manifest's inputs) -> float32 [B, E]."""
        entry = self.manifest["functions"].get("text_features")
        if entry is None:
            raise ValueError(f"this {self.kind} export ({self.directory}) encodes images only: no text features")
        ids = np.asarray(ids, np.int32)
        length = entry["inputs"][0]["shape"][1]
        if ids.ndim != 2 or ids.shape[1] != length:
            raise ValueError(f"ids must be int32 [B, {length}] (zero padded), got {list(ids.shape)}")
        return self._run["text_features"](ids)


def load(directory, format: str = "stablehlo", providers: Sequence[str] | None = None) -> ExportedEncoder:
    """The export in `directory`, run from its `format` files; `providers`: onnxruntime's (default CPU)."""
    directory = expand_path(directory)
    if directory is None or not is_export(directory):
        raise ExportError(f"{directory}: not a reid-jax export (no {MANIFEST} with format {FORMAT}); make one with "
                          f"python -m reid_jax.export --model PATH --out DIR")
    if format not in FORMATS:
        raise ExportError(f"format {format!r}: expected {' or '.join(FORMATS)}")
    return ExportedEncoder(directory, json.loads((directory / MANIFEST).read_text()), format, providers)


# ------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from reid_jax.convert import _parse_hw  # the model code it imports is needed to export anyway

    parser = argparse.ArgumentParser(prog="python -m reid_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="a reid-jax run, a reid_jax.convert output, a CLIP checkpoint or an authors' release")
    parser.add_argument("--out", required=True,
                        help="the export folder (a new path, an empty folder or an earlier export, replaced)")
    parser.add_argument("--format", action="append", default=None,
                        help="stablehlo (default), onnx, or both: --format stablehlo,onnx (or the flag twice)")
    parser.add_argument("--image-size", type=_parse_hw, default=None, help="H,W of the input (default: the model's)")
    parser.add_argument("--stride", type=int, default=None, help="patch stride (default: the model's)")
    parser.add_argument("--camera-coefficient", type=float, default=None,
                        help="weight of the camera embedding (SIE) where the file does not record it")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="the largest max |export - model| / max |model| accepted (default %(default)g)")
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help=f"stablehlo: what to lower for, some of {','.join(PLATFORMS)} (default %(default)s)")
    parser.add_argument("--opset", type=int, default=None, help="onnx: the opset (default: jax2onnx's)")
    args = parser.parse_args(argv)
    try:
        formats, platforms = _check_formats(args.format or ["stablehlo"]), _check_platforms(args.platforms)
    except ExportError as e:
        return report(e, EXIT_USAGE)
    try:
        manifest = export(args.model, args.out, formats, image_size=args.image_size, stride=args.stride,
                          camera_coefficient=args.camera_coefficient, tolerance=args.tolerance,
                          platforms=platforms, opset=args.opset)
    except UserError as e:
        return report(e)
    except OSError as e:  # the disk filled, a folder vanished mid-write: DIR is still the old one or absent
        return report(ExportError(f"--out {args.out}: writing the export failed ({e}); nothing was replaced"))
    for name, entry in manifest["functions"].items():
        shapes = " ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in entry["inputs"])
        for fmt, errors in entry["max_rel_error"].items():
            figures = ", ".join(f"batch {n}: {e:.2e}" for n, e in errors.items())
            print(f"{name} ({shapes}) -> {fmt} {entry['files'][fmt]}: max relative error {figures}")
    print(f"wrote {_output_path(args.out)}: {manifest['kind']} at {tuple(manifest['image_size'])}, "
          f"{', '.join(formats)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
