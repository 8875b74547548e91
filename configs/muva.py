"""MUVA: `python -m reid_jax.main --config=configs/muva.py:<variant> --workdir=DIR`.

Variants (domain generalisation: train on source domains, test on an unseen one):
  <source>_to_<target>   single source, e.g. market1501_to_dukemtmc_reid (any two of market1501,
                         dukemtmc_reid, msmt17, cuhk03_np)
  multi_to_<target>      multi-source leave-one-out: train on the other three, e.g. multi_to_market1501
  demo                   synthetic_pedestrians: train on the daylight and night domains, test on overcast;
                         a small CLIP from scratch, minutes on a laptop CPU
  ablation_{baseline,fixed,full}   the demo as CLIP without part tokens, + part tokens with fixed masks, full
                         MUVA (`--config.seed=0|1|2`)
The real sets need part boxes: `python -m reid_jax.captioning ground ... --out parts.jsonl`, then build each set
with `--part_boxes=parts.jsonl`. Every number is a field (`--config.loss.mask_weight=0.5`).
"""

import ml_collections

from reid_jax.data import transforms

DATASETS = ("market1501", "dukemtmc_reid", "msmt17", "cuhk03_np")


def _dataset(name, split="train", config="", label="", domains=()):
    """A TFDS split ("" config = the builder's default), restricted to `domains` (empty = all)."""
    return ml_collections.ConfigDict({"name": name, "split": split, "config": config, "label": label or name,
                                      "domains": list(domains)})


def _test_set(name, config="", label="", domains=()):
    spec = _dataset(name, "query", config, label, domains)
    spec.update({"query": "query", "gallery": "gallery"})
    return spec


def base(sources=("market1501",), target="dukemtmc_reid") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "muva"
    c.seed = 0
    c.init_checkpoint = ""  # a `python -m reid_jax.convert` output (or a PyTorch CLIP file / HF folder)

    c.model = ml_collections.ConfigDict({
        "preset": "vit_b16", "image_size": (256, 128), "stride": 16, "posemb_interpolation": "bilinear",
        "dtype": "bfloat16", "remat": False, "overrides": {}})

    c.data = ml_collections.ConfigDict({
        "data_dir": "", "auto_build": False, "train": [_dataset(s) for s in sources],
        "batch_size": 64, "pk": {"identities": 16, "instances": 4},  # 4 images per identity
        "context_length": 77, "num_epochs": None, "num_workers": 8,
        "aug": transforms.default_config()})  # flip and pad + crop move the part boxes with the pixels
    c.data.aug.update({"mean_std": "half", "erase_fill": "random"})
    c.data.aug.image_size = c.model.get_ref("image_size")

    c.muva = ml_collections.ConfigDict({
        "num_parts": 3,  # head, upper body, legs; 0 = CLIP with CLS only (the baseline)
        "mask_mode": "rmp",  # 'rmp': masks predicted per block; 'fixed': the fixed bands below, no RMP loss
        "rmp_heads": 2, "memory_momentum": 0.2,
        "fixed_bands": [(0.0, 0.2), (0.2, 0.55), (0.55, 1.0)],  # (y0, y1) per part, fractions of the height
        # synthetic data: exact boxes, perturbed and calibrated as a grounding MLLM's answers would be
        "simulate_grounding": False,
        "grounding_noise": {"jitter": 0.1, "whole_person": 0.1, "tiny": 0.05, "missing": 0.02}})

    c.stage1 = ml_collections.ConfigDict({  # prompts alone, text tower frozen (CLIP-ReID's first stage)
        "template": "A photo of a * {}.", "num_context": 4, "init_std": 0.02, "temperature": 1.0,
        "epochs": 120, "batch_size": 64, "lr": 3.5e-4})

    c.loss = ml_collections.ConfigDict({
        "id_weight": 1.0, "id_label_smoothing": 0.1,
        "proto_weight": 1.0, "proto_temperature": 0.01,
        "i2t_weight": 1.0, "i2t_label_smoothing": 0.1,
        "mask_weight": 1.0})  # BCE over every block's logits + Dice

    c.optim = ml_collections.ConfigDict({
        "name": "adam", "lr": 5e-6, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-4,
        "schedule": "multistep", "warmup_epochs": 10.0, "warmup_factor": 0.1, "final_factor": 0.0,
        "milestones": (30, 50), "gamma": 0.1, "grad_clip": 0.0,
        "param_groups": [{"pattern": r"^model\.rmp\.", "lr_mult": 10.0, "weight_decay": 0.0},  # RMP: 10x, no decay
                         {"pattern": r"\.bias$", "lr_mult": 2.0}],
        "frozen": [r"^model\.clip\.text\.", r"^model\.clip\.logit_scale$"]})

    c.train = ml_collections.ConfigDict({
        "epochs": 60, "log_every": 50, "checkpoint_every_steps": 1000, "keep_checkpoints": 2})
    c.eval = ml_collections.ConfigDict({
        "datasets": [_test_set(target)], "every_epochs": 10, "batch_size": 256, "keep_best": "mAP",
        "png_queries": 4})
    c.mesh = ml_collections.ConfigDict({"fsdp": 1, "fsdp_min_size": 1 << 20})
    return c


def demo(stage: str = "full") -> ml_collections.ConfigDict:
    """Two synthetic domains in, the third out; a small CLIP from scratch (so stage 1 aligns prompts to a random
    text tower's features: the text prototypes are still one fixed, distinct target per identity and part)."""
    c = base()
    c.data.auto_build = True
    c.data.train = [_dataset("synthetic_pedestrians", "train", "demo", "synthetic", ("daylight", "night"))]
    c.eval.datasets = [_test_set("synthetic_pedestrians", "demo", "overcast", ("overcast",))]
    c.model.update({"preset": "tiny", "image_size": (128, 64), "stride": 16, "dtype": "float32"})
    c.model.overrides = {
        "vision": {"width": 128, "layers": 4, "heads": 4, "mlp_dim": 512, "patch_size": 16},
        "text": {"width": 128, "layers": 3, "heads": 4, "mlp_dim": 512, "context_length": 48},
        "embed_dim": 128}
    c.data.update({"context_length": 48, "num_workers": 1})
    c.data.aug.update({"pad": 4, "erase_prob": 0.0})
    c.muva.simulate_grounding = True
    c.muva.num_parts = 0 if stage == "baseline" else 3
    c.muva.mask_mode = "fixed" if stage == "fixed" else "rmp"
    c.stage1.update({"epochs": 10, "lr": 1e-3})
    c.optim.update({"lr": 3e-4, "warmup_epochs": 1.0, "milestones": (8, 11)})
    c.train.update({"epochs": 12, "log_every": 25, "checkpoint_every_steps": 300})
    c.eval.update({"every_epochs": 4, "batch_size": 256})
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg == "":
        return base()
    if arg == "demo":
        return demo()
    if arg.startswith("ablation_") and arg.split("_", 1)[1] in ("baseline", "fixed", "full"):
        c = demo(arg.split("_", 1)[1])
        c.eval.every_epochs = 0  # once, at the end
        return c
    source, sep, target = arg.partition("_to_")
    if sep and target in DATASETS and (source in DATASETS or source == "multi") and source != target:
        return base(tuple(d for d in DATASETS if d != target) if source == "multi" else (source,), target)
    raise ValueError(f"unknown variant {arg!r} of configs/muva.py; expected <source>_to_<target> or "
                     f"multi_to_<target> with datasets {', '.join(DATASETS)}, demo, or ablation_baseline, "
                     f"ablation_fixed, ablation_full")
