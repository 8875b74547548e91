"""TDE + NAM: `python -m reid_jax.main --config=configs/tde_nam.py[:variant] --workdir=DIR`.

Variants:
  pretrain (default)  pretraining on LUPerson-MLLM, direct-transfer evaluation on CUHK-PEDES, ICFG-PEDES, RSTPReid
  finetune   IRRA-style fine-tuning on one test set (`finetune` = CUHK-PEDES; `finetune_icfg`, `finetune_rstp`);
             `finetune[_<set>]_irra` with IRRA's own parameter groups instead of one lr for all
  zeroshot   evaluation only of the converted CLIP checkpoint in config.init_checkpoint
  demo       synthetic_pedestrians, a small CLIP from scratch, minutes on a laptop CPU
  ablation_{nam,uniform,none}  the paper's masking ablation on synthetic captions with 30% wrong words
  synthetic_clip  stage A of the ablations: contrastive image-text pretraining of the demo's small CLIP on the
             synthetic web-like corpus (clip_corpus), the init_checkpoint of every `pretrained_*` ablation
  synthetic_clip_words  stage A with its token losses at NAM's layer and a word-level term (better word alignment)
  synthetic_clip_image_words  the same, the word term's labels from all of an image's captions
  synthetic_clip_swap  the same, plus colour words swapped in their own caption as the word term's negatives
  synthetic_clip_swap_kinds  the same, the swaps also over garment, shoe, bag and hat kinds, hair length and pattern,
             each word within its own attribute
  pretrained_{nam,uniform,none}  the masking ablation from the stage-A model (--config.init_checkpoint=RUN)
  pretrained_{oracle,word_oracle}  NAM's ceiling in that ablation: its table from the captions' truth, not the model
  pretrained_oracle_auc{75,70}  the exact table degraded with noise to a masking AUC of 0.75 / 0.70
  pretrained_oracle[_auc75,_auc70]_as_nam  the same tables reaching NAM when a model's would (second epoch)

Every number is a field; override on the command line (`--config.data.batch_size=64`). The method, its defaults
and where the authors' code differs from the paper: docs/tde_nam.md.
"""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("configs_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

TEST_SETS = {"cuhk": "cuhk_pedes", "icfg": "icfg_pedes", "rstp": "rstp_reid"}
NAM_MODES = ("nam", "uniform", "none")


def base() -> ml_collections.ConfigDict:
    c = common.header("tde_nam")
    c.model = common.model((384, 128))
    c.data = common.data(
        c.model, common.dataset("luperson_mllm", "train"),
        512,  # global; SDM runs over the whole global batch
        caption_mode="all",  # one example per (image, caption): NAM keeps one similarity row per example
        image_words=0,  # > 0: each example also carries its image's words from every caption (word_match labels)
        # > 0: each example also carries its caption with each of `swap_words` replaced by another of them at this
        # rate, for the word term's in-context negatives (losses.own_word_match); stage A only
        swap_prob=0.0, swap_words=())
    c.data.pk = {"identities": 0, "instances": 0}  # unused: text-to-image batches are shuffled pairs

    c.nam = ml_collections.ConfigDict({
        "mode": "nam",  # 'nam' | 'uniform' (the paper's EM ablation) | 'none'
        "layer": 10, "p": 0.15, "mask_prob": 0.8, "random_prob": 0.1,
        # ablation ceiling, synthetic_pedestrians only: NAM's table from the truth instead of the model ('exact' |
        # 'word', reid_jax/train/nam_oracle.py), from the clean captions of the same images (TFDS config oracle_config);
        # oracle_auc > 0 degrades it with noise to that masking AUC, its wrong words oracle_gap below the right ones
        # before the noise (the stage-A model's table: 0.52 against 0.67); oracle_timing 'start' = the table from
        # the first step, 'as_nam' = written row by row as NAM writes the model's (the first epoch masks uniformly)
        "oracle": "", "oracle_config": "demo", "oracle_auc": 0.0, "oracle_gap": 0.15, "oracle_timing": "start"})
    c.loss = ml_collections.ConfigDict({
        "logit_scale": 50.0,  # SDM temperature 0.02, fixed
        "sdm_weight": 1.0,  # the paper's only pretraining loss; 0 for CLIP's contrastive training alone (ITC)
        # IRRA's fine-tuning terms (0 = off): ID classifier on image and text features, cross-modal MLM head
        "id_weight": 0.0, "id_label_smoothing": 0.0, "mlm_weight": 0.0, "mlm_depth": 4, "mlm_p": 0.15,
        "itc_weight": 0.0,  # IRRA's optional CLIP contrastive term; the paper trains without it
        "filip_weight": 0.0,  # FILIP's token-wise contrastive term (losses.filip); only stage A (synthetic_clip)
        "filip_layer": 0,  # the block whose tokens FILIP compares: 0 = the last of each tower, l = as nam.layer
        # a word-level sigmoid term (losses.word_match) on the same tokens: does the image show this word?
        "word_weight": 0.0, "word_scale": 10.0, "word_bias": -5.0,
        # SDM and ID see the MLM-masked caption when fine-tuning, as the public code that produced the fine-tuned
        # numbers does (its masked ids alias the input); False = the paper's clean caption (docs/tde_nam.md, §6)
        "sdm_sees_mlm_mask": True})

    c.optim = common.adam(
        lr=1e-5, eps=1e-3, weight_decay=4e-5, schedule="cosine", warmup_epochs=5.0,
        param_groups=[],  # one lr and decay for every parameter, as the public code (IRRA_GROUPS: IRRA's own)
        # the SDM scale is the fixed loss.logit_scale; CLIP's own never gets a gradient there, nor any decay
        frozen=[r"^model\.logit_scale$"])
    c.train = common.train(30)
    c.eval = common.evaluation([common.dataset(n, "test") for n in TEST_SETS.values()], 1, "R1")
    c.mesh = common.mesh()
    return c


# IRRA's own parameter groups (first match wins): the heads' classifier and MLM head at 5x lr (their biases without
# decay), the cross-modal blocks at 5x except their biases (2x, like every other bias), no decay on biases
IRRA_GROUPS = [
    {"pattern": r"^heads\.(classifier|mlm_head)\..*bias$", "lr_mult": 5.0, "weight_decay": 0.0},
    {"pattern": r"^heads\.(classifier|mlm_head)\.", "lr_mult": 5.0},
    {"pattern": r"\.bias$", "lr_mult": 2.0, "weight_decay": 0.0},
    {"pattern": r"^heads\.cross", "lr_mult": 5.0}]


def finetune(test_set: str, irra_groups: bool = False) -> ml_collections.ConfigDict:
    """IRRA's recipe on one set, from the TDE+NAM pretrained model: config.init_checkpoint = the pretraining
    run's workdir (or its best/<dataset>), or a converted CLIP."""
    if test_set not in TEST_SETS:
        raise ValueError(f"unknown variant finetune_{test_set} of configs/tde_nam.py; expected finetune, "
                         f"{', '.join('finetune_' + k for k in TEST_SETS)}")
    c = base()
    name = TEST_SETS[test_set]
    c.data.train = common.dataset(name, "train")
    c.data.batch_size = 64
    c.train.epochs = 60
    c.nam.mode = "none"
    c.loss.update({"id_weight": 1.0, "mlm_weight": 1.0})
    # one lr for every parameter: the TDE authors fine-tune with the same optimizer builder as they pretrain with,
    # whose group rules are commented out; `irra_groups` gives IRRA's own
    c.optim.param_groups = IRRA_GROUPS if irra_groups else []
    c.eval.datasets = [common.dataset(name, "test")]
    return c


def zeroshot() -> ml_collections.ConfigDict:
    c = base()
    c.train.epochs = 0
    return c


def demo(mode: str = "nam", noisy: bool = False) -> ml_collections.ConfigDict:
    dataset = "demo_noisy" if noisy else "demo"
    c = common.tiny_demo(base(), common.dataset("synthetic_pedestrians", "train", dataset),
                         [common.dataset("synthetic_pedestrians", "test", dataset, label="synthetic")])
    c.data.batch_size = 64
    c.nam.update({"mode": mode, "layer": 3})
    # From scratch, SDM alone sits at the uniform-prediction loss for hundreds of steps (its reverse KL pulls a
    # positive up only in proportion to the probability it already has), longer at the paper's scale 50. IRRA's
    # optional ITC term leaves that plateau within about 100 steps, so the demo adds it at a softer scale; runs from
    # a pretrained CLIP keep SDM alone at scale 50. A larger lr (1e-3) trained worse.
    c.loss.update({"logit_scale": 10.0, "itc_weight": 1.0})
    c.optim.update({"lr": 5e-4, "eps": 1e-8, "weight_decay": 1e-4, "warmup_epochs": 0.2})
    c.train.update({"epochs": 3, "checkpoint_every_steps": 225})  # 450 steps per epoch
    c.eval.every_epochs = 1
    return c


def ablation(mode: str) -> ml_collections.ConfigDict:
    """The paper's masking ablation: the demo recipe on captions with 30% wrong attribute words, evaluated once at
    the end on clean captions of held-out templates. Two epochs: NAM masks with the previous epoch's similarities,
    so the second epoch is where 'nam' and 'uniform' differ. Seeds: --config.seed=0|1|2."""
    c = demo(mode, noisy=True)
    c.train.epochs = 2
    c.eval.every_epochs = 0
    return c


def synthetic_clip() -> ml_collections.ConfigDict:
    """Stage A: CLIP's own pretraining, in the synthetic world. The demo's small CLIP from scratch, trained with
    CLIP's symmetric contrastive loss (ITC) plus FILIP's token-wise one (no SDM, no masking) on `clip_corpus`:
    8000 people none of the other sets has, clean captions of which half are free-form. Evaluated zero-shot on
    the held-out identities and templates after every epoch; its masking AUC: `python -m
    reid_jax.train.nam_report --model=RUN`. docs/ablations.md."""
    c = demo("none", noisy=True)  # evaluated on the test split the ablations use (its captions are clean)
    c.data.train = common.dataset("synthetic_pedestrians", "train", "clip_corpus")
    # CLIP's loss alone left every word equally (dis)similar to the image (masking AUC 0.48 after 1000 steps, at
    # every layer): FILIP's token-wise term is what teaches single words to match image regions
    c.loss.update({"sdm_weight": 0.0, "itc_weight": 1.0, "filip_weight": 1.0})
    c.train.update({"epochs": 3, "checkpoint_every_steps": 500})  # 1500 steps per epoch
    return c


def synthetic_clip_words() -> ml_collections.ConfigDict:
    """Stage A with word-level alignment where NAM reads it: FILIP on the tokens of block `nam.layer` of each tower,
    plus the word-match term (losses.word_match: is each word, on its own, shown by the image?). Same corpus,
    schedule and evaluation as `synthetic_clip`. docs/ablations.md section 2."""
    c = synthetic_clip()
    c.loss.update({"filip_layer": c.nam.layer, "word_weight": 1.0})
    return c


def synthetic_clip_image_words() -> ml_collections.ConfigDict:
    """`synthetic_clip_words` with the word-match labels taken from every caption of the image instead of the one
    caption in the batch: half the corpus captions name only some attributes, so a colour the image shows but its
    batch caption leaves out was a negative. docs/ablations.md section 2."""
    c = synthetic_clip_words()
    c.data.image_words = 64  # the corpus' images hold at most 48 distinct tokens over their 3 captions
    return c


def synthetic_clip_swap() -> ml_collections.ConfigDict:
    """`synthetic_clip_image_words` plus in-context negatives for the word term: each colour word of the caption
    is swapped for another colour at rate 1/2, and scored against its own image, swapped or not. Without them a
    caption's late words could match their image by how well the whole prefix fits it, so a wrong colour in an
    otherwise right caption matched too. docs/ablations.md section 2."""
    c = synthetic_clip_image_words()
    c.data.swap_prob = 0.5  # half kept (positives in context), half swapped (mostly negatives)
    c.data.swap_words = ("black", "white", "grey", "red", "blue", "green", "yellow", "pink", "purple", "brown",
                         "blonde")  # the corpus' colour words, garments and hair; each one BPE token
    return c


def synthetic_clip_swap_kinds() -> ml_collections.ConfigDict:
    """`synthetic_clip_swap` with every attribute swapped within its own kind: colours among colours, a jacket for
    a coat, jeans for a skirt, long hair for short. Colour swaps alone taught colours in context (recognition 0.72
    -> 0.84) but left the kinds at chance, and NAM's wrong words are half kinds. docs/ablations.md section 2."""
    c = synthetic_clip_swap()
    c.data.swap_words = (c.data.swap_words,  # each group swaps within itself; one BPE token per word (t-shirt,
                         ("short", "long"), ("plain", "striped", "checked"),  # loafers, briefcase are not)
                         ("shirt", "jacket", "sweater", "coat", "hoodie"), ("trousers", "jeans", "shorts", "skirt"),
                         ("sneakers", "boots"), ("backpack", "handbag"), ("cap", "beanie"))
    return c


def pretrained(mode: str) -> ml_collections.ConfigDict:
    """The masking ablation as the paper runs it, from a pretrained CLIP: `init_checkpoint` = the stage-A run
    (`synthetic_clip`; set it on the command line or through `python -m reid_jax.ablate`). Fixed before any
    result was seen: SDM alone at the paper's scale 50, as every run from a pretrained CLIP; Adam lr 1e-4, a fifth
    of stage A's (the paper trains at 1e-5, a fiftieth of CLIP's own peak lr), a tenth of an epoch of warmup; two
    epochs as `ablation`."""
    c = ablation(mode)
    c.loss.update({"logit_scale": 50.0, "itc_weight": 0.0})
    c.optim.update({"lr": 1e-4, "warmup_epochs": 0.1})
    return c


def pretrained_oracle(kind: str, auc: float = 0.0, timing: str = "start") -> ml_collections.ConfigDict:
    """`pretrained_nam` with NAM's similarity table known from the start instead of measured by the model:
    'exact' = 0 for exactly the wrong words (a perfect model), 'word' = 0 for words no clean caption of the image
    holds (a perfect word-level model without context). What NAM could gain at best. With `auc`, the exact table
    degraded to that masking AUC: what NAM gains from a model as good as that. `timing` 'as_nam': the table reaches
    NAM when a model's would, from the second epoch. docs/ablations.md."""
    c = pretrained("nam")
    c.nam.update({"oracle": kind, "oracle_auc": auc, "oracle_timing": timing})
    return c


VARIANTS = {"pretrain": base, "finetune": lambda: finetune("cuhk"),
            **{f"finetune_{k}": lambda k=k: finetune(k) for k in TEST_SETS},
            "finetune_irra": lambda: finetune("cuhk", irra_groups=True),
            **{f"finetune_{k}_irra": lambda k=k: finetune(k, irra_groups=True) for k in TEST_SETS},
            "zeroshot": zeroshot, "demo": demo,
            **{f"ablation_{m}": lambda m=m: ablation(m) for m in NAM_MODES},
            "synthetic_clip": synthetic_clip, "synthetic_clip_words": synthetic_clip_words,
            "synthetic_clip_image_words": synthetic_clip_image_words, "synthetic_clip_swap": synthetic_clip_swap,
            "synthetic_clip_swap_kinds": synthetic_clip_swap_kinds,
            **{f"pretrained_{m}": lambda m=m: pretrained(m) for m in NAM_MODES},
            "pretrained_word_oracle": lambda: pretrained_oracle("word"),
            # the exact table, as is or degraded (0.75: stage A's masking-AUC target; 0.70: about the stage-A
            # model's table), from the first step or on NAM's schedule
            **{f"pretrained_oracle{name}{suffix}": lambda auc=auc, timing=timing: pretrained_oracle("exact", auc,
                                                                                                    timing)
               for name, auc in (("", 0.0), ("_auc75", 0.75), ("_auc70", 0.70))
               for suffix, timing in (("", "start"), ("_as_nam", "as_nam"))}}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg.startswith("finetune_") and arg not in VARIANTS:
        return finetune(arg.removeprefix("finetune_"))  # raises, naming the valid test sets
    return common.select(arg, VARIANTS, __file__, default="pretrain")
