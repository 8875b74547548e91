"""MUVA: `python -m reid_jax.main --config=configs/muva.py:<variant> --workdir=DIR`.

Variants (domain generalisation: train on source domains, test on an unseen one):
  <source>_to_<target>   single source, e.g. market1501_to_dukemtmc_reid (the default; any two of market1501,
                         dukemtmc_reid, msmt17, cuhk03_np)
  multi_to_<target>      multi-source leave-one-out: train on the other three, e.g. multi_to_market1501
  demo                   synthetic_pedestrians: train on the daylight and night domains, test on overcast;
                         a small CLIP from scratch, minutes on a laptop CPU
  ablation_{baseline,fixed,full}   the demo as CLIP without part tokens, + part tokens with fixed masks, full
                         MUVA (`--config.seed=0|1|2`)
  pretrained_{baseline,fixed,full}   the same from the stage-A CLIP (configs/tde_nam.py:synthetic_clip,
                         `--config.init_checkpoint=RUN`), with the paper's frozen text tower and patch embedding
The real sets need the authors' pseudo masks: build each set with `--part_masks=FILE.pkl` (their blobs/*.pkl;
the multi-source file for multi_to_*), or ground part boxes (`python -m reid_jax.captioning ground ... --out
parts.jsonl`), build with `--part_boxes=parts.jsonl` and pass `--config.muva.pseudo_masks=boxes`. Every number
is a field (`--config.loss.mask_weight=0.5`). The method, its defaults and where the authors' code differs from
the paper: docs/muva.md.
"""

import importlib.util
import itertools
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("configs_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

DATASETS = ("market1501", "dukemtmc_reid", "msmt17", "cuhk03_np")
STAGES = ("baseline", "fixed", "full")


def _dataset(name, split="train", config="", label="", domains=()):
    """A TFDS split ("" config = the builder's default), restricted to `domains` (empty = all)."""
    return common.dataset(name, split, config, label, domains=list(domains))


def _test_set(name, config="", label="", domains=()):
    return common.test_set(name, config, label, domains=list(domains))


# the text tower, CLIP's scale and the patch embedding stay as pretrained
FROZEN = [r"^model\.clip\.text\.", r"^model\.clip\.logit_scale$", r"^model\.clip\.visual\.conv1\."]


def base(sources=("market1501",), target="dukemtmc_reid") -> ml_collections.ConfigDict:
    """The authors' published recipe (their muva_ma2ms.yml / muva_ms2ma.yml); paper-vs-code switches in
    docs/muva.md section 8."""
    c = common.header("muva")
    c.model = common.model((256, 128))
    c.data = common.data(c.model, [_dataset(s) for s in sources], 64,
                         pk={"identities": 16, "instances": 4, "sampler": "walk"})  # every image once an epoch
    c.data.aug.update(common.CLIP_REID_AUG)  # 0.5 mean/std; bicubic resize for training, bilinear for test
    c.data.aug.update({"pad": 0, "erase_prob": 0.0})  # resize and the joint image + mask flip only

    c.muva = ml_collections.ConfigDict({
        "num_parts": 3,  # head, upper body, legs; 0 = CLIP with CLS only (the baseline)
        "mask_mode": "rmp",  # 'rmp': masks predicted per block; 'fixed': the fixed bands below, no RMP loss
        # 'stored': the authors' released masks (build with --part_masks=FILE.pkl); 'boxes': masks of part boxes
        "pseudo_masks": "stored",
        # their MGD.RMP_*: heads 2 for MA -> MS (8 for MS -> MA, `ms_heads` below), LayerNorms and inner shortcut
        # on, sigmoid(logits / tau) gated at the threshold
        "rmp": {"heads": 2, "layer_norm": True, "inner_shortcut": True, "tau": 1.0, "threshold": 0.5},
        "part_token_init_std": 0.02,
        "memory_momentum": 0.2,
        "memory_rebuild": "epoch",  # 'epoch': from every training image at each epoch's start; 'none'
        "bn_updates_per_step": 2,  # their step calls the BNNeck twice: two running-statistics updates
        "test_after_bn": True,  # test feature BN(f) (their TEST.AFTER_BN); False = f
        "fixed_bands": [(0.0, 0.2), (0.2, 0.55), (0.55, 1.0)],  # (y0, y1) per part, fractions of the height
        # synthetic data: exact boxes, perturbed and calibrated as a grounding MLLM's answers would be
        "simulate_grounding": False,
        "grounding_noise": {"jitter": 0.1, "whole_person": 0.1, "tiny": 0.05, "missing": 0.02}})

    c.stage1 = ml_collections.ConfigDict({  # prompts alone, text tower frozen; their SOLVER.STAGE1
        "template": "A photo of a * {}", "num_context": 4, "init_std": 0.002, "temperature": 1.0,
        "epochs": 120, "batch_size": 64,  # P x K images (K = config.data.pk.instances) of the identity walk
        "lr": 3.5e-4, "weight_decay": 1e-4, "warmup_epochs": 5, "warmup_lr": 1e-5, "lr_min": 1e-6})

    c.loss = ml_collections.ConfigDict({
        "id_weight": 1.0, "id_label_smoothing": 0.1,
        "proto_weight": 1.0, "proto_temperature": 0.01,
        "i2t_weight": 1.0, "i2t_label_smoothing": 0.1,
        "mask_weight": 1.0,  # BCE over every block's logits + Dice over every block's probabilities
        "dice_smooth": 1e-3})  # their DiceLoss: smooth 1e-6 on values scaled by 1/1000

    c.optim = common.adam(
        lr=5e-6, eps=1e-8, weight_decay=1e-4, schedule="multistep", warmup_epochs=10.0, milestones=(30, 50),
        param_groups=[{"pattern": r"^model\.rmp\.", "lr_mult": 10.0, "weight_decay": 0.0}],  # RMP: 10x, no decay
        frozen=FROZEN)
    c.train = common.train(60)
    c.eval = common.evaluation([_test_set(target)], 10, "mAP",
                               rerank={"enabled": False, "k1": 50, "k2": 15, "lambda_value": 0.3})
    c.mesh = common.mesh()
    return c


def ms_heads(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """MSMT17 as the source (their muva_ms2ma.yml): 8 RMP heads."""
    c.muva.rmp.heads = 8
    return c


def demo(stage: str = "full") -> ml_collections.ConfigDict:
    """Two synthetic domains in, the third out; a small CLIP from scratch (so stage 1 aligns prompts to a random
    text tower's features: the text prototypes are still one fixed, distinct target per identity and part)."""
    train = _dataset("synthetic_pedestrians", "train", "demo", "synthetic", ("daylight", "night"))
    c = common.tiny_demo(base(), [train], [_test_set("synthetic_pedestrians", "demo", "overcast", ("overcast",))])
    c.muva.simulate_grounding = True
    c.muva.pseudo_masks = "boxes"
    c.muva.num_parts = 0 if stage == "baseline" else 3
    c.muva.mask_mode = "fixed" if stage == "fixed" else "rmp"
    c.data.aug.pad = 0  # the authors' pipeline: resize and flip only
    c.optim.frozen = [f for f in c.optim.frozen if "conv1" not in f]  # from scratch: the patch embedding learns
    c.stage1.update({"epochs": 10, "lr": 1e-3, "warmup_epochs": 1})
    c.optim.update({"lr": 3e-4, "warmup_epochs": 1.0, "milestones": (8, 11)})
    c.train.update({"epochs": 12, "checkpoint_every_steps": 300})
    c.eval.every_epochs = 4
    return c


def ablation(stage: str) -> ml_collections.ConfigDict:
    """The demo as the CLIP baseline ('baseline'), + part tokens with fixed masks ('fixed') or full MUVA ('full'),
    evaluated once at the end."""
    c = demo(stage)
    c.eval.every_epochs = 0
    return c


def pretrained(stage: str) -> ml_collections.ConfigDict:
    """The ablation from the stage-A CLIP (configs/tde_nam.py:synthetic_clip, `--config.init_checkpoint=RUN`),
    for a table like the other two methods'. Fixed before any result was seen: the paper's frozen text tower and
    patch embedding (`base`), lr 1e-4 (a third of the from-scratch demo's; RMP at 10x, as base)."""
    c = ablation(stage)
    c.optim.frozen = FROZEN
    c.optim.lr = 1e-4
    return c


VARIANTS = {**{f"{s}_to_{t}": lambda s=s, t=t: (ms_heads if s == "msmt17" else lambda c: c)(base((s,), t))
               for s, t in itertools.permutations(DATASETS, 2)},
            **{f"multi_to_{t}": lambda t=t: base(tuple(d for d in DATASETS if d != t), t) for t in DATASETS},
            "demo": demo, **{f"ablation_{s}": lambda s=s: ablation(s) for s in STAGES},
            **{f"pretrained_{s}": lambda s=s: pretrained(s) for s in STAGES}}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return common.select(arg, VARIANTS, __file__, default="market1501_to_dukemtmc_reid")
