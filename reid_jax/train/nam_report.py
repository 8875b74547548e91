"""Does noise-aware masking find the wrong words? `python -m reid_jax.train.nam_report --workdir=RUN
--data_dir=DIR [--clean_dir=DIR]`.

For a NAM run on synthetic_pedestrians `demo_noisy` (configs/tde_nam.py:ablation_nam), the similarity table in its
last checkpoint gives every training caption's masking probabilities for the next epoch. The `demo` config draws
the same captions without noise, word for word, so the tokens that differ are exactly the corrupted attribute
words. Prints the mean masking probability of corrupted tokens, of the clean tokens in the same captions, and the
AUC of "a corrupted token gets a higher probability than a clean one" (0.5 = no better than uniform masking).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from reid_jax import data, tokenizer
from reid_jax.data import pipeline
from reid_jax.data.records import as_str
from reid_jax.models import nam
from reid_jax.weights import runs

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished ablation_nam run", required=True)
_DATA = flags.DEFINE_string("data_dir", None, "TFDS folder holding synthetic_pedestrians/demo_noisy", required=True)
_CLEAN = flags.DEFINE_string("clean_dir", None, "TFDS folder holding synthetic_pedestrians/demo (default: data_dir)")
_P = flags.DEFINE_float("p", 0.15, "NAM's mean masking probability (config.nam.p)")
_LENGTH = flags.DEFINE_integer("context_length", 48, "config.data.context_length of the run")


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney)."""
    scores = np.concatenate([pos, neg])
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable").astype(np.float64) + 1
    for value in np.unique(scores):  # average ranks of ties
        tie = scores == value
        ranks[tie] = ranks[tie].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def report(workdir: Path, data_dir: Path, clean_dir: Path, p: float, length: int) -> dict:
    _, saved = runs.latest_arrays(workdir / "checkpoints")
    sims = saved["nam_sims"].astype(np.float32)
    noisy = data.load_source("synthetic_pedestrians", "train", data_dir, "demo_noisy", decode_image=False)
    clean = data.load_source("synthetic_pedestrians", "train", clean_dir, "demo", decode_image=False)
    counts = np.asarray([len(r["captions"]) for r in noisy])
    records, caption_ids = pipeline.caption_examples(counts, np.arange(len(noisy)), "all")
    by_name = {clean[i]["file_name"]: i for i in range(len(clean))}  # the two builds may order records apart
    noisy_recs = [noisy[int(r)] for r in range(len(noisy))]
    ids = tokenizer.tokenize([as_str(noisy_recs[r]["captions"][c]) for r, c in zip(records, caption_ids)], length)
    ref = tokenizer.tokenize([as_str(clean[by_name[noisy_recs[r]["file_name"]]]["captions"][c])
                              for r, c in zip(records, caption_ids)], length)
    probs = np.asarray(nam.masking_probs(jnp.asarray(ids), jnp.asarray(sims[: len(ids)]), p, "nam"))
    real = np.asarray(nam.real_tokens(jnp.asarray(ids)))
    aligned = (ids > 0) == (ref > 0)  # same token count: the word-for-word comparison is valid
    usable = aligned.all(1) & (sims[: len(ids)] > -1.5).all(1)
    wrong = real & (ids != ref) & usable[:, None]
    right = real & (ids == ref) & usable[:, None]
    return {"captions": int(usable.sum()), "corrupted_tokens": int(wrong.sum()), "clean_tokens": int(right.sum()),
            "mask_prob_corrupted": float(probs[wrong].mean()), "mask_prob_clean": float(probs[right].mean()),
            "auc": _auc(probs[wrong], probs[right])}


def main(argv) -> None:
    del argv
    out = report(Path(_WORKDIR.value), Path(_DATA.value), Path(_CLEAN.value or _DATA.value), _P.value,
                 _LENGTH.value)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
