"""The CLIP to use: `load_clip` for any weights source, `model_for` for a training config's starting model."""

from __future__ import annotations

from pathlib import Path

from absl import logging
from flax import nnx

from reid_jax.errors import expand_path
from reid_jax.models.clip import CLIP, CLIPConfig
from reid_jax.weights import converted, mapping, released, runs


def load_clip(source, image_size=(224, 224), stride=None, posemb_interpolation="bilinear", **overrides) -> CLIP:
    """The CLIP in `source`, for inputs of `image_size` (H, W) cut into patches every `stride` pixels (None: the
    patch size, or a conversion's or release's own stride).

    `source`: a `reid_jax.convert` output, a PyTorch CLIP checkpoint (OpenAI TorchScript or state dict, open_clip
    .pt/.bin/.safetensors), a Hugging Face CLIPModel folder, a reid-jax training run (its workdir, checkpoints/
    or best/<dataset>/: see `runs.load` for what must be given then), or an authors' released training checkpoint
    (`weights.released`: IRRA / MLLM4Text-ReID, CLIP-ReID, MUVA), whose position grid is resized from the input
    it was trained at. The pretrained position grid is resized
    with `posemb_interpolation`; `overrides` are further `CLIPConfig` fields (e.g. `dtype='bfloat16'`,
    `vision={'num_extra_tokens': 3}`).
    """
    path = Path(source)
    if path.exists() and converted.is_converted(path):
        return converted.load(path, image_size, stride, posemb_interpolation, overrides)
    if path.exists() and (run := runs.checkpoints_dir(path)) is not None:
        return runs.load(run, image_size, stride, overrides)
    module, state = released.read(path) if path.is_file() else (None, None)
    if module is not None:  # an authors' training checkpoint: its CLIP, position grid as trained
        return module.clip(path, state, image_size, stride, overrides)
    checkpoint = mapping.read_source(path, state)
    cfg = mapping.model_config(checkpoint.arch, image_size, stride or checkpoint.arch["vision"]["patch_size"],
                               overrides)
    return mapping.with_params(cfg, mapping.map_params(checkpoint, cfg, posemb_interpolation))


def model_for(model, init_checkpoint: str, seed: int, **extra) -> CLIP:
    """The CLIP a training run starts from. `model`: a config's `model` section (preset, image_size, stride,
    posemb_interpolation, dtype, remat, overrides); `extra`: CLIPConfig fields a method sets itself (e.g. MUVA's
    `vision={..., 'num_extra_tokens': 3}`), over the section's overrides.

    `init_checkpoint`: "" for a fresh model of the preset; a reid-jax run (its workdir, checkpoints/ or
    best/<dataset>/) for the preset's architecture with that run's CLIP weights (e.g. TDE pretraining before
    fine-tuning); else any source `load_clip` reads.
    """
    overrides = {"dtype": model.dtype, "remat": model.remat, **model.get("overrides", {}).to_dict(), **extra}

    def fresh() -> CLIP:
        preset = getattr(CLIPConfig, model.preset)(image_size=tuple(model.image_size), stride=model.stride)
        return CLIP(preset.replace(**overrides), rngs=nnx.Rngs(seed))

    if not init_checkpoint:
        return fresh()
    path = expand_path(init_checkpoint)
    if path.exists() and (trained := runs.checkpoints_dir(path)) is not None:
        clip = fresh()
        logging.info("CLIP weights from %s, step %d", trained, runs.load_into(clip, trained))
        return clip
    if not path.exists():
        raise FileNotFoundError(
            f"config.init_checkpoint={path} does not exist; convert a PyTorch CLIP checkpoint with "
            f"`python -m reid_jax.convert ViT-B-16.pt {path} --image-size={model.image_size[0]},{model.image_size[1]}`")
    return load_clip(path, image_size=tuple(model.image_size), stride=model.stride,
                     posemb_interpolation=model.posemb_interpolation, **overrides)
