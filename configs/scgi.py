"""CLIP-SCGI: `python -m reid_jax.main --config=configs/scgi.py:<variant> --workdir=DIR`.

Variants:
  market1501 (default), msmt17, dukemtmc_reid, occluded_duke
             the paper's recipe on one set (ViT-B/16 from config.init_checkpoint at 256x128, captions in the
             dataset's `captions` field: build it with `--captions=captions.jsonl` from `reid_jax.captioning caption`)
  demo       synthetic_pedestrians (built automatically), a small CLIP from scratch, minutes on a laptop CPU
  ablation_{baseline,cgi,full}   the demo recipe (6 epochs) as the CLIP-ReID baseline, + CGI, + CGI + CFF
                                 (`--config.seed`)

Every number is a field; override on the command line (`--config.loss.triplet_weight=0.5`).
"""

import ml_collections

from reid_jax.data import transforms

DATASETS = ("market1501", "msmt17", "dukemtmc_reid", "occluded_duke")


def _dataset(name, split, config="", label=""):
    """A TFDS split; `config` is the builder config ("" = the builder's default), `label` names it in metrics."""
    return ml_collections.ConfigDict({"name": name, "split": split, "config": config, "label": label or name})


def _test_set(name, config="", label=""):
    """An image-ReID test set: query and gallery splits of one dataset."""
    spec = _dataset(name, "query", config, label)
    spec.update({"query": "query", "gallery": "gallery"})
    return spec


def base(dataset: str = "market1501") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "scgi"
    c.seed = 0
    c.init_checkpoint = ""  # a `python -m reid_jax.convert` output (or a PyTorch CLIP file / HF folder)

    c.model = ml_collections.ConfigDict({
        "preset": "vit_b16", "image_size": (256, 128), "stride": 16,  # 12 = CLIP-ReID's overlapping patches
        "posemb_interpolation": "bilinear", "dtype": "bfloat16", "remat": False, "overrides": {},
        "sie": True, "sie_coe": 1.0})  # camera embedding added to CLS (CLIP-ReID's SIE)

    c.data = ml_collections.ConfigDict({
        "data_dir": "", "auto_build": False, "train": _dataset(dataset, "train"),
        "batch_size": 64, "pk": {"identities": 16, "instances": 4},
        "context_length": 77, "num_epochs": None, "num_workers": 8,
        # CLIP-ReID: resize, flip 0.5, pad 10 + crop, mean/std 0.5, random erasing 0.5 filled with N(0, 1) pixels
        "aug": transforms.default_config()})
    c.data.aug.update({"mean_std": "half", "erase_fill": "random"})
    c.data.aug.image_size = c.model.get_ref("image_size")

    # CGI and CFF: the paper's two hyper-parameters are num_queries and depth (its Fig. 4); the other fields are
    # the open choices listed in models/cgi.py and models/cff.py
    c.cgi = ml_collections.ConfigDict({
        "enabled": True, "num_queries": 4, "depth": 2, "guidance": "cross_attention",
        "prompt": "A photo of a * person.", "detach_image": False})
    c.cff = ml_collections.ConfigDict({"enabled": True, "depth": 1, "detach_words": False})

    c.loss = ml_collections.ConfigDict({
        # CLIP-ReID's second stage: ID 0.25 (smoothing 0.1) on both BNNecks, triplet 1.0 (margin 0.3) on three
        # features, image-to-text CE 1.0 against per-identity text prototypes of the frozen text tower
        "id_weight": 0.25, "id_label_smoothing": 0.1, "triplet_weight": 1.0, "margin": 0.3,
        "i2t_weight": 1.0, "i2t_mode": "prototypes", "i2t_label_smoothing": 0.1,
        "i2t_logit_scale": 10.0,  # i2t_mode='batch' only (SDM against the batch's captions)
        "cgi_text_weight": 1.0, "cgi_image_weight": 1.0, "cgi_logit_scale": 50.0,  # CGI alignment (SDM)
        "cff_weight": 1.0})  # scales CFF's own ID + triplet terms

    c.optim = ml_collections.ConfigDict({
        "name": "adam", "lr": 5e-6, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-4,
        "schedule": "multistep", "warmup_epochs": 10.0, "warmup_factor": 0.1, "final_factor": 0.0,
        "milestones": (30, 50), "gamma": 0.1, "grad_clip": 0.0,
        # CLIP-ReID: biases at 2x lr (weight decay 1e-4 as the rest); CGI and CFF start from scratch, at 10x
        "param_groups": [{"pattern": r"^heads\.(cgi|cff)\.", "lr_mult": 10.0},
                         {"pattern": r"\.bias$", "lr_mult": 2.0}],
        # CLIP-ReID's second stage freezes the text tower (it still passes gradients to CGI's pseudo-words)
        "frozen": [r"^model\.clip\.text\.", r"^model\.clip\.logit_scale$"]})

    c.train = ml_collections.ConfigDict({
        "epochs": 60, "log_every": 50, "checkpoint_every_steps": 1000, "keep_checkpoints": 2})
    c.eval = ml_collections.ConfigDict({
        "datasets": [_test_set(dataset)], "every_epochs": 10, "batch_size": 256, "keep_best": "mAP",
        "png_queries": 4,
        "rerank": {"enabled": False, "k1": 20, "k2": 6, "lambda_value": 0.3}})
    c.mesh = ml_collections.ConfigDict({"fsdp": 1, "fsdp_min_size": 1 << 20})
    return c


def demo(stage: str = "full") -> ml_collections.ConfigDict:
    """Synthetic pedestrians from scratch. The text tower trains along (there is no pretrained one to freeze), so
    the image-to-text term matches the batch's captions (i2t_mode='batch') instead of fixed prototypes."""
    c = base()
    c.data.auto_build = True
    c.data.train = _dataset("synthetic_pedestrians", "train", "demo")
    c.eval.datasets = [_test_set("synthetic_pedestrians", "demo", label="synthetic")]
    c.model.update({"preset": "tiny", "image_size": (128, 64), "stride": 16, "dtype": "float32", "sie": True})
    c.model.overrides = {
        "vision": {"width": 128, "layers": 4, "heads": 4, "mlp_dim": 512, "patch_size": 16},
        "text": {"width": 128, "layers": 3, "heads": 4, "mlp_dim": 512, "context_length": 48},
        "embed_dim": 128}
    c.data.update({"context_length": 48, "num_workers": 1})
    c.data.aug.update({"pad": 4, "erase_prob": 0.0})
    c.cgi.enabled = stage in ("cgi", "full")
    c.cff.enabled = stage == "full"
    c.loss.i2t_mode = "batch"
    c.optim.update({"lr": 3e-4, "warmup_epochs": 1.0, "milestones": (6, 8)})
    c.optim.frozen = []
    c.train.update({"epochs": 9, "log_every": 25, "checkpoint_every_steps": 300})
    c.eval.update({"every_epochs": 3, "batch_size": 256})
    return c


def ablation(stage: str) -> ml_collections.ConfigDict:
    """The demo recipe, shortened to 6 epochs (steps at 4 and 5) and evaluated once at the end, as the CLIP-ReID
    baseline ('baseline'), + CGI ('cgi') or + CGI + CFF ('full'). Seeds: --config.seed=0|1|2."""
    c = demo(stage)
    c.train.epochs = 6
    c.optim.milestones = (4, 5)
    c.eval.every_epochs = 0
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg in ("",) + DATASETS:
        return base(arg or "market1501")
    if arg == "demo":
        return demo()
    if arg.startswith("ablation_") and arg.split("_", 1)[1] in ("baseline", "cgi", "full"):
        return ablation(arg.split("_", 1)[1])
    raise ValueError(f"unknown variant {arg!r} of configs/scgi.py; expected one of {', '.join(DATASETS)}, demo, "
                     f"ablation_baseline, ablation_cgi, ablation_full")
