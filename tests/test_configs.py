"""The ablation variants from the stage-A start: every variant builds, and each `pretrained_*` differs from its
from-scratch `ablation_*` counterpart in exactly the fields its docstring names (a like-for-like table)."""

import pytest

from reid_jax.data import pipeline
from tests import configs


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if hasattr(v, "items"):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("name", ["tde_nam", "scgi", "muva"])
def test_every_variant_builds(name):
    module = configs.load(name)
    for variant in module.VARIANTS:
        assert module.get_config(variant).method == name, variant


# method -> (its ablation stages, the fields a pretrained start changes, with their values)
PRETRAINED = {
    "tde_nam": (("nam", "uniform", "none"),
                {"loss.logit_scale": 50.0, "loss.itc_weight": 0.0, "optim.lr": 1e-4, "optim.warmup_epochs": 0.1}),
    "scgi": (("baseline", "cgi", "full"),
             {"loss.i2t_mode": "prototypes", "optim.lr": 1e-4,
              "optim.frozen": [r"^model\.clip\.text\.", r"^model\.clip\.logit_scale$"]}),
    "muva": (("baseline", "fixed", "full"),
             {"optim.lr": 1e-4, "optim.frozen": [r"^model\.clip\.text\.", r"^model\.clip\.logit_scale$",
                                                  r"^model\.clip\.visual\.conv1\."]}),
}


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_pretrained_variants_change_only_the_start(name):
    module = configs.load(name)
    stages, changes = PRETRAINED[name]
    for stage in stages:
        scratch = _flat(module.get_config(f"ablation_{stage}").to_dict())
        pretrained = _flat(module.get_config(f"pretrained_{stage}").to_dict())
        assert scratch.keys() == pretrained.keys()
        differ = {k for k in scratch if scratch[k] != pretrained[k]}
        assert differ <= set(changes), (stage, differ - set(changes))
        assert {k: pretrained[k] for k in changes} == changes, stage


def test_oracle_variants_change_only_the_table():
    """pretrained_oracle / pretrained_word_oracle / pretrained_oracle_auc{75,70} (and the exact ones `_as_nam`):
    pretrained_nam with NAM's table from the truth (degraded to a masking AUC; reaching NAM when a model's would),
    nothing else; the clean captions are those of the training images (demo for demo_noisy)."""
    module = configs.load("tde_nam")
    nam_run = _flat(module.get_config("pretrained_nam").to_dict())
    assert nam_run["nam.oracle"] == "" and nam_run["data.train.config"] == "demo_noisy"
    assert (nam_run["nam.oracle_auc"], nam_run["nam.oracle_gap"], nam_run["nam.oracle_timing"]) == (0.0, 0.15, "start")
    for variant, kind, auc in (("pretrained_oracle", "exact", 0.0), ("pretrained_word_oracle", "word", 0.0),
                               ("pretrained_oracle_auc75", "exact", 0.75), ("pretrained_oracle_auc70", "exact", 0.7)):
        for timing in ("start", "as_nam") if kind == "exact" else ("start",):
            oracle = _flat(module.get_config(variant + ("_as_nam" if timing == "as_nam" else "")).to_dict())
            differ = {k for k in nam_run if nam_run[k] != oracle[k]}
            want = {"nam.oracle"} | ({"nam.oracle_auc"} if auc else set()) | (
                {"nam.oracle_timing"} if timing == "as_nam" else set())
            assert differ == want, (variant, timing)
            assert (oracle["nam.oracle"], oracle["nam.oracle_auc"], oracle["nam.oracle_timing"],
                    oracle["nam.oracle_config"]) == (kind, auc, timing, "demo")


def test_stage_a_config():
    """synthetic_clip: the demo's small CLIP on clip_corpus with ITC + FILIP and no SDM or masking, evaluated on
    the demo's held-out identities and templates, as the ablations are."""
    module = configs.load("tde_nam")
    c = module.get_config("synthetic_clip")
    ablation = module.get_config("pretrained_nam")
    assert (c.data.train.name, c.data.train.config) == ("synthetic_pedestrians", "clip_corpus")
    assert (c.loss.sdm_weight, c.loss.itc_weight, c.loss.filip_weight, c.nam.mode) == (0.0, 1.0, 1.0, "none")
    assert c.eval.datasets == ablation.eval.datasets and c.model == ablation.model
    assert not c.init_checkpoint


def test_stage_a_with_words_changes_only_its_token_losses():
    """synthetic_clip_words: synthetic_clip with FILIP at NAM's layer and the word-match term, nothing else."""
    module = configs.load("tde_nam")
    plain = _flat(module.get_config("synthetic_clip").to_dict())
    words = _flat(module.get_config("synthetic_clip_words").to_dict())
    assert {k for k in plain if plain[k] != words[k]} == {"loss.filip_layer", "loss.word_weight"}
    assert (words["loss.filip_layer"], words["loss.word_weight"]) == (plain["nam.layer"], 1.0)
    image_words = _flat(module.get_config("synthetic_clip_image_words").to_dict())
    assert {k for k in words if words[k] != image_words[k]} == {"data.image_words"}
    assert image_words["data.image_words"] > 0 and words["data.image_words"] == 0
    swap = _flat(module.get_config("synthetic_clip_swap").to_dict())
    assert {k for k in swap if swap[k] != image_words[k]} == {"data.swap_prob", "data.swap_words"}
    assert swap["data.swap_prob"] > 0 and len(pipeline.swap_token_ids(swap["data.swap_words"])) > 1
    kinds = _flat(module.get_config("synthetic_clip_swap_kinds").to_dict())
    assert {k for k in kinds if kinds[k] != swap[k]} == {"data.swap_words"}
    groups = pipeline.swap_groups(kinds["data.swap_words"])
    assert groups[0] == tuple(swap["data.swap_words"]) and len(groups) > 1  # the colours stay one group
