"""MUVA's released checkpoints: `torch.save(model.state_dict())` of the authors' MUVA model, read as saved.

Their keys (ViT-B/16 at 256 x 128, stride 16, R = 3 parts, L = 128 patches):

  image_encoder.*                  CLIP's image tower under OpenAI's names without 'visual.'; its
                                   positional_embedding is [1 + R + L, D]: CLS, one row per part token, the grid
  text_encoder.{transformer.*, positional_embedding, ln_final.*, text_projection}   the text tower (no token
                                   table, no logit scale: the prompt learner keeps embedded prompts outside the
                                   state dict)
  local_token [R, D]               the part tokens
  residual_mask_predictor.blocks.N.{ln_attn1, ln_attn2, ln_mlp, cross_attn.to_{q,k,v}, cross_attn.to_out.0,
                                   mlp.0, mlp.2}   one RMP per block (the LayerNorms only when configured)
  bnneck.{weight, bias, running_mean, running_var, num_batches_tracked}   the BNNeck of the [(1 + R) E] feature
  fc.weight [C, (1 + R) E]         the ID classifier
  prompt_learner.learnable_ctx [C, 1 + R, n, Dt]   stage 1's context vectors

Our part tokens get CLS's position row added, theirs their own rows: ours are set to
local_token + pe[1 : 1 + R] - pe[0], so every part token enters the first block exactly as in their model, and
pe[0] with the grid rows pe[1 + R:] is the CLIP's position embedding.

What a file does not record comes from the authors' published configs: inner shortcut on, tau 1, gating threshold
0.5, and the RMP's attention heads (2 for the Market-trained model, 8 for the MSMT17-trained one, told by the
classifier's 1041 MSMT17 identities; `rmp_heads=` overrides).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from reid_jax.models import posemb as posemb_lib
from reid_jax.models.clip import CLIP
from reid_jax.models.muva import MUVAModel, RMPConfig
from reid_jax.weights.readers import CheckpointError
from reid_jax.weights.released import Loaded, common

KIND = "muva"
PUBLISHED = (((256, 128), 16),)  # INPUT.SIZE_TRAIN and MODEL.STRIDE_SIZE of both published configs
MSMT17_IDENTITIES = 1041  # the MS -> MA model: its config uses 8 RMP heads, the MA -> MS one 2
RMP = "residual_mask_predictor.blocks."
_TEXT = {"text_encoder.transformer.": "transformer.", "text_encoder.ln_final.": "ln_final.",
         "text_encoder.positional_embedding": "positional_embedding",
         "text_encoder.text_projection": "text_projection"}
OPTIONAL = common.TEXT_KEYS + ("logit_scale",)  # neither is in their state dict


def matches(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return "local_token" in keys and "image_encoder.conv1.weight" in keys and any(k.startswith(RMP) for k in keys)


# ------------------------------------------------------------------------------------------------ reading
def _num_parts(path: Path, state: dict[str, np.ndarray]) -> int:
    tokens = state["local_token"]
    if tokens.ndim != 2:
        raise CheckpointError(f"{path}: local_token has shape {list(tokens.shape)}, expected [R, width]")
    return tokens.shape[0]


def openai_state(path: Path, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Their CLIP under OpenAI's names: the image tower with the part rows taken out of its position grid."""
    r = _num_parts(path, state)
    out = {"visual." + k: v for k, v in common.under(state, "image_encoder.").items()}
    pe = out.get("visual.positional_embedding")
    if pe is None or pe.ndim != 2 or pe.shape[0] <= 1 + r:
        raise CheckpointError(f"{path}: image_encoder.positional_embedding is {None if pe is None else list(pe.shape)}"
                              f", expected [1 + {r} parts + patches, width]")
    out["visual.positional_embedding"] = np.concatenate([pe[:1], pe[1 + r:]])
    for theirs, ours in _TEXT.items():
        out.update({ours + k: v for k, v in common.under(state, theirs).items()})
    return out


def folded_part_tokens(state: dict[str, np.ndarray]) -> np.ndarray:
    """[R, D] part tokens for a model that adds CLS's position row: local_token + their own rows - CLS's row."""
    r, pe = state["local_token"].shape[0], state["image_encoder.positional_embedding"]
    return state["local_token"] + pe[1: 1 + r] - pe[0]


def _linear(prefix: tuple, state: dict, key: str) -> dict[tuple, np.ndarray]:
    out = {prefix + ("kernel",): state[key + ".weight"].T}
    if key + ".bias" in state:
        out[prefix + ("bias",)] = state[key + ".bias"]
    return out


def _layer_norm(prefix: tuple, state: dict, key: str) -> dict[tuple, np.ndarray]:
    if key + ".weight" not in state:
        return {}
    return {prefix + ("norm", "scale"): state[key + ".weight"], prefix + ("norm", "bias"): state[key + ".bias"]}


def _required(layers: int) -> list[str]:
    """The keys every MUVA file has (the RMP's LayerNorms are optional: a config can leave them out)."""
    per_block = ["cross_attn.to_q.weight", "cross_attn.to_k.weight", "cross_attn.to_v.weight",
                 "cross_attn.to_out.0.weight", "cross_attn.to_out.0.bias", "mlp.0.weight", "mlp.0.bias",
                 "mlp.2.weight", "mlp.2.bias"]
    return [f"{RMP}{i}.{k}" for i in range(layers) for k in per_block] + [
        f"bnneck.{k}" for k in ("weight", "bias", "running_mean", "running_var")]


def check_keys(path: Path, state: dict[str, np.ndarray], layers: int) -> None:
    missing = [k for k in _required(layers) if k not in state]
    if missing:
        raise CheckpointError(f"{path}: a MUVA checkpoint of {layers} blocks lacks {len(missing)} keys: "
                              f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; save the whole "
                              f"model.state_dict() as the authors' trainer does")


def rmp_params(state: dict[str, np.ndarray], layers: int) -> dict[tuple, np.ndarray]:
    """{our MUVAModel parameter path: array} of the RMPs of `layers` blocks."""
    out = {}
    for i in range(layers):
        theirs, ours = f"{RMP}{i}.", ("rmp", i)
        for name, key in (("ln_q", "ln_attn1"), ("ln_kv", "ln_attn2"), ("ln_mlp", "ln_mlp")):
            out.update(_layer_norm(ours + (name,), state, theirs + key))
        for name in ("to_q", "to_k", "to_v"):
            out.update(_linear(ours + ("attn", name), state, f"{theirs}cross_attn.{name}"))
        out.update(_linear(ours + ("attn", "to_out"), state, f"{theirs}cross_attn.to_out.0"))
        out.update(_linear(ours + ("fc1",), state, f"{theirs}mlp.0"))
        out.update(_linear(ours + ("fc2",), state, f"{theirs}mlp.2"))
    return out


def bnneck_arrays(state: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
    """{path under MUVAModel: array} of the BNNeck (scale, frozen shift, running mean and variance)."""
    names = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    return {("bnneck", ours): state[f"bnneck.{theirs}"] for theirs, ours in names.items()
            if f"bnneck.{theirs}" in state}


def model_arrays(state: dict[str, np.ndarray], layers: int) -> dict[tuple, np.ndarray]:
    """Everything of MUVAModel beyond the CLIP's own mapped weights: part tokens, RMPs and BNNeck."""
    return {("clip", "visual", "extra_tokens"): folded_part_tokens(state)} | rmp_params(state, layers) | \
        bnneck_arrays(state)


def set_arrays(path: Path, module: nnx.Module, arrays: dict[tuple, np.ndarray], strict: bool = True) -> list[str]:
    """Copies `arrays` ({path: array}) into `module`'s variables. Strict: every path must exist with its shape
    (else a CheckpointError listing them); otherwise those that do not fit are skipped and returned by name."""
    have = dict(nnx.to_flat_state(nnx.state(module)))
    fit, problems = {}, []
    for p, value in arrays.items():
        var = have.get(p)
        if var is None or var[...].shape != value.shape:
            problems.append(f"{'.'.join(map(str, p))}: file {list(value.shape)}, model "
                            f"{'absent' if var is None else list(var[...].shape)}")
            continue
        fit[p] = jnp.asarray(value, jnp.float32)
    if problems and strict:
        raise CheckpointError(f"{path}: does not fit the MUVA model built from it: " + "; ".join(problems[:8]))
    nnx.update(module, nnx.from_flat_state(fit))
    return problems


# ------------------------------------------------------------------------------------------------- models
def _trained(path: Path, state: dict, image_size, stride) -> tuple[tuple[int, int], int]:
    r = _num_parts(path, state)
    num_patches = state["image_encoder.positional_embedding"].shape[0] - 1 - r
    patch = state["image_encoder.conv1.weight"].shape[-1]
    return common.trained_input(path, num_patches, patch, image_size, stride, PUBLISHED)


def clip(path: Path, state: dict[str, np.ndarray], image_size, stride, overrides) -> CLIP:
    """The file's CLIP with its part tokens folded in (`overrides` may set vision.num_extra_tokens = 0 for CLS
    only, or another count: those tokens then keep their initial values)."""
    path = Path(path)
    overrides = dict(overrides or {})
    r = _num_parts(path, state)
    vision = {"num_extra_tokens": r, **overrides.get("vision", {})}
    model = common.build_clip(path, KIND, openai_state(path, state), _trained(path, state, image_size, stride),
                              image_size, stride, overrides={**overrides, "vision": vision}, optional=OPTIONAL)
    if model.config.vision.num_extra_tokens == r:
        model.visual.extra_tokens[...] = jnp.asarray(folded_part_tokens(state))
    return model


def published_rmp_heads(state: dict[str, np.ndarray]) -> int:
    """The published config's RMP heads for this file (not recorded in it): 8 for MSMT17-trained, else 2."""
    fc = state.get("fc.weight")
    return 8 if fc is not None and fc.shape[0] == MSMT17_IDENTITIES else 2


def build(path: Path, state: dict[str, np.ndarray], image_size=None, stride=None, overrides=None,
          settings: RMPConfig | None = None) -> MUVAModel:
    """The file's whole MUVAModel (CLIP, part tokens, RMPs, BNNeck). Its RMP maps onto exactly the L patches it
    was trained with, so `image_size` / `stride` must give that many."""
    path = Path(path)
    trained = _trained(path, state, image_size, stride)
    size, s = tuple(image_size or trained[0]), stride or trained[1]
    patch = state["image_encoder.conv1.weight"].shape[-1]
    num_patches = state["image_encoder.positional_embedding"].shape[0] - 1 - _num_parts(path, state)
    rows, cols = posemb_lib.grid_size(size, patch, s)
    if rows * cols != num_patches:
        (th, tw), ts = trained
        raise CheckpointError(f"{path}: MUVA's mask predictor maps onto the {num_patches} patches it was trained "
                              f"with ({th}x{tw} stride {ts}); {size[0]}x{size[1]} stride {s} gives {rows * cols}: "
                              f"load it at its trained size")
    model_clip = clip(path, state, size, s, overrides)
    check_keys(path, state, model_clip.config.vision.layers)
    settings = settings or RMPConfig(heads=published_rmp_heads(state))
    model = MUVAModel(model_clip, settings, rngs=nnx.Rngs(0))
    set_arrays(path, model, rmp_params(state, model_clip.config.vision.layers) | bnneck_arrays(state))
    return model


def encoder(path: Path, state: dict[str, np.ndarray], image_size, stride, camera_coefficient,
            rmp_heads: int | None = None) -> Loaded:
    """The test-time model: BN(f) of the four tokens with the model's own masks (`infer_image(after_bn=True)`)."""
    if camera_coefficient is not None:
        logging.warning("%s: a MUVA model has no camera embedding; camera_coefficient=%s is ignored", path,
                        camera_coefficient)
    heads = rmp_heads or published_rmp_heads(state)
    model = build(path, state, image_size, stride, settings=RMPConfig(heads=heads))
    v = model.clip.config.vision
    mean, std = common.HALF_MEAN_STD
    return Loaded(kind=KIND, model=model, image_fn=lambda m, images, camids=None: m.image_features(images),
                  text_fn=None, image_size=tuple(v.image_size), mean=mean, std=std,
                  info={"stride": v.stride, "grid": v.grid, "parts": model.num_parts, "rmp_heads": heads,
                        "classes": int(state["fc.weight"].shape[0]) if "fc.weight" in state else None})

