"""PyTorch CLIP checkpoints -> reid-jax CLIP parameters; the `python -m reid_jax.convert` CLI.

Sources read:
  * OpenAI CLIP: the TorchScript archive (`ViT-B-16.pt`) or a plain state dict;
  * open_clip state dicts (.pt / .bin / .safetensors; training checkpoints with `state_dict` and `module.`);
  * Hugging Face `CLIPModel` folders (config.json + model.safetensors or pytorch_model.bin, sharded or not);
  * a folder written by this module (orbax parameters + config.json).

Every source is first brought to OpenAI's key names (Hugging Face's q/k/v are stacked into `in_proj`), the
architecture is inferred from the shapes (or HF's config), and each model parameter is then looked up under its
OpenAI name, transposed from PyTorch's layout and shape-checked. All missing, unexpected and mis-shaped keys are
reported together. torch is imported only to read .pt/.bin files.

    python -m reid_jax.convert ViT-B-16.pt clip_b16_384x128 --image-size=384,128 [--stride=16]

DST is checked before the source is read, and written as a temporary folder beside it that replaces DST only once
complete; --overwrite replaces an earlier conversion only, never another folder.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import re
import secrets
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx, traverse_util

from reid_jax.errors import UserError, expand_path, report, warn
from reid_jax.models import posemb as posemb_lib
from reid_jax.models.clip import CLIP, CLIPConfig

FORMAT = "reid_jax.clip/v1"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
_POSEMB = ("visual", "positional_embedding")
_NEW_PARAMS = {("visual", "extra_tokens")}  # not in any CLIP checkpoint: kept at their initial values
_NOT_WEIGHTS = {"input_resolution", "context_length", "vocab_size"}  # stored in OpenAI's TorchScript archive
_PREFIXES = ("module.", "base_model.", "clip.")  # DDP, IRRA and wrapper prefixes


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


@dataclasses.dataclass
class Source:
    """A checkpoint brought to OpenAI's key names."""
    path: Path
    kind: str  # 'openai' (TorchScript or state dict, also open_clip), 'hf', or 'reid_jax'
    state: dict[str, np.ndarray]
    arch: dict[str, Any]  # CLIPConfig fields inferred from the checkpoint
    posemb_grid: tuple[int, int]  # grid of the position embedding as pretrained


# ------------------------------------------------------------------------------------------- reading files
def _torch_load(path: Path) -> Any:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading .pt/.bin checkpoints needs PyTorch; `pip install torch` "
                              f"(the CPU build is enough), or convert to .safetensors first") from e
    try:
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            return torch.jit.load(str(path), map_location="cpu").state_dict()  # OpenAI's TorchScript archive
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: could not be read as a PyTorch checkpoint ({type(e).__name__}: {e}). "
                              f"The file is truncated or not a checkpoint: download it again.") from e


def _to_numpy(obj: dict) -> dict[str, np.ndarray]:
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):  # torch tensor; half/bfloat16 go through float32
            v = v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy()
        out[k] = np.asarray(v)
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.flax import load_file  # handles bfloat16, which numpy lacks

    try:
        return {k: np.asarray(v.astype(np.float32) if jax.numpy.issubdtype(v.dtype, jax.numpy.floating) else v)
                for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: could not be read as safetensors ({e}). The file is truncated or not a "
                              f"safetensors checkpoint: download it again.") from e


def _read_state_file(path: Path) -> dict[str, np.ndarray]:
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; download it again")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _torch_load(path)
    for key in ("state_dict", "model", "module"):  # training checkpoints wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found a {type(obj).__name__}; "
                              f"save the model's state_dict() instead")
    return _to_numpy(obj)


def _strip_prefixes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------- Hugging Face layout
_HF_RENAMES = [  # (regex over HF names, OpenAI name); q/k/v and the projections are handled apart
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.conv1.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"visual.ln_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"vision_model\.encoder\.layers\.", "visual.transformer.resblocks."),
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    (r"text_model\.encoder\.layers\.", "transformer.resblocks."),
    (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
    (r"\.layer_norm1\.", ".ln_1."),
    (r"\.layer_norm2\.", ".ln_2."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]


def _hf_to_openai(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames HF CLIPModel weights to OpenAI's; stacks q/k/v; transposes the two projections."""
    out, qkv = {}, {}
    for name, value in state.items():
        if name.endswith("position_ids"):  # a buffer older HF checkpoints saved
            continue
        m = re.fullmatch(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)", name)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        if name in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if name.startswith("visual") else "text_projection"] = value.T
            continue
        for pattern, repl in _HF_RENAMES:
            name = re.sub(pattern, repl, name)
        out[name] = value
    for (layer, kind), parts in qkv.items():
        for pattern, repl in _HF_RENAMES:
            layer = re.sub(pattern, repl, layer)
        if len(parts) != 3:
            out[f"{layer}.self_attn.{''.join(sorted(parts))}_proj.{kind} (q/k/v incomplete)"] = next(iter(parts.values()))
            continue
        out[f"{layer}.attn.in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def _hf_weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
    raise CheckpointError(f"{folder}: a Hugging Face CLIPModel folder needs model.safetensors or pytorch_model.bin "
                          f"(or a sharded index) beside config.json; none found")


def _hf_arch(folder: Path, hf: dict) -> dict[str, Any]:
    if hf.get("model_type") != "clip" or "vision_config" not in hf:
        raise CheckpointError(f"{folder / CONFIG_FILE}: expected a Hugging Face CLIPModel config (model_type 'clip' "
                              f"with vision_config and text_config), found model_type {hf.get('model_type')!r}")
    vc, tc = hf["vision_config"], hf["text_config"]
    acts = {vc.get("hidden_act", "quick_gelu"), tc.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(f"{folder}: unsupported activation(s) {sorted(acts)}; expected quick_gelu or gelu")
    return {"vision": {"heads": vc["num_attention_heads"]}, "text": {"heads": tc["num_attention_heads"]},
            "activation": acts.pop(), "ln_epsilon": vc.get("layer_norm_eps", 1e-5)}


# ------------------------------------------------------------------------------------------ architecture
def _count_blocks(state: dict, prefix: str) -> int:
    ids = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _infer_arch(path: Path, state: dict[str, np.ndarray]) -> tuple[dict[str, Any], tuple[int, int]]:
    """CLIPConfig fields from OpenAI-named shapes (heads = width / 64, OpenAI's rule) and the pretrained grid."""
    if any(k.startswith("visual.layer1.") for k in state):
        raise CheckpointError(f"{path}: this is a ResNet CLIP (RN50/RN101/...); reid-jax needs a ViT CLIP "
                              f"such as ViT-B/16")
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
              "positional_embedding", "ln_final.weight", "visual.transformer.resblocks.0.mlp.c_fc.weight",
              "transformer.resblocks.0.mlp.c_fc.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        sample = ", ".join(sorted(state)[:6])
        raise CheckpointError(f"{path}: does not look like a CLIP ViT checkpoint: missing {absent}. Expected OpenAI/"
                              f"open_clip names (visual.conv1.weight, visual.transformer.resblocks.N..., "
                              f"token_embedding.weight, ...) or a Hugging Face CLIPModel folder; found "
                              f"{len(state)} keys such as {sample}")
    conv, pos = state["visual.conv1.weight"], state["visual.positional_embedding"]
    side = int(round((pos.shape[0] - 1) ** 0.5))
    vwidth, twidth = conv.shape[0], state["ln_final.weight"].shape[0]
    arch = {
        "vision": {"width": vwidth, "layers": _count_blocks(state, "visual.transformer.resblocks."),
                   "heads": vwidth // 64, "patch_size": conv.shape[-1],
                   "mlp_dim": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]},
        "text": {"vocab_size": state["token_embedding.weight"].shape[0],
                 "context_length": state["positional_embedding"].shape[0], "width": twidth,
                 "layers": _count_blocks(state, "transformer.resblocks."), "heads": twidth // 64,
                 "mlp_dim": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]},
        "embed_dim": state["visual.proj"].shape[1],
    }
    return arch, (side, side)


def _merge_arch(base: dict, extra: dict) -> dict:
    out = {**base, **{k: v for k, v in extra.items() if k not in ("vision", "text")}}
    for tower in ("vision", "text"):
        out[tower] = {**base.get(tower, {}), **extra.get(tower, {})}
    return out


def read_source(path) -> Source:
    """Reads an OpenAI / open_clip / Hugging Face CLIP checkpoint into OpenAI's names, with its architecture."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; expected a CLIP checkpoint (OpenAI .pt, open_clip "
                              f".pt/.bin/.safetensors, a Hugging Face CLIPModel folder, or a converted folder)")
    if not path.is_dir() and not path.is_file():  # a pipe or device: reading would block or never end
        raise CheckpointError(f"{path}: not a regular file or folder; expected a CLIP checkpoint saved to disk")
    try:
        return _read_source(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e}); check its permissions") from None


def _read_source(path: Path) -> Source:
    if path.is_dir():
        config_file = path / CONFIG_FILE
        if not config_file.exists():
            raise CheckpointError(f"{path}: a folder must hold {CONFIG_FILE} (a Hugging Face CLIPModel or a "
                                  f"`reid_jax.convert` output); none found")
        extra, state, kind = _hf_arch(path, json.loads(config_file.read_text())), {}, "hf"
        for f in _hf_weight_files(path):
            state.update(_read_state_file(f))
        state = _hf_to_openai(_strip_prefixes(state))
    else:
        state, kind, extra = _strip_prefixes(_read_state_file(path)), "openai", {}
        for k in _NOT_WEIGHTS:
            state.pop(k, None)
    arch, grid = _infer_arch(path, state)
    return Source(path, kind, state, _merge_arch(arch, extra), grid)


# ------------------------------------------------------------------------------------------- name mapping
def openai_name(path: tuple) -> str:
    """Model parameter path -> OpenAI checkpoint key, e.g. ('text', 'proj') -> 'text_projection'."""
    parts = [str(p) for p in path if p != "norm"]  # our LayerNorm wraps nnx.LayerNorm as `.norm`
    tower, rest = parts[0], parts[1:]
    if tower == "logit_scale":
        return "logit_scale"
    if tower == "text" and rest == ["proj"]:
        return "text_projection"
    prefix = "visual." if tower == "visual" else ""
    *modules, leaf = rest
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    if modules and modules[-1] == "in_proj":  # OpenAI keeps the fused q/k/v as attn.in_proj_{weight,bias}
        return prefix + ".".join(modules[:-1]) + f".in_proj_{leaf}"
    return prefix + ".".join(modules + [leaf])


def _from_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel":  # Linear [out, in] -> [in, out]
        return value.T
    return value


def _torch_shape(path: tuple, shape: tuple) -> list[int]:
    """Inverse of `_from_torch_layout` on a shape, to report shapes as the checkpoint holds them."""
    if path[-1] == "kernel" and len(shape) == 4:
        return [shape[3], shape[2], shape[0], shape[1]]
    return list(shape[::-1]) if path[-1] == "kernel" else list(shape)


def _abstract_params(cfg: CLIPConfig) -> dict[tuple, jax.ShapeDtypeStruct]:
    model = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def map_params(source: Source, cfg: CLIPConfig, posemb_interpolation: str) -> dict[tuple, np.ndarray]:
    """Model parameters (flat paths) from an OpenAI-named state, with the position grid resized for `cfg`."""
    missing, misshaped, out = [], [], {}
    used = set()
    for path, spec in _abstract_params(cfg).items():
        if path in _NEW_PARAMS:
            continue
        name = openai_name(path)
        if name not in source.state:
            missing.append(name)
            continue
        used.add(name)
        value = _from_torch_layout(path, source.state[name])
        if path == _POSEMB and value.shape != spec.shape:
            value = posemb_lib.resize_posemb(value, cfg.vision.grid, posemb_interpolation, source.posemb_grid)
        if value.shape != spec.shape:
            misshaped.append(f"{name}: expected {_torch_shape(path, spec.shape)}, "
                             f"found {list(source.state[name].shape)}")
            continue
        out[path] = value.astype(np.float32)
    unexpected = sorted(set(source.state) - used)
    problems = ([f"missing keys: {missing}"] if missing else []) + (
        [f"unexpected keys: {unexpected}"] if unexpected else []) + (
        [f"mis-shaped keys: {misshaped}"] if misshaped else [])
    if problems:
        raise CheckpointError(f"{source.path}: does not match the CLIP architecture inferred from it "
                              f"({_describe(cfg)}):\n  " + "\n  ".join(problems))
    return out


def _describe(cfg: CLIPConfig) -> str:
    v, t = cfg.vision, cfg.text
    return (f"vision {v.layers}x{v.width} patch {v.patch_size}, text {t.layers}x{t.width} vocab {t.vocab_size}, "
            f"embed {cfg.embed_dim}")


# ----------------------------------------------------------------------------------------- model building
def build_model(cfg: CLIPConfig, params: dict[tuple, np.ndarray], seed: int = 0) -> CLIP:
    """A CLIP with `params` (flat paths) set; parameters absent from `params` get their initial values.

    The model is built abstractly and only the absent parameters are initialised (a jitted init whose unused
    outputs XLA drops): a full eager random init of ViT-B/16 would cost more than loading it.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(seed))))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    fresh = tuple(p for p in flat if p not in params)

    @jax.jit
    def init_fresh():
        full = nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(seed))))
        return [traverse_util.flatten_dict(full)[p] for p in fresh]

    flat.update(zip(fresh, init_fresh()) if fresh else ())
    flat.update({k: jax.numpy.asarray(v) for k, v in params.items()})
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    return nnx.merge(graphdef, state)


def _model_config(arch: dict, image_size, stride: int, overrides: dict) -> CLIPConfig:
    arch = _merge_arch(arch, {"vision": {"image_size": tuple(image_size), "stride": stride}})
    cfg = CLIPConfig().replace(**_merge_arch(arch, overrides))
    cfg.validate()
    if cfg.vision.stride != cfg.vision.patch_size:
        logging.warning("patch stride %d differs from the patch size %d: overlapping patches, grid %s",
                        cfg.vision.stride, cfg.vision.patch_size, cfg.vision.grid)
    return cfg


def _is_converted(path: Path) -> bool:
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):  # no config.json, unreadable, or not JSON: not ours
        return False
    return path.is_dir() and isinstance(meta, dict) and meta.get("format") == FORMAT


def load(path, image_size=(224, 224), stride=16, posemb_interpolation="bilinear", **overrides) -> CLIP:
    """Any supported checkpoint -> CLIP for `image_size`/`stride`; see `reid_jax.models.clip.load_pretrained`."""
    path = Path(path)
    if path.exists() and _is_converted(path):
        return _load_converted(path, image_size, stride, posemb_interpolation, overrides)
    source = read_source(path)
    cfg = _model_config(source.arch, image_size, stride, overrides)
    return build_model(cfg, map_params(source, cfg, posemb_interpolation))


# ------------------------------------------------------------------------------------ converted folders
def _converted_tree(params: dict[tuple, np.ndarray], source_posemb: np.ndarray) -> dict:
    # The pretrained grid is kept beside the resized one so that loading at another size resizes from it.
    return {"params": traverse_util.unflatten_dict({tuple(map(str, k)): v for k, v in params.items()}),
            "source_posemb": source_posemb}


def save_converted(dst, source: Source, cfg: CLIPConfig, posemb_interpolation: str, overwrite: bool = False):
    """Writes DST = {config.json, params/ (orbax)}; DST appears only once complete (see `_staging`, `_publish`)."""
    dst = _output_path(dst)
    with _staging(dst, overwrite) as tmp:
        _write_converted(tmp, source, cfg, posemb_interpolation)
        _publish(tmp, dst)
    return dst


def _write_converted(folder: Path, source: Source, cfg: CLIPConfig, posemb_interpolation: str) -> None:
    import orbax.checkpoint as ocp

    params = map_params(source, cfg, posemb_interpolation)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(folder / PARAMS_DIR, _converted_tree(params, source.state["visual.positional_embedding"]))
    ckptr.wait_until_finished()
    meta = {"format": FORMAT, "model": cfg.to_dict(), "posemb_interpolation": posemb_interpolation,
            "source": {"path": str(source.path), "kind": source.kind, "posemb_grid": list(source.posemb_grid)}}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


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
    if dst.is_dir() and not _is_converted(dst):
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
        if m[1] == "old" and not dst.exists() and _is_converted(entry):
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


def _load_converted(path: Path, image_size, stride, posemb_interpolation, overrides) -> CLIP:
    import orbax.checkpoint as ocp

    meta = json.loads((path / CONFIG_FILE).read_text())
    stored = CLIPConfig.from_dict(meta["model"])
    cfg = _model_config(_config_fields(stored), image_size, stride, overrides)
    if not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path}: {PARAMS_DIR}/ is missing: the conversion did not complete. Convert again "
                              f"with `python -m reid_jax.convert SRC {path} --overwrite`")
    source_positions = 1 + int(np.prod(meta["source"]["posemb_grid"]))
    target = _converted_tree({k: v for k, v in _abstract_params(stored).items() if k not in _NEW_PARAMS},
                             jax.ShapeDtypeStruct((source_positions, stored.vision.width), np.float32))
    try:
        tree = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
    except Exception as e:
        raise CheckpointError(f"{path}: could not restore the converted parameters ({type(e).__name__}: {e}). "
                              f"The folder is incomplete or damaged: convert again with "
                              f"`python -m reid_jax.convert SRC {path} --overwrite`") from e
    params = {tuple(int(p) if p.isdigit() else p for p in k): np.asarray(v)
              for k, v in traverse_util.flatten_dict(tree["params"]).items()}
    if (cfg.vision.grid, posemb_interpolation) != (stored.vision.grid, meta["posemb_interpolation"]):
        params[_POSEMB] = posemb_lib.resize_posemb(np.asarray(tree["source_posemb"]), cfg.vision.grid,
                                                   posemb_interpolation, tuple(meta["source"]["posemb_grid"]))
    return build_model(cfg, params)


def _config_fields(cfg: CLIPConfig) -> dict:
    d = cfg.to_dict()
    for tower in ("vision", "text"):
        d[tower] = {k: v for k, v in d[tower].items() if k not in ("image_size", "stride", "num_extra_tokens")}
    return {k: v for k, v in d.items() if k not in ("dtype", "remat", "scan_layers", "attention")}


# ---------------------------------------------------------------------------------------------------- CLI
def _parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.split(","))
        return h, w
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size expects H,W such as 384,128; got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="OpenAI .pt, open_clip .pt/.bin/.safetensors, or a Hugging Face CLIPModel folder")
    parser.add_argument("dst", help="output folder (orbax parameters + config.json)")
    parser.add_argument("--image-size", type=_parse_hw, default=(224, 224), help="H,W of the ReID input")
    parser.add_argument("--stride", type=int, default=16, help="patch stride (12 = CLIP-ReID's overlap)")
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
            source = read_source(src)
            overrides = {"activation": args.activation} if args.activation else {}
            cfg = _model_config(source.arch, args.image_size, args.stride, overrides)
            _write_converted(tmp, source, cfg, args.posemb_interpolation)
            _publish(tmp, dst)
    except UserError as e:
        return report(e)
    except OSError as e:  # the disk filled, a folder vanished mid-write: DST is still the old one or absent
        return report(CheckpointError(f"DST {args.dst}: writing the conversion failed ({e}); nothing was replaced"))
    print(f"wrote {dst}: {source.kind} checkpoint, {_describe(cfg)}, grid {cfg.vision.grid} "
          f"({args.posemb_interpolation} from {source.posemb_grid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
