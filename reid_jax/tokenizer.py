"""CLIP text tokenizer that reproduces OpenAI's `clip.tokenize` ids exactly.

`tokenize(texts, context_length=77)` returns int32 ids `[N, context_length]` in OpenAI's layout:
`SOT_ID, <BPE ids>, EOT_ID, 0, 0, ...`; an over-long text is cut to `context_length` with `EOT_ID` kept last
(OpenAI's `truncate=True` rule).

Why it is built this way:

* The byte-pair merges (the slow part) run in Rust through transformers' `CLIPTokenizer`, built in memory from
  the BPE file shipped as package data (`reid_jax/assets/bpe_simple_vocab_16e6.txt.gz`), so no download and no
  torch/torchvision import are needed.
* Everything before the merges is done in Python with OpenAI's own recipe, because the stock HF pipeline
  differs from OpenAI's in edge cases:
  - cleaning: OpenAI runs `ftfy.fix_text`, `html.unescape` twice, strips, collapses `regex` `\\s+` and
    lower-cases; HF only does NFC + whitespace collapse + lower-case. HF's extra NFC would also re-compose
    text that OpenAI leaves decomposed (e.g. ``"<b>e&#769;</b>"``).
  - word splitting: OpenAI splits with the `regex` module under IGNORECASE; HF's Rust (Oniguruma) copy of the
    pattern is case-sensitive (``"'ſ"`` matches ``'s`` only under case folding; U+0345 folds to a letter),
    uses older Unicode tables (thousands of recently assigned letters/digits fall in the punctuation class),
    and matches ``<|endoftext|>`` anywhere before splitting (OpenAI does not inside ``"<<|endoftext|>"``).
  So we split with OpenAI's pattern here and hand HF the words pre-split, with its normalizer removed and
  its pre-tokenizer reduced to the byte-to-unicode mapping.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import threading
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

SOT_ID = 49406  # <|startoftext|>
EOT_ID = 49407  # <|endoftext|>
PAD_ID = 0
MASK_ID = 49405  # id of the last merge; reused as the mask token by the text-to-image ReID code
VOCAB_SIZE = 49408

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 merge lines follow the '#version' header
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (in vocab order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


@functools.cache
def load_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Reads the packaged BPE file; returns (vocab token -> id with 49408 entries, merges in rank order)."""
    data = importlib.resources.files("reid_jax").joinpath("assets", _BPE_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), *_SPECIALS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


_BUILD_LOCK = threading.Lock()  # input pipelines tokenise from several threads; transformers' lazy import is not
                                # safe to run concurrently


def hf_tokenizer():
    """transformers' CLIPTokenizer over the packaged vocab, set up to BPE-encode already split words."""
    with _BUILD_LOCK:
        return _build_hf_tokenizer()


@functools.cache
def _build_hf_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab, merges = load_bpe()
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    backend = tok.backend_tokenizer
    backend.normalizer = None  # cleaning is done by clean_text
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tok


def clean_text(text: str) -> str:
    """OpenAI's cleaning: ftfy, HTML-unescape twice, collapse whitespace, strip, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def split_words(text: str) -> list[str]:
    """Cleans `text` and splits it into BPE words exactly as OpenAI's SimpleTokenizer does."""
    return _WORD_RE.findall(clean_text(text))


def encode(texts: Sequence[str]) -> list[list[int]]:
    """BPE ids of each text, without SOT/EOT: N texts -> N lists of ids."""
    words = [split_words(t) for t in texts]
    backend = hf_tokenizer().backend_tokenizer  # its batch call without offsets: the fastest path
    return [enc.ids for enc in backend.encode_batch_fast(words, is_pretokenized=True, add_special_tokens=False)]


def is_word(ids):
    """Which positions of tokenised ids (numpy or jax, any shape) hold a word: not SOT / EOT / pad / the mask id."""
    return (ids > PAD_ID) & (ids < MASK_ID)


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    """OpenAI's `clip.tokenize(texts, context_length, truncate=True)` as numpy.

    Args:
      texts: one string or a sequence of N strings.
      context_length: L, tokens per row (>= 2).
    Returns:
      int32 `[N, L]` (N = 1 for a single string): SOT_ID, BPE ids, EOT_ID, then PAD_ID; a row that does not
      fit is cut to L ids with EOT_ID as the last one.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize expects a str or a sequence of str")
    out = np.full((len(texts), context_length), PAD_ID, dtype=np.int32)
    for row, ids in zip(out, encode(texts)):
        ids = [SOT_ID, *ids, EOT_ID][:context_length]
        ids[-1] = EOT_ID
        row[: len(ids)] = ids
    return out
