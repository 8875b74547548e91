"""CLIP-SCGI: `python -m reid_jax.main --config=configs/scgi.py:<variant> --workdir=DIR`.

Variants:
  market1501 (default), msmt17, dukemtmc_reid, occluded_duke
             the paper's recipe on one set (ViT-B/16 from config.init_checkpoint at 256x128, captions in the
             dataset's `captions` field: build it with `--captions=captions.jsonl` from `reid_jax.captioning caption`)
             on CLIP-ReID's published ViT configuration (configs/person/vit_clipreid.yml: stride 16, no camera
             embedding)
  <set>_sie_olp   the same on CLIP-ReID's other published ViT setting, SIE-OLP (camera embedding 1.0, stride 12)
  demo       synthetic_pedestrians (built automatically), a small CLIP from scratch, minutes on a laptop CPU
  ablation_{baseline,cgi,full}   the demo recipe (6 epochs) as the CLIP-ReID baseline, + CGI, + CGI + CFF
                                 (`--config.seed`)
  pretrained_{baseline,cgi,full}  the same from the stage-A CLIP (configs/tde_nam.py:synthetic_clip), text tower
                                 frozen as in the paper (`--config.init_checkpoint=RUN`)

Every number is a field; override on the command line (`--config.loss.triplet_weight=0.5`). The method, its
defaults and the choices the paper leaves open: docs/scgi.md.
"""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("configs_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

DATASETS = ("market1501", "msmt17", "dukemtmc_reid", "occluded_duke")
STAGES = ("baseline", "cgi", "full")
_dataset, _test_set = common.dataset, common.test_set  # the tests build their own specs with these


# CLIP-ReID's second stage freezes the text tower (it still passes gradients to CGI's pseudo-words)
FROZEN = [r"^model\.clip\.text\.", r"^model\.clip\.logit_scale$"]


def base(dataset: str = "market1501") -> ml_collections.ConfigDict:
    c = common.header("scgi")
    # With a CLIP-ReID release file as init_checkpoint (it stores no token table): the CLIP it was trained from
    c.init_text_checkpoint = ""
    c.model = common.model(
        (256, 128),  # stride 16 (CLIP-ReID's vit_clipreid.yml); 12 = its overlapping patches (OLP)
        sie=False, sie_coe=1.0)  # camera embedding added to CLS (CLIP-ReID's SIE), off in vit_clipreid.yml
    # CLIP-ReID: resize (bicubic; bilinear for testing), flip 0.5, pad 10 + crop, mean/std 0.5, random erasing 0.5
    # filled with N(0, 1) pixels; batches of 16 identities x 4 images from its identity sampler, which walks every
    # image once per epoch
    c.data = common.data(c.model, common.dataset(dataset, "train"), 64,
                         pk={"identities": 16, "instances": 4, "sampler": "walk"})
    c.data.aug.update(common.CLIP_REID_AUG)

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

    c.optim = common.adam(
        lr=5e-6, eps=1e-8, weight_decay=1e-4, schedule="multistep", warmup_epochs=10.0, milestones=(30, 50),
        # CLIP-ReID: biases at 2x lr (weight decay 1e-4 as the rest); CGI and CFF start from scratch, at 10x
        param_groups=[{"pattern": r"^heads\.(cgi|cff)\.", "lr_mult": 10.0},
                      {"pattern": r"\.bias$", "lr_mult": 2.0}],
        frozen=FROZEN)
    c.train = common.train(60)
    c.eval = common.evaluation([common.test_set(dataset)], 10, "mAP", rerank=common.rerank(False))
    c.mesh = common.mesh()
    return c


def sie_olp(dataset: str) -> ml_collections.ConfigDict:
    """CLIP-ReID's SIE-OLP setting (its README's command line): camera embedding with coefficient 1.0 and
    overlapping patches at stride 12 (a 21 x 10 grid at 256 x 128)."""
    c = base(dataset)
    c.model.update({"sie": True, "sie_coe": 1.0, "stride": 12})
    return c


def demo(stage: str = "full") -> ml_collections.ConfigDict:
    """Synthetic pedestrians from scratch. The text tower trains along (there is no pretrained one to freeze), so
    the image-to-text term matches the batch's captions (i2t_mode='batch') instead of fixed prototypes."""
    c = common.tiny_demo(base(), common.dataset("synthetic_pedestrians", "train", "demo"),
                         [common.test_set("synthetic_pedestrians", "demo", label="synthetic")])
    c.cgi.enabled = stage in ("cgi", "full")
    c.cff.enabled = stage == "full"
    c.loss.i2t_mode = "batch"
    c.optim.update({"lr": 3e-4, "warmup_epochs": 1.0, "milestones": (6, 8)})
    c.optim.frozen = []
    c.train.update({"epochs": 9, "checkpoint_every_steps": 300})
    c.eval.every_epochs = 3
    return c


def ablation(stage: str) -> ml_collections.ConfigDict:
    """The demo recipe, shortened to 6 epochs (steps at 4 and 5) and evaluated once at the end, as the CLIP-ReID
    baseline ('baseline'), + CGI ('cgi') or + CGI + CFF ('full'). Seeds: --config.seed=0|1|2."""
    c = demo(stage)
    c.train.epochs = 6
    c.optim.milestones = (4, 5)
    c.eval.every_epochs = 0
    return c


def pretrained(stage: str) -> ml_collections.ConfigDict:
    """The ablation as the paper runs it, from a pretrained CLIP: `init_checkpoint` = the stage-A run
    (configs/tde_nam.py:synthetic_clip). Fixed before any result was seen: the text tower frozen and the
    image-to-text term against per-identity caption prototypes of that frozen tower, as the paper's recipe
    (`base`); lr 1e-4, a third of the from-scratch demo's and a fifth of stage A's (CGI and CFF at 10x, as base)."""
    c = ablation(stage)
    c.loss.i2t_mode = "prototypes"
    c.optim.frozen = FROZEN
    c.optim.lr = 1e-4
    return c


VARIANTS = {**{d: lambda d=d: base(d) for d in DATASETS},
            **{f"{d}_sie_olp": lambda d=d: sie_olp(d) for d in DATASETS}, "demo": demo,
            **{f"ablation_{s}": lambda s=s: ablation(s) for s in STAGES},
            **{f"pretrained_{s}": lambda s=s: pretrained(s) for s in STAGES}}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return common.select(arg, VARIANTS, __file__, default="market1501")
