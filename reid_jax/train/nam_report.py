"""Does noise-aware masking find the wrong words? `python -m reid_jax.train.nam_report --workdir=RUN
--data_dir=DIR [--clean_dir=DIR]`, or for a model before any NAM training `--model=RUN [--config=FILE:VARIANT]`.

For a NAM run on synthetic_pedestrians `demo_noisy` (configs/tde_nam.py:ablation_nam), the similarity table in its
last checkpoint gives every training caption's masking probabilities for the next epoch. The `demo` config draws
the same captions without noise, word for word, so the tokens that differ are exactly the corrupted attribute
words. Prints the mean masking probability of corrupted tokens, of the clean tokens in the same captions, and the
AUC of "a corrupted token gets a higher probability than a clean one" (0.5 = no better than uniform masking),
against every clean token ('auc') and against the clean attribute words alone ('auc_attribute_words': is a wrong
colour or garment masked more than a right one, leaving aside words such as "a" or "with" that match no region).

`--oracle` scores the best a word-level model without context could do: similarity 1 for a token that a clean
caption of the same image holds, else 0 (`--max_images` and `--context_length` apply).

`--model` asks the same of a trained CLIP itself (e.g. the stage-A `synthetic_clip` run): it computes the token
similarities NAM would store in its first epoch, on `--max_images` evenly spaced training images of demo_noisy with
all their captions, using the model section, `nam.layer`, `nam.p`, context length and test transform of `--config`
(default: the ablation from a pretrained start, configs/tde_nam.py:pretrained_nam). With `--recognition` it
scores instead how well the model tells which words another image shows (clean captions, no context shared with
the image): per kind of word, the AUC of shown against not shown.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from data_builders.synthetic_pedestrians import attributes
from reid_jax import config_file, data, errors, tokenizer, weights
from reid_jax.data import transforms
from reid_jax.eval import encode
from reid_jax.models import nam
from reid_jax.train import nam_oracle
from reid_jax.weights import runs

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished ablation_nam run: score the similarity table it "
                               "trained with")
_MODEL = flags.DEFINE_string("model", None, "instead of --workdir: a trained CLIP (a run's workdir, e.g. the stage-A "
                             "`synthetic_clip` run) whose token similarities are computed here, as NAM's first look")
_CONFIG = flags.DEFINE_string("config", "configs/tde_nam.py:pretrained_nam", "with --model: FILE:VARIANT, the config "
                              "whose model section, nam.layer, nam.p, context length and test transform apply")
_DATA = flags.DEFINE_string("data_dir", None, "TFDS folder holding synthetic_pedestrians/demo_noisy", required=True)
_CLEAN = flags.DEFINE_string("clean_dir", None, "TFDS folder holding synthetic_pedestrians/demo (default: data_dir)")
_P = flags.DEFINE_float("p", 0.15, "with --workdir: NAM's mean masking probability (config.nam.p)")
_LENGTH = flags.DEFINE_integer("context_length", 48, "with --workdir: config.data.context_length of the run")
_ORACLE = flags.DEFINE_bool("oracle", False, "instead of --workdir / --model: the ceiling of a word-level model "
                            "without context (1 for a token a clean caption of the image holds, else 0)")
_KIND = flags.DEFINE_bool("by_kind", False, "also the AUC of each kind of wrong word (colour, other attribute, "
                          "function) against each kind of right one, with their mean similarities")
_RECOGNITION = flags.DEFINE_bool("recognition", False, "with --model: instead of the masking AUC, how well the "
                                 "model tells which words another image shows, per kind of word (clean captions)")
_SLOT = flags.DEFINE_bool("by_slot", False, "with --recognition: per attribute slot (colours, hair length, pattern, "
                          "each garment and accessory kind) instead of per kind of word")
_IMAGES = flags.DEFINE_integer("max_images", 2400, "with --model: training images scored, evenly spaced (0 = all)")


NOISY, CLEAN = "demo_noisy", "demo"  # the builder configs: training captions with and without the wrong words


def _captions(data_dir: Path, clean_dir: Path, length: int, images: np.ndarray | None = None,
              configs: tuple[str, str] = (NOISY, CLEAN), image_words: bool = False):
    """The training captions of the noisy config (of the records `images`, default all, in the order of NAM's
    table) and the same captions without noise: (record per caption, noisy ids [N, L], clean ids [N, L]), and with
    `image_words` the word tokens of all clean captions of each caption's image, 0-padded [N, W]."""
    noisy = data.load_source("synthetic_pedestrians", "train", data_dir, configs[0], decode_image=False)
    clean = data.load_source("synthetic_pedestrians", "train", clean_dir, configs[1], decode_image=False)
    return nam_oracle.paired_captions(noisy, clean, length, images, image_words)


def _spaced_images(n: int, max_images: int) -> np.ndarray:
    """Record ids of `max_images` training images evenly spaced over the n (0 = all)."""
    return np.unique(np.linspace(0, n - 1, min(max_images or n, n)).round().astype(np.int64))


def word_oracle(data_dir: Path, clean_dir: Path, length: int, p: float, max_images: int,
                configs: tuple[str, str] = (NOISY, CLEAN), by_kind: bool = False) -> dict:
    """The ceiling of a word-level model without context, scored as NAM's: similarity 1 for a token that a clean
    caption of the same image holds, 0 otherwise (a wrong colour the image shows elsewhere scores 1)."""
    n = len(data.load_source("synthetic_pedestrians", "train", data_dir, configs[0], decode_image=False))
    images = _spaced_images(n, max_images)
    _, ids, ref, words = _captions(data_dir, clean_dir, length, images, configs, image_words=True)
    return {"images": len(images)} | _scores(ids, ref, nam_oracle.similarities(ids, ref, words, "word"), p, by_kind)


def _word_token_ids(words) -> np.ndarray:
    """The distinct word token ids of `words` (a multi-piece word such as "t-shirt" gives each piece)."""
    ids = tokenizer.tokenize(sorted(words), 16)
    return np.unique(ids[tokenizer.is_word(ids)])


@functools.cache
def attribute_token_ids() -> np.ndarray:
    """Token ids of the synthetic captions' attribute words (every word of every slot's vocabulary)."""
    return _word_token_ids(set().union(*attributes.VOCAB.values()))


COLOUR_WORDS = frozenset(attributes.COLOURS) | frozenset(attributes.HAIR_COLOURS)  # garments, accessories, hair


@functools.cache
def colour_token_ids() -> np.ndarray:
    """Token ids of the synthetic captions' colour words (garments, accessories, hair)."""
    return _word_token_ids(COLOUR_WORDS)


def _kinds(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of the colour words, the other attribute words and the rest (function words) among token ids."""
    colour = np.isin(ids, colour_token_ids())
    attribute = np.isin(ids, attribute_token_ids())
    return {"colour": colour, "other_attribute": attribute & ~colour, "function": ~attribute}


def _slots(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of the colour words and of each other attribute slot's words (hair length, pattern, garment and
    accessory kinds) among token ids: which attributes a model grounds."""
    colour = np.isin(ids, colour_token_ids())
    return {"colour": colour} | {slot: np.isin(ids, _word_token_ids(words)) & ~colour
                                 for slot, words in attributes.VOCAB.items() if not set(words) <= COLOUR_WORDS}


def _by_kind(ids, wrong, right, sims, probs) -> dict:
    """The AUC and mean similarities of wrong against right tokens for each pair of kinds (colour words, other
    attribute words, function words): which words NAM tells apart."""
    kinds = _kinds(ids)
    out = {}
    for kw, w in kinds.items():
        for kr, r in kinds.items():
            w_, r_ = wrong & w, right & r
            if w_.any() and r_.any():
                out[f"wrong_{kw}/right_{kr}"] = {"auc": nam_oracle.auc(probs[w_], probs[r_]),
                                                 "sim_wrong": float(sims[w_].mean()),
                                                 "sim_right": float(sims[r_].mean()),
                                                 "tokens": [int(w_.sum()), int(r_.sum())]}
    return out


def _scores(ids: np.ndarray, ref: np.ndarray, sims: np.ndarray, p: float, by_kind: bool = False) -> dict:
    """NAM's masking probabilities from `sims` [N, L], scored against the corrupted tokens (ids != ref): 'auc'
    against every clean token of the same captions (function words included), 'auc_attribute_words' against the
    clean attribute words only (is a wrong colour masked more than a right one?); `by_kind`: per kind of word."""
    probs = np.asarray(nam.masking_probs(jnp.asarray(ids), jnp.asarray(sims), p, "nam"))
    seen = (sims > -1.5).all(1, keepdims=True)  # rows NAM has filled (not nam.UNSEEN)
    wrong, right = (m & seen for m in nam_oracle.wrong_and_right(ids, ref))
    usable = (nam_oracle.aligned(ids, ref) & seen)[:, 0]
    right_attribute = right & np.isin(ids, attribute_token_ids())
    return {"captions": int(usable.sum()), "corrupted_tokens": int(wrong.sum()), "clean_tokens": int(right.sum()),
            "clean_attribute_tokens": int(right_attribute.sum()),
            "mask_prob_corrupted": float(probs[wrong].mean()), "mask_prob_clean": float(probs[right].mean()),
            "mask_prob_clean_attribute": float(probs[right_attribute].mean()),
            "auc": nam_oracle.auc(probs[wrong], probs[right]),
            "auc_attribute_words": nam_oracle.auc(probs[wrong], probs[right_attribute])} | (
                {"by_kind": _by_kind(ids, wrong, right, sims, probs)} if by_kind else {})


def report(workdir: Path, data_dir: Path, clean_dir: Path, p: float, length: int, by_kind: bool = False) -> dict:
    """The masking that a NAM run's last checkpoint would apply in its next epoch, scored."""
    _, saved = runs.latest_arrays(workdir / "checkpoints")
    sims = saved["nam_sims"].astype(np.float32)
    _, ids, ref = _captions(data_dir, clean_dir, length)
    return _scores(ids, ref, sims[: len(ids)], p, by_kind)


def model_similarities(model, images: np.ndarray, ids: np.ndarray, layer: int, batch_size: int = 64) -> np.ndarray:
    """NAM's token similarities (`nam.token_similarity` at `layer`) of captions `ids` [N, L] to their images
    [N, H, W, 3] (normalised float32), in batches: [N, L] float32."""
    prefix = 1 + model.config.vision.num_extra_tokens

    def sims(m, batch):
        _, img_layers = m.visual(batch["image"], return_layers=True)
        _, txt_layers = m.text(batch["text"], return_layers=True)
        return nam.token_similarity(img_layers, txt_layers, m, layer, prefix)

    run = encode.jitted(model, sims)
    out = []
    for i in range(0, len(ids), batch_size):  # the last batch padded to the same shape: one compilation
        chunk = {"image": images[i: i + batch_size], "text": ids[i: i + batch_size]}
        pad = batch_size - len(chunk["text"])
        chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in chunk.items()}
        out.append(np.asarray(run(chunk))[: batch_size - pad])
    return np.concatenate(out).astype(np.float32)


def report_model(model, config, data_dir: Path, clean_dir: Path, max_images: int,
                 configs: tuple[str, str] = (NOISY, CLEAN), by_kind: bool = False) -> dict:
    """The masking NAM would apply with the CLIP `model`'s similarities (its first NAM epoch), scored."""
    source = data.load_source("synthetic_pedestrians", "train", data_dir, configs[0])
    n = len(source)
    images = _spaced_images(n, max_images)
    records, ids, ref = _captions(data_dir, clean_dir, config.data.context_length, images, configs)
    pixels = {int(r): transforms.eval_transform(source[int(r)]["image"], config.data.aug) for r in images}
    sims = model_similarities(model, np.stack([pixels[int(r)] for r in records]), ids, config.nam.layer)
    return {"layer": config.nam.layer, "images": len(images)} | _scores(ids, ref, sims, config.nam.p, by_kind)


def recognition_pairs(records: np.ndarray, shifts: int) -> np.ndarray:
    """For captions of `records` [N] (several per record, grouped), the record each is scored against in each of
    `shifts` rounds: round s pairs a caption with the record s places after its own in the sorted distinct
    records, never its own image. -> [shifts, N]."""
    distinct = np.unique(records)
    place = np.searchsorted(distinct, records)
    return np.stack([distinct[(place + s) % len(distinct)] for s in range(1, shifts + 1)])


def recognition(model, config, clean_dir: Path, max_images: int, shifts: int = 4, clean: str = CLEAN,
                by_slot: bool = False) -> dict:
    """Word grounding without the caption's own context: each clean caption of `max_images` images of `demo`
    against `shifts` other images, and per kind of token (`by_slot`: colours and each other attribute slot) the AUC
    of "the other image shows it" (a clean caption of that image holds the token) against "it does not", over the
    tokens' similarities. Read beside the masking AUC: a model that knows a word here but not in its own caption
    scores words by their context."""
    n = len(data.load_source("synthetic_pedestrians", "train", clean_dir, clean, decode_image=False))
    length = config.data.context_length
    records, ids, _, words = _captions(clean_dir, clean_dir, length, _spaced_images(n, max_images), (clean, clean),
                                       image_words=True)
    words_of = {int(r): w for r, w in zip(records, words)}
    source = data.load_source("synthetic_pedestrians", "train", clean_dir, clean)
    pixels = {r: transforms.eval_transform(source[r]["image"], config.data.aug) for r in words_of}
    sims, shown = [], []
    for others in recognition_pairs(records, shifts):
        sims.append(model_similarities(model, np.stack([pixels[int(r)] for r in others]), ids, config.nam.layer))
        shown.append((ids[:, :, None] == np.stack([words_of[int(r)] for r in others])[:, None, :]).any(-1))
    real = np.broadcast_to(tokenizer.is_word(ids), (shifts, *ids.shape))
    tokens, sims, shown = np.broadcast_to(ids, real.shape)[real], np.stack(sims)[real], np.stack(shown)[real]
    out = {}
    for kind, k in (_slots if by_slot else _kinds)(tokens).items():
        yes, no = sims[k & shown], sims[k & ~shown]
        if len(yes) and len(no):
            out[kind] = {"auc": nam_oracle.auc(yes, no), "sim_shown": float(yes.mean()),
                         "sim_not_shown": float(no.mean()),
                         "tokens": [int(len(yes)), int(len(no))]}
    return {"layer": config.nam.layer, "images": len(words_of), "recognition": out}


def main(argv) -> None:
    del argv
    if (_WORKDIR.value is not None) + (_MODEL.value is not None) + _ORACLE.value != 1:
        raise app.UsageError("give one of --workdir (a NAM run's table), --model (a CLIP to compute it with) or "
                             "--oracle")
    data_dir = Path(_DATA.value)
    clean_dir = Path(_CLEAN.value or _DATA.value)
    if _ORACLE.value:
        out = {"model": "word oracle"} | word_oracle(data_dir, clean_dir, _LENGTH.value, _P.value, _IMAGES.value,
                                                     by_kind=_KIND.value)
    elif _MODEL.value is not None:
        try:
            config = config_file.load(_CONFIG.value)
        except errors.UserError as e:
            sys.exit(errors.report(e, errors.EXIT_USAGE))
        model = weights.model_for(config.model, _MODEL.value, config.seed)
        if _RECOGNITION.value:
            print(json.dumps({"model": _MODEL.value} | recognition(model, config, clean_dir, _IMAGES.value,
                                                                     by_slot=_SLOT.value)))
            return
        out = {"model": _MODEL.value} | report_model(model, config, data_dir, clean_dir, _IMAGES.value,
                                                          by_kind=_KIND.value)
    else:
        out = report(Path(_WORKDIR.value), data_dir, clean_dir, _P.value, _LENGTH.value, _KIND.value)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
