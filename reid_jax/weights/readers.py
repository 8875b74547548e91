"""Checkpoint files -> one OpenAI-named numpy state dict, the form every CLIP source is brought to.

Read here:
  * OpenAI CLIP: the TorchScript archive (`ViT-B-16.pt`) or a plain state dict;
  * open_clip state dicts (.pt / .bin / .safetensors; training checkpoints with `state_dict` and `module.`);
  * Hugging Face `CLIPModel` folders (config.json + model.safetensors or pytorch_model.bin, sharded or not):
    renamed to OpenAI's keys, q/k/v stacked into `in_proj`.

A state file's keys are recognised by the first entry of `FILE_LAYOUTS` whose test they pass; another codebase's
checkpoint (one that keeps CLIP under names of its own) is one more `Layout` there. torch is imported only to
read .pt/.bin files.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import zipfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import jax
import numpy as np

from reid_jax.errors import UserError

CONFIG_FILE = "config.json"  # a Hugging Face folder's, and a converted folder's (`weights.converted`)
_NOT_WEIGHTS = {"input_resolution", "context_length", "vocab_size"}  # stored in OpenAI's TorchScript archive
_PREFIXES = ("module.", "base_model.", "clip.")  # DDP, IRRA and wrapper prefixes


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """The key names a checkpoint keeps CLIP under."""
    kind: str  # reported as the checkpoint's kind
    matches: Callable[[Collection[str]], bool]  # recognises the layout from the (prefix-stripped) keys
    to_openai: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # renames to OpenAI's keys


def read(path: Path, state: dict[str, np.ndarray] | None = None) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    """(kind, OpenAI-named numpy state (floats as float32), CLIPConfig fields the files state) of a CLIP checkpoint
    file or Hugging Face folder; kind 'openai' covers open_clip too. Only an HF config states fields (heads,
    activation, ln_epsilon): the rest is inferred from the shapes (`weights.mapping.infer_arch`). `state`: the file's
    contents when the caller has read them already (`read_state_file`)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; expected a CLIP checkpoint (OpenAI .pt, open_clip "
                              f".pt/.bin/.safetensors, a Hugging Face CLIPModel folder, or a converted folder)")
    if not path.is_dir() and not path.is_file():  # a pipe or device: reading would block or never end
        raise CheckpointError(f"{path}: not a regular file or folder; expected a CLIP checkpoint saved to disk")
    try:
        return _read_folder(path) if path.is_dir() else _read_file(path, state)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e}); check its permissions") from None


def _read_file(path: Path, state: dict[str, np.ndarray] | None = None
               ) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    state = _strip_prefixes(read_state_file(path) if state is None else state)
    layout = next(layout for layout in FILE_LAYOUTS if layout.matches(state.keys()))
    return layout.kind, layout.to_openai(state), {}


def _read_folder(path: Path) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(f"{path}: a folder must hold {CONFIG_FILE} (a Hugging Face CLIPModel or a "
                              f"`reid_jax.convert` output); none found")
    stated, state = _hf_arch(path, json.loads(config_file.read_text())), {}
    for f in _hf_weight_files(path):
        state.update(read_state_file(f))
    return "hf", _hf_to_openai(_strip_prefixes(state)), stated


# ------------------------------------------------------------------------------------------- reading files
def _torch_load(path: Path) -> Any:
    try:
        import torch  # only here: reading .safetensors and HF safetensors folders must not need torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading .pt/.bin checkpoints needs PyTorch; `pip install torch` "
                              f"(the CPU build is enough), or convert to .safetensors first") from e
    try:
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            return torch.jit.load(str(path), map_location="cpu").state_dict()  # OpenAI's TorchScript archive
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses arbitrary objects: loading them would run code
        raise CheckpointError(
            f"{path}: holds Python objects besides tensors, which are not loaded (unpickling them could run code: "
            f"{str(e).splitlines()[0]}). If you trust the file, keep only its weights: python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False); torch.save(c.get('model', c), 'weights.pth')\"") from e
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


def read_state_file(path: Path) -> dict[str, np.ndarray]:
    """{name: float32 or integer numpy array} of a .pt/.bin/.safetensors file, unwrapped from a training
    checkpoint's 'state_dict' / 'model' / 'module' entry; key prefixes are kept."""
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


# ------------------------------------------------------------------------------------------ OpenAI layout
def _without_archive_fields(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if k not in _NOT_WEIGHTS}


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


# --------------------------------------------------------------------------------------------- the layouts
# State files, tried in order, the catch-all last. Hugging Face names are read from folders only, where
# config.json states what the keys cannot (heads, activation).
FILE_LAYOUTS: tuple[Layout, ...] = (
    Layout("openai", lambda keys: True, _without_archive_fields),  # OpenAI's and open_clip's own names
)
