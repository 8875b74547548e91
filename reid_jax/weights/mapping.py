"""An OpenAI-named CLIP state -> our CLIP: the architecture inferred from its shapes, each parameter's name and
layout, and the model built around the mapped parameters.

Each model parameter is looked up under its OpenAI name, transposed from PyTorch's layout and shape-checked; the
position grid is resized for the model's input size and stride. All missing, unexpected and mis-shaped keys are
reported together.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx, traverse_util

from reid_jax.models import posemb as posemb_lib
from reid_jax.models.clip import CLIP, CLIPConfig
from reid_jax.weights import readers
from reid_jax.weights.readers import CheckpointError

POSEMB = ("visual", "positional_embedding")
NEW_PARAMS = {("visual", "extra_tokens")}  # not in any CLIP checkpoint: kept at their initial values


@dataclasses.dataclass
class Source:
    """A checkpoint brought to OpenAI's key names."""
    path: Path
    kind: str  # 'openai' (TorchScript or state dict, also open_clip), 'hf', or 'reid_jax'
    state: dict[str, np.ndarray]
    arch: dict[str, Any]  # CLIPConfig fields inferred from the checkpoint
    posemb_grid: tuple[int, int]  # grid of the position embedding as pretrained


def read_source(path, state: dict[str, np.ndarray] | None = None) -> Source:
    """Reads an OpenAI / open_clip / Hugging Face CLIP checkpoint into OpenAI's names, with its architecture
    (`state`: the file's contents, when already read with `readers.read_state_file`)."""
    path = Path(path)
    kind, state, stated = readers.read(path, state)
    arch, grid = infer_arch(path, state)
    return Source(path, kind, state, merge_arch(arch, stated), grid)


# ------------------------------------------------------------------------------------------ architecture
def _count_blocks(state: dict, prefix: str) -> int:
    ids = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def infer_arch(path: Path, state: dict[str, np.ndarray], optional: Collection[str] = ()
               ) -> tuple[dict[str, Any], tuple[int, int]]:
    """CLIPConfig fields from OpenAI-named shapes (heads = width / 64, OpenAI's rule) and the pretrained grid,
    assumed square. Keys in `optional` may be absent (a released model without a token table): the fields they
    tell keep CLIPConfig's defaults."""
    if any(k.startswith("visual.layer1.") for k in state):
        raise CheckpointError(f"{path}: this is a ResNet CLIP (RN50/RN101/...); reid-jax needs a ViT CLIP "
                              f"such as ViT-B/16")
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
              "positional_embedding", "ln_final.weight", "visual.transformer.resblocks.0.mlp.c_fc.weight",
              "transformer.resblocks.0.mlp.c_fc.weight"]
    absent = [k for k in needed if k not in state and k not in optional]
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
        "text": {"context_length": state["positional_embedding"].shape[0], "width": twidth,
                 "layers": _count_blocks(state, "transformer.resblocks."), "heads": twidth // 64,
                 "mlp_dim": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]},
        "embed_dim": state["visual.proj"].shape[1],
    }
    if "token_embedding.weight" in state:
        arch["text"]["vocab_size"] = state["token_embedding.weight"].shape[0]
    return arch, (side, side)


def merge_arch(base: dict, extra: dict) -> dict:
    """CLIPConfig fields `base` updated by `extra`, the two towers' sub-fields merged one by one."""
    out = {**base, **{k: v for k, v in extra.items() if k not in ("vision", "text")}}
    for tower in ("vision", "text"):
        out[tower] = {**base.get(tower, {}), **extra.get(tower, {})}
    return out


def model_config(arch: dict, image_size, stride: int, overrides: dict) -> CLIPConfig:
    """The CLIPConfig of architecture `arch` at `image_size` (H, W) and patch `stride`, with `overrides` over it."""
    arch = merge_arch(arch, {"vision": {"image_size": tuple(image_size), "stride": stride}})
    cfg = CLIPConfig().replace(**merge_arch(arch, overrides))
    cfg.validate()
    if cfg.vision.stride != cfg.vision.patch_size:
        logging.warning("patch stride %d differs from the patch size %d: overlapping patches, grid %s",
                        cfg.vision.stride, cfg.vision.patch_size, cfg.vision.grid)
    return cfg


def architecture(cfg: CLIPConfig) -> dict:
    """A config's architecture fields: input size, stride, part tokens and compute settings are the loader's to
    choose."""
    d = cfg.to_dict()
    for tower in ("vision", "text"):
        d[tower] = {k: v for k, v in d[tower].items() if k not in ("image_size", "stride", "num_extra_tokens")}
    return {k: v for k, v in d.items() if k not in ("dtype", "remat", "scan_layers", "attention", "pad_tokens_to")}


def source_of(clip: CLIP, path: Path, kind: str) -> Source:
    """A built CLIP as a `Source` (OpenAI's names and layouts, its own grid as the pretrained one): what
    `reid_jax.convert` writes for a checkpoint that is read into a model first (an authors' release)."""
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(clip, nnx.Param)))
    state = {openai_name(p): to_torch_layout(p, np.asarray(v)) for p, v in params.items() if p not in NEW_PARAMS}
    return Source(Path(path), kind, state, architecture(clip.config), clip.config.vision.grid)


def describe(cfg: CLIPConfig) -> str:
    v, t = cfg.vision, cfg.text
    return (f"vision {v.layers}x{v.width} patch {v.patch_size}, text {t.layers}x{t.width} vocab {t.vocab_size}, "
            f"embed {cfg.embed_dim}")


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


def from_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    """A PyTorch weight in our parameter `path`'s layout: conv and linear kernels transposed."""
    if path[-1] == "kernel" and value.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel":  # Linear [out, in] -> [in, out]
        return value.T
    return value


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    """Inverse of `from_torch_layout`."""
    if path[-1] == "kernel" and value.ndim == 4:  # conv [kh, kw, in, out] -> [out, in, kh, kw]
        return value.transpose(3, 2, 0, 1)
    return value.T if path[-1] == "kernel" else value


def _torch_shape(path: tuple, shape: tuple) -> list[int]:
    """Inverse of `from_torch_layout` on a shape, to report shapes as the checkpoint holds them."""
    return list(to_torch_layout(path, np.broadcast_to(np.bool_(0), shape)).shape)  # a view: nothing allocated


def abstract_params(cfg: CLIPConfig) -> dict[tuple, jax.ShapeDtypeStruct]:
    """{flat path: ShapeDtypeStruct} of the parameters of a CLIP of `cfg`, without building it."""
    model = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def map_params(source: Source, cfg: CLIPConfig, posemb_interpolation: str, optional: Collection[str] = ()
               ) -> dict[tuple, np.ndarray]:
    """Model parameters (flat paths) from an OpenAI-named state, with the position grid resized for `cfg`. Keys in
    `optional` may be absent: those parameters are left out (`with_params` initialises them)."""
    missing, misshaped, out = [], [], {}
    used = set()
    for path, spec in abstract_params(cfg).items():
        if path in NEW_PARAMS:
            continue
        name = openai_name(path)
        if name not in source.state:
            if name not in optional:
                missing.append(name)
            continue
        used.add(name)
        value = from_torch_layout(path, source.state[name])
        if path == POSEMB and value.shape != spec.shape:
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
                              f"({describe(cfg)}):\n  " + "\n  ".join(problems))
    return out


# ----------------------------------------------------------------------------------------- model building
def with_params(cfg: CLIPConfig, params: dict[tuple, np.ndarray], seed: int = 0) -> CLIP:
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
