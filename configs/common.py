"""Blocks the three method configs share, and the variant parser of their `get_config(arg)`.

configs/ is not a package (ml_collections loads a config file by path), so each method config loads this file by
path, from its own folder. A method config calls these builders in the order its fields appear and overrides what
differs (a variant builds on the default and overrides, as the flax examples do). The numbers here are the ones
all three methods share; each method's own numbers stay in its file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import ml_collections

from reid_jax.data import transforms

# --------------------------------------------------------------------------------------------- dataset specs


def dataset(name: str, split: str = "train", config: str = "", label: str = "", **extra) -> ml_collections.ConfigDict:
    """A TFDS split; `config` is the builder config ("" = the builder's default), `label` names it in metrics;
    `extra` fields follow (e.g. MUVA's `domains`)."""
    spec = ml_collections.ConfigDict({"name": name, "split": split, "config": config, "label": label or name})
    spec.update(extra)
    return spec


def test_set(name: str, config: str = "", label: str = "", **extra) -> ml_collections.ConfigDict:
    """An image-ReID test set: the query and gallery splits of one dataset."""
    spec = dataset(name, "query", config, label, **extra)
    spec.update({"query": "query", "gallery": "gallery"})
    return spec


# ------------------------------------------------------------------------------------------- config sections


def header(method: str) -> ml_collections.ConfigDict:
    """A new config: which Task trains it, the seed, and the weights to start from."""
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0
    c.init_checkpoint = ""  # a `python -m reid_jax.convert` output (or a PyTorch CLIP file / HF folder)
    return c


def model(image_size: tuple[int, int], **extra) -> ml_collections.ConfigDict:
    """CLIP ViT-B/16 at the ReID input size; `extra` fields follow (e.g. CLIP-ReID's camera embedding)."""
    return ml_collections.ConfigDict({
        "preset": "vit_b16",  # used when there is no init_checkpoint
        "image_size": image_size, "stride": 16, "posemb_interpolation": "bilinear",
        "dtype": "bfloat16",  # compute dtype (parameters stay float32); float32 on CPU
        "remat": False, "overrides": {}, **extra})


def data(model_section: ml_collections.ConfigDict, train, batch_size: int, **extra) -> ml_collections.ConfigDict:
    """config.data: the training set(s), the global batch, `extra` fields, then text length, epochs, workers and
    the augmentation, whose image size follows `model_section.image_size` (a FieldReference: an override of
    config.model.image_size resizes the data too)."""
    d = ml_collections.ConfigDict({
        "data_dir": "",  # TFDS data folder; default WORKDIR/data
        "auto_build": False,  # build synthetic_pedestrians when missing
        "train": train, "batch_size": batch_size, **extra,
        "context_length": 77, "num_epochs": None, "num_workers": 8,
        "aug": transforms.default_config()})  # 384x128, flip 0.5, pad 10 + crop, erasing 0.5 (0.02-0.4), CLIP mean/std
    d.aug.image_size = model_section.get_ref("image_size")
    return d


# CLIP-ReID's input normalisation, resizing and erasing fill (MUVA and CLIP-SCGI build on its pipeline): mean/std
# 0.5, bicubic resize for training and bilinear (torchvision's default) for testing, erased rectangles filled with
# N(0, 1) pixels
CLIP_REID_AUG = {"mean_std": "half", "train_interpolation": "bicubic", "test_interpolation": "bilinear",
                 "erase_fill": "random"}


def adam(*, lr: float, eps: float, weight_decay: float, schedule: str, warmup_epochs: float, param_groups: list,
         milestones: tuple = (), **extra) -> ml_collections.ConfigDict:
    """config.optim: PyTorch's Adam (L2 weight decay added to the gradient), linear warmup from 0.1 x lr, then
    `schedule`; `extra` fields follow (e.g. `frozen`)."""
    return ml_collections.ConfigDict({
        "name": "adam", "lr": lr, "b1": 0.9, "b2": 0.999, "eps": eps, "weight_decay": weight_decay,
        "schedule": schedule, "warmup_epochs": warmup_epochs, "warmup_factor": 0.1, "final_factor": 0.0,
        "milestones": milestones, "gamma": 0.1, "grad_clip": 0.0, "param_groups": param_groups, **extra})


def train(epochs: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "epochs": epochs, "log_every": 50, "checkpoint_every_steps": 1000, "keep_checkpoints": 2})


def evaluation(datasets: list, every_epochs: int, keep_best: str, **extra) -> ml_collections.ConfigDict:
    """config.eval: the test sets, how often, which metric picks the best model; `extra` fields follow."""
    return ml_collections.ConfigDict({
        "datasets": datasets, "every_epochs": every_epochs, "batch_size": 256, "keep_best": keep_best,
        "png_queries": 4, **extra})


def rerank(enabled: bool = False) -> ml_collections.ConfigDict:
    """config.eval.rerank: k-reciprocal re-ranking as CLIP-ReID's and MUVA's evaluators run it (k1 50, k2 15,
    lambda 0.3, on L2-normalised features); reported beside the plain ranking as 'eval/<label>+rerank/...'."""
    return ml_collections.ConfigDict({"enabled": enabled, "k1": 50, "k2": 15, "lambda_value": 0.3,
                                      "normalize": True})


def mesh() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"fsdp": 1, "fsdp_min_size": 1 << 20})


# ----------------------------------------------------------------------------------------------------- demo

# The demos' small CLIP, trained from scratch: 4 + 3 blocks of width 128 on 128x64 images, 48-token captions
TINY_MODEL = {"preset": "tiny", "image_size": (128, 64), "stride": 16, "dtype": "float32"}
TINY_OVERRIDES = {
    "vision": {"width": 128, "layers": 4, "heads": 4, "mlp_dim": 512, "patch_size": 16},
    "text": {"width": 128, "layers": 3, "heads": 4, "mlp_dim": 512, "context_length": 48},
    "embed_dim": 128}


def tiny_demo(c: ml_collections.ConfigDict, train, test_sets: list) -> ml_collections.ConfigDict:
    """Turns a method config into its CPU demo in place: synthetic_pedestrians (built on first use), the small
    CLIP from scratch, one data worker; returns it. The method config then sets its own schedule."""
    c.data.auto_build = True
    c.data.train = train
    c.eval.datasets = test_sets
    c.model.update(TINY_MODEL)
    c.model.overrides = TINY_OVERRIDES
    c.data.update({"context_length": TINY_OVERRIDES["text"]["context_length"], "num_workers": 1})
    # No random erasing: on 128x64 drawings a rectangle of up to 40% of the image often wipes out the very shoes or
    # hair a caption names; the pad shrinks with the image
    c.data.aug.update({"pad": 4, "erase_prob": 0.0})
    c.train.log_every = 25
    return c


# -------------------------------------------------------------------------------------------------- variants


def select(arg: str, variants: Mapping[str, Callable[[], ml_collections.ConfigDict]], file: str,
           default: str) -> ml_collections.ConfigDict:
    """The config of variant `arg` ("" = `default`): `variants` maps each valid name to a function of no argument
    that builds it. An unknown name raises ValueError naming the config file and every valid variant."""
    build = variants.get(arg or default)
    if build is None:
        raise ValueError(f"unknown variant {arg!r} of configs/{Path(file).name}; expected one of "
                         f"{', '.join(variants)}")
    return build()
