"""Checkpoint reading (OpenAI TorchScript / state dict, open_clip, converted folders), errors, CLI round trip.

The reference is OpenAI's own model code (clip-anytorch's `clip/model.py`) at a small ViT size.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from reid_jax import convert, files
from reid_jax.weights import load_clip
from tests import torch_refs

MAX_REL_ERR = 1e-4


@pytest.fixture(scope="module")
def openai():
    return torch_refs.openai_clip(seed=0)


@pytest.fixture(scope="module")
def sources(openai, tmp_path_factory):
    """The same weights in every on-disk form a user may have."""
    d = tmp_path_factory.mktemp("sources")
    sd = openai.state_dict()
    torch.save(sd, d / "openai_state_dict.pt")
    traced = torch.jit.trace(openai, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)))
    traced.save(str(d / "ViT-tiny.pt"))  # a TorchScript archive like OpenAI's ViT-B-16.pt
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}},
               d / "open_clip_epoch_3.pt")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, d / "open_clip.safetensors")
    return d


def _reference(openai, images, ids, grid=None):
    """OpenAI's encode_image / encode_text; with `grid`, its position grid resized by F.interpolate first."""
    with torch.no_grad():
        if grid is not None:
            pos = openai.visual.positional_embedding.data.clone()
            g = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
            g = F.interpolate(g, size=grid, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
            openai.visual.positional_embedding.data = torch.cat([pos[:1], g.reshape(-1, pos.shape[1])])
        try:
            img = openai.encode_image(torch_refs.nchw(images)).numpy()
            txt = openai.encode_text(torch.from_numpy(ids)).numpy()
        finally:
            if grid is not None:
                openai.visual.positional_embedding.data = pos
    return img, txt


def _check(model, openai, size=(32, 32), grid=None):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, *size, 3)).astype(np.float32)
    ids = torch_refs.random_ids(3, rng)
    ref_img, ref_txt = _reference(openai, images, ids, grid)
    assert torch_refs.rel_err(model.encode_image(images), ref_img) <= MAX_REL_ERR
    assert torch_refs.rel_err(model.encode_text(ids), ref_txt) <= MAX_REL_ERR


@pytest.mark.parametrize("name", ["openai_state_dict.pt", "ViT-tiny.pt", "open_clip_epoch_3.pt",
                                  "open_clip.safetensors"])
def test_every_source_matches_openai_model(openai, sources, name):
    model = load_clip(sources / name, image_size=(32, 32), stride=8)
    assert model.config.vision.patch_size == 8 and model.config.vision.heads == 2
    assert model.config.text.layers == 2 and model.config.embed_dim == 48
    _check(model, openai)


def test_reid_size_matches_openai_model_with_interpolated_grid(openai, sources):
    model = load_clip(sources / "ViT-tiny.pt", image_size=(48, 16), stride=8)
    assert model.config.vision.grid == (6, 2)
    _check(model, openai, size=(48, 16), grid=(6, 2))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hf_folder_formats_and_activation(tmp_path, act, weights):
    """HF folders as save_pretrained writes them or with a .bin; LAION-style GELU models read hidden_act."""
    hf = torch_refs.hf_clip(torch_refs.TINY_HF, seed=5, act=act)
    hf.save_pretrained(tmp_path)
    if weights == "pytorch_model.bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / weights)
    model = load_clip(tmp_path, image_size=(32, 32), stride=8)
    assert model.config.activation == act and model.config.vision.heads == 4
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = torch_refs.random_ids(2, rng)
    ref_img, ref_txt = torch_refs.hf_image_features(hf, images), torch_refs.hf_text_features(hf, ids)
    assert torch_refs.rel_err(model.encode_image(images), ref_img) <= MAX_REL_ERR
    assert torch_refs.rel_err(model.encode_text(ids), ref_txt) <= MAX_REL_ERR


# ---------------------------------------------------------------------------------------------- bad input
def _write_state(path, sd):
    torch.save(sd, path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(convert.CheckpointError, match="no such file"):
        load_clip(tmp_path / "ViT-B-16.pt")


@pytest.mark.parametrize("name", ["ViT-tiny.pt", "open_clip.safetensors", "openai_state_dict.pt"])
def test_truncated_download(sources, tmp_path, name):
    data = (sources / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.CheckpointError, match="truncated") as e:
        load_clip(cut)
    assert str(cut) in str(e.value)


def test_empty_file(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(convert.CheckpointError, match="empty"):
        load_clip(tmp_path / "x.pt")


def test_checkpoint_of_another_model(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "fc.weight": torch.zeros(10, 64)}
    with pytest.raises(convert.CheckpointError, match="does not look like a CLIP ViT checkpoint") as e:
        load_clip(_write_state(tmp_path / "resnet50.pt", resnet))
    assert "conv1.weight" in str(e.value) and "visual.conv1.weight" in str(e.value)


def test_resnet_clip_is_named(tmp_path):
    sd = {"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "visual.conv1.weight": torch.zeros(32, 3, 3, 3)}
    with pytest.raises(convert.CheckpointError, match="ResNet CLIP"):
        load_clip(_write_state(tmp_path / "RN50.pt", sd))


def test_missing_unexpected_and_misshaped_keys_are_all_named(openai, tmp_path):
    sd = dict(openai.state_dict())
    del sd["visual.ln_post.weight"]
    sd["visual.extra_head.weight"] = torch.zeros(3)
    sd["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(100, 128)
    with pytest.raises(convert.CheckpointError) as e:
        load_clip(_write_state(tmp_path / "bad.pt", sd))
    msg = str(e.value)
    assert "missing keys: ['visual.ln_post.weight']" in msg
    assert "unexpected keys: ['visual.extra_head.weight']" in msg
    assert "transformer.resblocks.1.mlp.c_fc.weight: expected [512, 128], found [100, 128]" in msg


def test_hf_folder_problems(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(convert.CheckpointError, match="expected a Hugging Face CLIPModel config"):
        load_clip(tmp_path)
    hf_config = {"model_type": "clip", "vision_config": {"num_attention_heads": 2},
                 "text_config": {"num_attention_heads": 2}}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(convert.CheckpointError, match="model.safetensors or pytorch_model.bin"):
        load_clip(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(convert.CheckpointError, match="empty"):
        load_clip(tmp_path)


# --------------------------------------------------------------------------------- converted folders + CLI
def _features(model, size):
    rng = np.random.default_rng(1)
    return (np.asarray(model.encode_image(rng.normal(size=(2, *size, 3)).astype(np.float32))),
            np.asarray(model.encode_text(torch_refs.random_ids(2, rng))))


def test_convert_then_load_round_trip(sources, tmp_path):
    src, dst = sources / "ViT-tiny.pt", tmp_path / "converted"
    assert convert.main([str(src), str(dst), "--image-size=48,16", "--stride=8"]) == 0
    assert sorted(os.listdir(dst)) == ["config.json", "params"]
    meta = json.loads((dst / "config.json").read_text())
    assert meta["model"]["vision"]["image_size"] == [48, 16] and meta["source"]["posemb_grid"] == [4, 4]
    for size, stride, interp in [((48, 16), 8, "bilinear"), ((32, 32), 8, "bilinear"), ((40, 24), 4, "bicubic"),
                                 ((48, 16), 8, "bicubic")]:
        direct = load_clip(src, image_size=size, stride=stride, posemb_interpolation=interp)
        loaded = load_clip(dst, image_size=size, stride=stride, posemb_interpolation=interp)
        for a, b in zip(_features(direct, size), _features(loaded, size)):
            np.testing.assert_array_equal(a, b)


def test_convert_never_leaves_a_partial_dst(openai, sources, tmp_path):
    sd = dict(openai.state_dict())
    del sd["ln_final.bias"]
    bad = _write_state(tmp_path / "bad.pt", sd)
    out = tmp_path / "out"
    out.mkdir()
    assert convert.main([str(bad), str(out / "dst")]) == 1
    assert os.listdir(out) == []  # neither DST nor a temporary folder
    dst = out / "dst"
    assert convert.main([str(sources / "ViT-tiny.pt"), str(dst)]) == 0
    before = (dst / "config.json").read_text()
    assert convert.main([str(sources / "ViT-tiny.pt"), str(dst), "--image-size=48,16"]) == 1  # exists
    assert (dst / "config.json").read_text() == before
    assert convert.main([str(bad), str(dst), "--overwrite"]) == 1  # a failed overwrite keeps the old DST
    assert (dst / "config.json").read_text() == before
    assert convert.main([str(sources / "ViT-tiny.pt"), str(dst), "--image-size=48,16", "--overwrite"]) == 0
    assert json.loads((dst / "config.json").read_text())["model"]["vision"]["image_size"] == [48, 16]
    assert sorted(os.listdir(out)) == ["dst"]


def test_half_converted_dst_is_reported(sources, tmp_path):
    dst = tmp_path / "dst"
    assert convert.main([str(sources / "ViT-tiny.pt"), str(dst)]) == 0
    victims = [p for p in (dst / "params").rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in victims:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(convert.CheckpointError, match="incomplete or damaged") as e:
        load_clip(dst)
    assert str(dst) in str(e.value)
    shutil.rmtree(dst / "params")
    with pytest.raises(convert.CheckpointError, match="params/ is missing"):
        load_clip(dst)


def test_cli_subprocess_and_lazy_torch(sources, tmp_path):
    """The CLI as a user runs it; reading .safetensors must not import torch."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "reid_jax.convert", str(tmp_path / "nope.pt"), str(tmp_path / "d")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 1 and "nope.pt: no such file" in run.stderr
    code = ("import sys; from reid_jax import weights; "
            f"m = weights.load_clip({str(sources / 'open_clip.safetensors')!r}); "
            "print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


# ------------------------------------------------------------------------------ DST: what --overwrite may touch
def _tree(root):
    """{relative path: (mode, bytes or None for folders)} of everything under root."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, None if name in dirs else open(p, "rb").read())
    return out


def _one_line_error(text, *needles):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert all(n in lines[0] for n in needles), text


@pytest.fixture
def no_read(monkeypatch):
    """A spy on read_source: the tests below need DST refused before the source is read at all."""
    calls = []
    monkeypatch.setattr(convert, "read_source", lambda path: calls.append(path) or pytest.fail("source was read"))
    return calls


def test_overwrite_leaves_a_folder_that_is_not_a_conversion(sources, tmp_path):
    """The CLI as a user runs it: a folder of notes at DST survives --overwrite, with a one-line error."""
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "todo.txt").write_text("buy milk\n")
    (notes / "sub" / "config.json").write_text('{"format": "something else"}')
    before = _tree(notes)
    run = subprocess.run([sys.executable, "-m", "reid_jax.convert", str(sources / "ViT-tiny.pt"), str(notes),
                          "--overwrite"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 1
    _one_line_error(run.stderr, str(notes), "not an earlier reid-jax conversion")
    assert _tree(notes) == before and sorted(os.listdir(tmp_path)) == ["notes"]


@pytest.mark.parametrize("case", ["plain folder", "empty folder", "bad config", "conversion plus notes"])
def test_overwrite_refuses_before_reading_the_source(sources, tmp_path, capfd, no_read, case):
    dst = tmp_path / "dst"
    dst.mkdir()
    if case == "plain folder":
        (dst / "model.pt").write_bytes(b"mine")
    elif case == "bad config":
        (dst / "config.json").write_text("{not json")
    elif case == "conversion plus notes":
        (dst / "config.json").write_text(json.dumps({"format": convert.FORMAT}))
        (dst / "params").mkdir()
        (dst / "notes.txt").write_text("results of run 3")
    before = _tree(dst)
    assert convert.main([str(sources / "ViT-tiny.pt"), str(dst), "--overwrite"]) == 1
    _one_line_error(capfd.readouterr().err, str(dst), "notes.txt" if case == "conversion plus notes" else
                    "not an earlier reid-jax conversion")
    assert _tree(dst) == before and os.listdir(tmp_path) == ["dst"] and no_read == []


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_dst_a_file_is_refused_before_reading_the_source(sources, tmp_path, capfd, no_read, overwrite):
    dst = tmp_path / "weights"
    dst.write_text("a file the user keeps")
    assert convert.main([str(sources / "ViT-tiny.pt"), str(dst), *overwrite]) == 1
    _one_line_error(capfd.readouterr().err, str(dst), "is not a folder")
    assert dst.read_text() == "a file the user keeps" and os.listdir(tmp_path) == ["weights"] and no_read == []


def test_unwritable_dst_fails_before_reading_the_source(sources, tmp_path, capfd, no_read):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert convert.main([str(sources / "ViT-tiny.pt"), str(afile / "sub" / "dst")]) == 1
    _one_line_error(capfd.readouterr().err, str(afile / "sub" / "dst"), f"{afile} is a file")
    if os.geteuid() == 0:  # root writes through any mode bits; /sys refuses even root
        locked = "/sys"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
    assert convert.main([str(sources / "ViT-tiny.pt"), f"{locked}/new/dst"]) == 1
    _one_line_error(capfd.readouterr().err, f"{locked}/new/dst", "cannot create it")
    assert sorted(os.listdir(tmp_path)) == ["afile"] + ([] if os.geteuid() == 0 else ["locked"])
    assert not os.path.exists(f"{locked}/new") and no_read == []


def test_output_permissions_are_a_plain_mkdirs_and_paths_expand(sources, tmp_path, monkeypatch):
    """Folders get 0o777 & ~umask and files 0o666 & ~umask, as mkdir and a plain open give; ~ and $VARS expand."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CKPTS", str(sources))
    old = os.umask(0o027)
    try:
        assert convert.main(["$CKPTS/ViT-tiny.pt", "~/models/clip"]) == 0
        os.mkdir(tmp_path / "ref_dir")
        (tmp_path / "ref_file").write_text("")
    finally:
        os.umask(old)
    dst = tmp_path / "home" / "models" / "clip"
    want = {True: os.stat(tmp_path / "ref_dir").st_mode, False: os.stat(tmp_path / "ref_file").st_mode}
    assert want == {True: 0o40750, False: 0o100640}
    for path in [dst, dst.parent] + list(dst.rglob("*")):
        assert os.stat(path).st_mode == want[path.is_dir()], path
    assert sorted(os.listdir(dst)) == ["config.json", "params"]


# ---------------------------------------------------------------------------------- crash-safe replacement
@pytest.fixture(scope="module")
def conversion(sources, tmp_path_factory):
    """One finished conversion (image size 32,32) to copy as the 'old' DST."""
    dst = tmp_path_factory.mktemp("conversion") / "clip"
    assert convert.main([str(sources / "ViT-tiny.pt"), str(dst), "--image-size=32,32", "--stride=8"]) == 0
    return dst


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _image_size(dst):
    return json.loads((dst / "config.json").read_text())["model"]["vision"]["image_size"]


def test_rerun_cleans_what_a_killed_overwrite_left(sources, conversion, tmp_path):
    """The states a kill leaves at each instant of a conversion: DST is always a whole conversion, and the rerun
    removes the dead run's leftovers and keeps a live run's."""
    dst, dead = tmp_path / "clip", _dead_pid()
    shutil.copytree(conversion, dst)
    (tmp_path / f".clip.tmp-{dead}-0badf00d" / "params").mkdir(parents=True)  # killed while writing
    (tmp_path / f".clip.old-{dead}-0badf00d" / "params").mkdir(parents=True)  # killed while deleting the old one
    (tmp_path / f".clip.old-{dead}").mkdir()  # the name earlier versions used
    live = tmp_path / f".clip.tmp-{os.getpid()}-12345678"  # a run still going
    live.mkdir()
    assert convert.main([str(sources / "ViT-tiny.pt"), str(dst), "--image-size=48,16", "--stride=8",
                         "--overwrite"]) == 0
    assert _image_size(dst) == [48, 16] and sorted(os.listdir(tmp_path)) == [live.name, "clip"]


def test_rerun_restores_the_old_conversion_a_kill_left_outside_dst(sources, conversion, tmp_path, capfd, no_read):
    """Where the atomic exchange is missing, a kill between its two renames leaves DST absent: the rerun puts the
    old conversion back before anything else."""
    dst, dead = tmp_path / "clip", _dead_pid()
    shutil.copytree(conversion, tmp_path / f".clip.old-{dead}-0badf00d")
    shutil.copytree(conversion, tmp_path / f".clip.tmp-{dead}-0badf00d")
    assert convert.main([str(sources / "ViT-tiny.pt"), str(dst)]) == 1  # restored, then: exists
    err = capfd.readouterr().err
    assert "restored the earlier conversion" in err and "already exists" in err
    assert _tree(dst) == _tree(conversion) and os.listdir(tmp_path) == ["clip"]


def test_swap_replaces_dst_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "new").write_text("")
    (b / "old").write_text("")
    if not files.exchange(a, b):
        pytest.skip("this file system has no atomic exchange (the two-rename fallback is tested below)")
    assert os.listdir(a) == ["old"] and os.listdir(b) == ["new"]


def test_fallback_swap_and_a_failed_rename_keep_dst(sources, conversion, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "exchange", lambda a, b: False)
    dst = tmp_path / "clip"
    shutil.copytree(conversion, dst)
    before = _tree(dst)
    real_rename = convert.Path.rename

    def failing_rename(self, target):  # the second rename (new -> DST) fails: the old one must come back
        if self.name.startswith(".clip.tmp-"):
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(convert.Path, "rename", failing_rename)
    args = [str(sources / "ViT-tiny.pt"), str(dst), "--image-size=48,16", "--stride=8", "--overwrite"]
    assert convert.main(args) == 1
    assert _tree(dst) == before and os.listdir(tmp_path) == ["clip"]
    monkeypatch.setattr(convert.Path, "rename", real_rename)
    assert convert.main(args) == 0
    assert _image_size(dst) == [48, 16] and os.listdir(tmp_path) == ["clip"]
