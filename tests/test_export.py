"""`python -m reid_jax.export`: StableHLO and ONNX exports of a tiny random CLIP (image and text towers) and of a
CLIP-ReID SIE release (camera ids) against the Encoder they come from, on inputs other than the export's own check;
the StableHLO files run in a fresh process with jax alone; bad input and a failed parity check leave --out as it
was."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from reid_jax import export
from reid_jax.inference import Encoder
from tests import torch_clip_reid, torch_refs
from tests.numerics import assert_close

TOL = 1e-4  # the bound at float32
HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("jax2onnx", "onnx", "onnx_ir", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason=f"jax2onnx / onnxruntime not installed ({export.ONNX_PIP})")
FORMATS = "stablehlo,onnx" if HAVE_ONNX else "stablehlo"
VOCAB = 1000  # OpenAI's CLIP at test widths with a small token table: the text files stay small


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    torch.manual_seed(3)
    model = torch_refs.openai_model_module().CLIP(
        embed_dim=48, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8, context_length=77,
        vocab_size=VOCAB, transformer_width=64, transformer_heads=1, transformer_layers=2)
    path = tmp_path_factory.mktemp("clip") / "ViT-tiny.pt"
    torch.save(torch_refs.perturb_(model.float(), 4).state_dict(), path)
    return path, Encoder.load(path, image_size=(32, 32))


@pytest.fixture(scope="module")
def clip_export(clip, tmp_path_factory):
    """Both formats from the loaded Encoder (whose compilations the comparisons below reuse)."""
    out = tmp_path_factory.mktemp("exports") / "clip"
    export.export(clip[1], out, FORMATS.split(","))
    return out


def _inputs(n: int, seed: int):
    """Images [n, 32, 32, 3] and token ids [n, 77]: start (VOCAB - 2), random ids, end (VOCAB - 1), zeros."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, 77), np.int32)
    for i, end in enumerate(rng.integers(2, 77, n)):
        ids[i, 0], ids[i, 1:end], ids[i, end] = VOCAB - 2, rng.integers(1, VOCAB - 2, end - 1), VOCAB - 1
    return rng.normal(size=(n, 32, 32, 3)).astype(np.float32), ids


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_stablehlo_export_gives_the_encoder_features(clip, clip_export):
    _, enc = clip
    manifest = json.loads((clip_export / export.MANIFEST).read_text())
    assert (manifest["kind"], manifest["image_size"]) == ("clip", [32, 32])
    assert (tuple(manifest["mean"]), tuple(manifest["std"])) == (enc.mean, enc.std)
    image, text = manifest["functions"]["image_features"], manifest["functions"]["text_features"]
    assert image["inputs"] == [{"name": "images", "shape": ["b", 32, 32, 3], "dtype": "float32"}]
    assert text["inputs"] == [{"name": "ids", "shape": ["b", 77], "dtype": "int32"}]
    assert image["outputs"] == text["outputs"] == [{"name": "features", "shape": ["b", 48], "dtype": "float32"}]
    for entry in (image, text):  # what the export measured, at both batch sizes and in every format
        assert set(entry["max_rel_error"]) == set(FORMATS.split(","))
        assert all(errors.keys() == {"1", "3"} and max(errors.values()) <= TOL
                   for errors in entry["max_rel_error"].values())
    exported = export.load(clip_export)
    assert exported.camera_ids is False
    images, ids = _inputs(3, seed=2)  # other inputs than the export's own check
    assert_close(exported.image_features(images), enc.image_features(images), TOL, "image")
    assert_close(exported.text_features(ids), enc.text_features(ids), TOL, "text")
    with pytest.raises(ValueError, match=r"images must be float32 \[B, 32, 32, 3\]"):
        exported.image_features(np.zeros((2, 3, 32, 32), np.float32))


_JAX_ALONE = """
import sys
from pathlib import Path

import jax
import numpy as np

export, io = Path(sys.argv[1]), Path(sys.argv[2])
for stem, name in (("image", "images"), ("text", "ids")):
    fn = jax.export.deserialize(bytearray((export / f"{stem}.stablehlo").read_bytes()))
    np.save(io / f"{stem}_raw.npy", np.asarray(fn.call(np.load(io / f"{name}.npy"))))
assert not [m for m in sys.modules if m.startswith(("reid_jax", "flax", "torch"))]

from reid_jax.export import load  # the loader reads the same files without reid-jax's model code

loaded = load(export)
assert (loaded.kind, loaded.image_size, loaded.camera_ids) == ("clip", (32, 32), False)
model_code = [m for m in sys.modules if m.startswith(("reid_jax.models", "reid_jax.weights", "reid_jax.inference",
                                                      "flax", "torch", "jax2onnx"))]
assert not model_code, model_code
"""


def test_stablehlo_runs_with_jax_alone_in_a_fresh_process(clip, clip_export, tmp_path):
    _, enc = clip
    images, ids = _inputs(2, seed=7)  # a batch size the export was not checked at
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "ids.npy", ids)
    run = subprocess.run([sys.executable, "-c", _JAX_ALONE, str(clip_export), str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_close(np.load(tmp_path / "image_raw.npy"), enc.image_features(images), TOL, "image")
    assert_close(np.load(tmp_path / "text_raw.npy"), enc.text_features(ids), TOL, "text")


@needs_onnx
def test_onnx_export_gives_the_encoder_features_in_onnxruntime(clip, clip_export):
    import onnxruntime

    _, enc = clip
    session = onnxruntime.InferenceSession(str(clip_export / "image.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [("images", ["b", 32, 32, 3],
                                                                          "tensor(float)")]
    exported = export.load(clip_export, "onnx")
    images, ids = _inputs(3, seed=12)
    assert_close(exported.image_features(images), enc.image_features(images), TOL, "onnx image")
    assert_close(exported.text_features(ids), enc.text_features(ids), TOL, "onnx text")


def test_camera_ids_are_an_input_of_a_clip_reid_sie_export(tmp_path):
    """CLIP-ReID SIE-OLP (stride 12, 4 cameras): the camera row joins CLS, so camids [B] is the second input."""
    path = tmp_path / "ViT-B-16_60.pth"
    torch_clip_reid.save(torch_clip_reid.build(seed=10, image_size=(64, 32), stride=12, cameras=4), path)
    out = tmp_path / "export"
    enc = Encoder.load(path, image_size=(64, 32), stride=12)
    export.export(enc, out, FORMATS)
    manifest = json.loads((out / export.MANIFEST).read_text())
    assert manifest["kind"] == "clip_reid" and list(manifest["functions"]) == ["image_features"]
    assert manifest["functions"]["image_features"]["inputs"][1] == {"name": "camids", "shape": ["b"],
                                                                     "dtype": "int32"}
    rng = np.random.default_rng(3)
    images, cams = rng.normal(size=(3, 64, 32, 3)).astype(np.float32), np.array([3, 0, 2], np.int32)
    want = enc.image_features(images, cams)
    assert np.abs(enc.image_features(images, (cams + 1) % 4) - want).max() > 1e-3 * np.abs(want).max()
    for fmt in FORMATS.split(","):
        exported = export.load(out, fmt)
        assert exported.camera_ids
        assert_close(exported.image_features(images, cams), want, TOL, f"{fmt} SIE feature")
        assert_close(exported.image_features(images, (cams + 1) % 4), enc.image_features(images, (cams + 1) % 4),
                     TOL, f"{fmt} SIE feature, other cameras")
        with pytest.raises(ValueError, match="camera embedding"):
            exported.image_features(images)
        with pytest.raises(ValueError, match="encodes images only"):
            exported.text_features(np.zeros((1, 77), np.int32))


def test_bad_input_is_one_line_and_changes_nothing(clip, tmp_path, capsys, monkeypatch):
    path = str(clip[0])
    assert export.main(["--model", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "a" / "out")]) == 1
    assert "missing.pth: no such file or folder" in _one_error_line(capsys)
    assert not (tmp_path / "a").exists()  # the parents it made are gone again
    assert export.main(["--model", path, "--out", str(tmp_path / "b"), "--format", "stablehlo,tflite"]) == 2
    assert "--format tflite: expected stablehlo or onnx" in _one_error_line(capsys)
    assert export.main(["--model", path, "--out", str(tmp_path / "b"), "--platforms", "cpu,gpu"]) == 2
    assert "--platforms gpu" in _one_error_line(capsys)
    here = jax.export.default_export_platform()  # an export is checked on this machine: it must run here
    assert export.main(["--model", path, "--out", str(tmp_path / "b"), "--platforms",
                        "tpu" if here != "tpu" else "cpu"]) == 2
    assert f"checked here, on {here}" in _one_error_line(capsys)
    file = tmp_path / "file"
    file.write_text("mine")
    assert export.main(["--model", path, "--out", str(file)]) == 1
    assert "exists and is not a folder" in _one_error_line(capsys) and file.read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert export.main(["--model", path, "--out", str(other)]) == 1
    assert "is not an earlier reid-jax export" in _one_error_line(capsys)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if it were not installed
    assert export.main(["--model", path, "--out", str(tmp_path / "c"), "--format", "onnx"]) == 1
    assert "pip install --no-deps jax2onnx==" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "other"]
    with pytest.raises(export.ExportError, match="not a reid-jax export"):
        export.load(other)


def test_a_failed_check_keeps_the_earlier_export_and_a_passed_one_replaces_it(clip, clip_export, tmp_path,
                                                                              monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(clip_export, out)
    before = (out / export.MANIFEST).read_text()
    real = export.RUNNERS["stablehlo"]

    def off_by_1e3(file):  # a file that runs, but not as the model does
        run = real(file)
        return lambda *xs: (y := run(*xs)) + 1e-3 * np.abs(y).max()

    with monkeypatch.context() as m:
        m.setitem(export.RUNNERS, "stablehlo", off_by_1e3)
        with pytest.raises(export.ExportError) as failed:
            export.export(clip[1], out)
    assert "image_features exported as stablehlo differs from the model by more than --tolerance 0.0001" in str(
        failed.value) and "1.00e-03 at batch 1, 1.00e-03 at batch 3" in str(failed.value)
    assert (out / export.MANIFEST).read_text() == before and [p.name for p in tmp_path.iterdir()] == ["out"]

    assert export.main(["--model", str(clip[0]), "--out", str(out), "--image-size=32,32"]) == 0  # the CLI
    printed = capsys.readouterr().out
    assert "image_features (images float32['b', 32, 32, 3]) -> stablehlo image.stablehlo: max relative" in printed
    manifest = json.loads((out / export.MANIFEST).read_text())
    assert manifest["functions"]["image_features"]["files"] == {"stablehlo": "image.stablehlo"}
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "image.stablehlo", "text.stablehlo"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
