"""What NAM would mask if it knew which caption words are wrong: similarity tables from the synthetic set's truth.

`synthetic_pedestrians` builds the same images twice, with noisy captions (`demo_noisy`: 30% of the attribute words
replaced by a wrong word of the same slot) and with the clean ones (`demo`). Word for word, the two captions of an
example differ exactly at the wrong words. From them, in the order of NAM's per-example table
(`pipeline.caption_examples(..., 'all')`), a table of similarities [N, L]:

  'exact'  1 where the noisy token equals the clean caption's, else 0: NAM with a perfect model (AUC 1);
  'word'   1 where any clean caption of the image holds the token, else 0: the best a word-level model without
           context could do (a wrong jacket colour that is the trousers' colour scores 1).

Training with `config.nam.oracle` fills NAM's table with one of them and never updates it: the ceiling of NAM in
the ablation (docs/ablations.md). `nam_report --oracle` scores the 'word' table.

`config.nam.oracle_auc` degrades the table to a chosen masking AUC (`degrade`): sim = gap * table + sigma * z with
Gaussian z, sigma set so that NAM's masking probabilities rank the wrong tokens above the clean ones with that AUC.
A trained model's table looks like that (its wrong words sit about 0.15 below its right ones, spread by about
0.18 inside a caption), so this asks how good the model's table must be for NAM to pay.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from reid_jax import data, errors, tokenizer
from reid_jax.data import pipeline
from reid_jax.data.records import as_str
from reid_jax.models import nam

KINDS = ("exact", "word")


def paired_captions(noisy, clean, length: int, records: np.ndarray | None = None, image_words: bool = False):
    """Sources of the noisy and the clean build -> (record per example, noisy ids [N, L], clean ids [N, L]) for
    every caption of `records` (default all, in the order of NAM's table), and with `image_words` the word tokens
    of all clean captions of each example's image, 0-padded [N, W]. Records are matched by file name (the two
    builds may order them apart)."""
    counts = np.asarray([len(r["captions"]) for r in noisy])
    records = np.arange(len(noisy)) if records is None else records
    records, caption_ids = pipeline.caption_examples(counts, records, "all")
    by_name = {clean[i]["file_name"]: i for i in range(len(clean))}
    noisy_recs = {int(r): noisy[int(r)] for r in np.unique(records)}
    missing = sorted({as_str(rec["file_name"]) for rec in noisy_recs.values()} - {as_str(k) for k in by_name})
    if missing:
        raise errors.ConfigError(f"the clean build lacks {len(missing)} of the training images (e.g. {missing[0]}): "
                                 f"it must be the same images with clean captions (synthetic_pedestrians demo for "
                                 f"demo_noisy)")
    clean_of = {r: clean[by_name[rec["file_name"]]] for r, rec in noisy_recs.items()}
    ids = tokenizer.tokenize([as_str(noisy_recs[r]["captions"][c]) for r, c in zip(records, caption_ids)], length)
    ref = tokenizer.tokenize([as_str(clean_of[r]["captions"][c]) for r, c in zip(records, caption_ids)], length)
    if not image_words:
        return records, ids, ref
    shown = {r: [as_str(c) for c in rec["captions"]] for r, rec in clean_of.items()}
    width = max(len(c) for c in shown.values()) * length
    words = {r: pipeline.image_words(c, length, width) for r, c in shown.items()}
    return records, ids, ref, np.stack([words[int(r)] for r in records])


def aligned(ids: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Captions `ids` [N, L] with as many tokens as their clean twins `ref` [N, L], which alone can be compared
    word for word (a replacement of another token count shifts the rest): [N, 1] bool."""
    return ((ids > 0) == (ref > 0)).all(1, keepdims=True)


def similarities(ids: np.ndarray, ref: np.ndarray, words: np.ndarray | None, kind: str) -> np.ndarray:
    """The oracle's similarity of each token of `ids` [N, L] (clean captions `ref` [N, L], clean image words
    [N, W]): float32 [N, L] in {0, 1}. Captions whose token count differs from the clean one (a replacement of
    another length) cannot be compared word for word: 'exact' gives them 1 everywhere (NAM's mean rate)."""
    if kind == "exact":
        return np.where(aligned(ids, ref) & (ids != ref), 0.0, 1.0).astype(np.float32)
    if kind == "word":
        return (ids[:, :, None] == words[:, None, :]).any(-1).astype(np.float32)
    raise errors.ConfigError(f"config.nam.oracle must be '' or one of {KINDS}, got {kind!r}")


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney U over ranks)."""
    scores = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties sharing their mean rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def wrong_and_right(ids: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Word tokens of the noisy captions `ids` [N, L] that differ from the clean twin `ref` [N, L] (wrong) and that
    equal it (right), both [N, L] bool; captions of another token count than their twin are in neither."""
    real = np.asarray(nam.real_tokens(jnp.asarray(ids)))
    comparable = real & aligned(ids, ref)
    return comparable & (ids != ref), comparable & (ids == ref)


def masking_auc(ids: np.ndarray, ref: np.ndarray, sims: np.ndarray, p: float) -> float:
    """The AUC of NAM's masking probabilities from `sims` [N, L]: wrong tokens against every right one."""
    probs = np.asarray(nam.masking_probs(jnp.asarray(ids), jnp.asarray(sims), p, "nam"))
    wrong, right = wrong_and_right(ids, ref)
    return auc(probs[wrong], probs[right])


def degrade(sims: np.ndarray, ids: np.ndarray, ref: np.ndarray, target: float, gap: float, p: float,
            seed: int) -> np.ndarray:
    """A {0, 1} table `sims` [N, L] made as good as a model whose masking AUC is `target`: gap * sims + sigma * z,
    z ~ N(0, 1) drawn once from `seed`, clipped to a cosine's [-1, 1]; sigma by bisection on `masking_auc`.
    float32 [N, L]."""
    if not 0.5 < target < masking_auc(ids, ref, gap * sims, p):
        raise errors.ConfigError(f"config.nam.oracle_auc = {target} is out of reach: it must lie above 0.5 (chance) "
                                 f"and below the undegraded table's masking AUC")
    z = np.random.default_rng(seed).standard_normal(sims.shape).astype(np.float32)

    def noisy(sigma):
        return np.clip(gap * sims + sigma * z, -1.0, 1.0)

    lo, hi = 0.0, gap
    while masking_auc(ids, ref, noisy(hi), p) > target:  # grow until it brackets the target
        lo, hi = hi, 2 * hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if masking_auc(ids, ref, noisy(mid), p) > target else (lo, mid)
    return noisy((lo + hi) / 2)


def table(train_spec, nam_config, data_dir, length: int, seed: int = 0) -> np.ndarray:
    """NAM's table for the training set `train_spec` (config.data.train: synthetic_pedestrians) from its clean
    build `nam_config.oracle_config` under `data_dir`, of kind `nam_config.oracle`, degraded to
    `nam_config.oracle_auc` with noise from `seed` when that is set: float32 [N, L], rows in the order of the
    training examples."""
    if train_spec["name"] != "synthetic_pedestrians":
        raise errors.ConfigError(f"config.nam.oracle needs the synthetic set's clean captions; config.data.train is "
                                 f"{train_spec['name']!r}. Set config.nam.oracle = '' for any other dataset")
    noisy = data.load_source(train_spec["name"], train_spec["split"], data_dir, train_spec["config"],
                             decode_image=False)
    clean = data.load_source(train_spec["name"], train_spec["split"], data_dir, nam_config.oracle_config,
                             decode_image=False)
    _, ids, ref, words = paired_captions(noisy, clean, length, image_words=True)
    sims = similarities(ids, ref, words, nam_config.oracle)
    if not nam_config.get("oracle_auc"):
        return sims
    return degrade(sims, ids, ref, nam_config.oracle_auc, nam_config.oracle_gap, nam_config.p, seed)
