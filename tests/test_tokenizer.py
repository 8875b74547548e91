"""reid_jax.tokenizer against OpenAI's SimpleTokenizer (clip-anytorch), an independent implementation."""

import gzip
import pathlib
import random

import numpy as np
import pytest

from reid_jax import tokenizer as T
from tests import torch_refs


@pytest.fixture(scope="module")
def openai_bpe():
    """OpenAI's SimpleTokenizer (clip-anytorch), loaded by path: importing `clip` would pull in torchvision."""
    return torch_refs.openai_simple_tokenizer().SimpleTokenizer()


def openai_tokenize(bpe, texts, context_length=77):
    """`clip.tokenize(texts, context_length, truncate=True)` rebuilt on SimpleTokenizer: [N, L] ids."""
    out = np.zeros((len(texts), context_length), np.int64)
    for row, text in zip(out, texts):
        ids = [T.SOT_ID, *bpe.encode(text), T.EOT_ID]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = T.EOT_ID
        row[: len(ids)] = ids
    return out


LONG = "A woman wearing a long black coat, blue jeans and white sneakers, carrying a brown handbag. " * 6

CASES = {
    "caption": "A man in a red T-shirt and black shorts is walking with a grey backpack.",
    "caption2": "The pedestrian wears glasses, a white shirt, dark trousers and black leather shoes.",
    "upper": "A TALL WOMAN WITH LONG HAIR WEARING A PINK DRESS",
    "mixed_case": "McDonald's iPhone eBay YouTube NASA-style",
    "punct_runs": "Wow!!! ... ?!?! --- (((x))) [a]{b} ***bold*** ~~~ @#$%^&*",
    "apostrophes": "he's she'd they're we've I'm you'll don't it's IT'S THEY'RE o'clock rock'n'roll '' ' 's",
    "curly_quotes": "\u201cquoted\u201d \u2018single\u2019 it\u2019s \u00abguillemets\u00bb",
    "digits": "3 people, 12.5 kg, 2024-01-31, 1,000,000 and 007 and \u0663\u0664 and \u2165 \u00bd",
    "accents": "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c9COLE Stra\u00dfe \u00f8re \u00c5ngstr\u00f6m",
    "combining": "cafe\u0301 n\u0303 a\u030a\u0323 Z\u0351\u0352\u0353 e\u0301\u0301",
    "decomposed_in_html": "<b>e&#769;</b> and u&#776;",
    "cjk": "\u4e00\u4e2a\u7a7f\u7ea2\u8272\u8863\u670d\u7684\u7537\u4eba "
           "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4",
    "cyrillic": "\u041c\u0443\u0436\u0447\u0438\u043d\u0430 \u0432 "
                "\u043a\u0440\u0430\u0441\u043d\u043e\u0439 \u0440\u0443\u0431\u0430\u0448\u043a\u0435",
    "arabic": "\u0631\u062c\u0644 \u064a\u0631\u062a\u062f\u064a "
              "\u0642\u0645\u064a\u0635\u0627\u064b \u0623\u062d\u0645\u0631",
    "greek_sigma": "\u039f\u0394\u039f\u03a3 \u03bf\u03b4\u03bf\u03c2 \u03a3\u0391\u03a3",
    "emoji": "\U0001f600 \U0001f44d\U0001f3fd "
             "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 \u2764\ufe0f \U0001f1ef\U0001f1f5",
    "emoji_zwj_tones": "\U0001f9d1\U0001f3ff\u200d\U0001f91d\u200d\U0001f9d1\U0001f3fb\U0001f3c3\u200d\u2640\ufe0f",
    "html_entities": "Tom &amp; Jerry &lt;b&gt;bold&lt;/b&gt; &quot;hi&quot; &#39;x&#39; "
                     "&nbsp;&eacute; &amp;amp; &copy;",
    "html_tags": "<b>bold</b> <i>it</i> &lt;|endoftext|&gt;",
    "whitespace": "a\tb\nc\r\nd\x0be\x0cf  "
                  "g\u00a0h\u2002i\u2003j\u2009k\u200al\u3000m\u202fn\u205fo\u1680p\u2028q\u2029r\x85s",
    "zero_width": "a\u200bb\u200cc\u200dd\ufeffe\u2060f\u180eg",
    "controls": "a\x00b\x01c\x07d\x1be\x1cf\x1fg\x7fh\x9fi",
    "leading_trailing_ws": "  \t\n padded text \n\t  ",
    "only_ws": " \t\n\u3000\u00a0 ",
    "empty": "",
    "endoftext": "<|endoftext|>",
    "startoftext": "<|startoftext|>",
    "specials_mixed": "a<|endoftext|>b <|ENDOFTEXT|> <<|endoftext|>> <|startoftext|><|endoftext|>",
    "long_s_fold": "'\u017f '\u017fx \u212a \u0130stanbul \u0131 ",  # ' + long s matches 's under IGNORECASE
    "ypogegrammeni": "a\u0345b \u0345",  # combining mark that case-folds to a letter
    "new_unicode_letters": "a\u1c89b \ua7cbx \U00010940y \u0897 \U00011f00",  # letters newer than HF's tables
    "mojibake": "The Mona Lisa doesn\u00e2\u20ac\u2122t have eyebrows. \u00c3\u00a9t\u00c3\u00a9",
    "surrogates": "a\ud800b \ud83d\ude00 \udfff",
    "private_use_and_nonchars": "\ue000\uf8ff\U000f0000\ufffe\uffff\ufffd",
    "long": LONG,
    "long_one_word": "x" * 500,
    "long_punct": "!?" * 200,
    "long_emoji": "\U0001f468\u200d\U0001f469\u200d\U0001f467" * 40,
}

# Character classes mixed by the random strings.
_POOLS = [
    "abcdefghijklmnopqrstuvwxyz",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "\u00e9\u00e8\u00fc\u00f1\u00e7\u00df\u00c5\u00d8\u0153\u0301\u0308\u0323\u030a\u017f\u0130\u0131",
    "\u4e00\u4eba\u7ea2\u8272\u3042\u30a2\ud55c\uae00",
    "\u0416\u0436\u042f\u044f\u0451\u0414\u0434",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629\u064b",
    "\U0001f600\U0001f44d\U0001f3fb\U0001f3ff\u200d\u2764\ufe0f\U0001f468\U0001f469\U0001f1fa\U0001f1f8",
    " \t\n\r\x0b\x0c\u00a0\u2003\u3000\u200b\u2028\x85",
    "\x00\x01\x1b\x1f\x7f\x9f\ufeff\ud800",
]
_FRAGMENTS = ["&amp;", "&lt;", "&gt;", "&amp;amp;", "&#39;", "&eacute;", "<|endoftext|>", "<|startoftext|>", "'s",
              "'T", "'re", "'LL", "'d", "'ve", "'M", "person", "Backpack", "\u00e2\u20ac\u2122"]


def random_strings(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(0, 60)):
            if rng.random() < 0.15:
                pieces.append(rng.choice(_FRAGMENTS))
            elif rng.random() < 0.05:
                pieces.append(chr(rng.randrange(0x110000)))  # anything, incl. unassigned/surrogates
            else:
                pool = rng.choice(_POOLS)
                pieces.append("".join(rng.choices(pool, k=rng.randint(1, 6))))
        out.append("".join(pieces))
    return out


@pytest.mark.parametrize("name", CASES)
def test_matches_openai_on_cases(openai_bpe, name):
    np.testing.assert_array_equal(T.tokenize(CASES[name]), openai_tokenize(openai_bpe, [CASES[name]]))


def test_matches_openai_on_random_strings(openai_bpe):
    texts = random_strings(400)
    ours, ref = T.tokenize(texts), openai_tokenize(openai_bpe, texts)
    bad = [ascii(t) for t, a, b in zip(texts, ours, ref) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:3]}"
    assert (ref[:, -1] == T.EOT_ID).sum() >= 20, "too few random strings reach the truncation rule"


def test_matches_openai_on_codepoint_sweep(openai_bpe):
    """Every 101st code point (~11k), alone and between letters, batched as one call."""
    texts = [f"a{chr(c)}b {chr(c)}" for c in range(0, 0x110000, 101)]
    ours, ref = T.tokenize(texts), openai_tokenize(openai_bpe, texts)
    bad = [ascii(t) for t, a, b in zip(texts, ours, ref) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:3]}"


@pytest.mark.parametrize("context_length", [2, 5, 16, 77, 128])
def test_matches_openai_other_context_lengths(openai_bpe, context_length):
    texts = [CASES["caption"], CASES["long"], CASES["emoji"], "", "a"]
    ours = T.tokenize(texts, context_length=context_length)
    np.testing.assert_array_equal(ours, openai_tokenize(openai_bpe, texts, context_length))
    assert ours.shape == (len(texts), context_length)


def test_layout():
    ids = T.tokenize(["a person", "", LONG])
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    assert (ids[:, 0] == T.SOT_ID).all()
    assert ids[0, :4].tolist() == [T.SOT_ID, 320, 2533, T.EOT_ID] and not ids[0, 4:].any()
    assert ids[1, :2].tolist() == [T.SOT_ID, T.EOT_ID] and not ids[1, 2:].any()
    assert ids[2, -1] == T.EOT_ID and (ids[2, 1:-1] != T.PAD_ID).all() and (ids[2, 1:-1] != T.EOT_ID).all()


def test_single_string_and_sequence_types():
    one = T.tokenize("a man with a hat")
    assert one.shape == (1, 77)
    np.testing.assert_array_equal(T.tokenize(("a man with a hat", "x")), T.tokenize(["a man with a hat", "x"]))
    np.testing.assert_array_equal(T.tokenize(["a man with a hat"]), one)
    assert T.tokenize([]).shape == (0, 77)
    with pytest.raises(TypeError):
        T.tokenize([b"bytes"])
    with pytest.raises(ValueError):
        T.tokenize("a", context_length=1)


def test_constants_and_vocab(openai_bpe):
    assert (T.SOT_ID, T.EOT_ID, T.PAD_ID, T.MASK_ID, T.VOCAB_SIZE) == (49406, 49407, 0, 49405, 49408)
    vocab, merges = T.load_bpe()
    assert len(vocab) == T.VOCAB_SIZE == len(set(vocab.values())) and len(merges) == 48894
    assert vocab["<|startoftext|>"] == T.SOT_ID and vocab["<|endoftext|>"] == T.EOT_ID
    assert vocab == openai_bpe.encoder
    assert len(T.hf_tokenizer()) == T.VOCAB_SIZE


def test_mask_id_is_last_merge(openai_bpe):
    path = pathlib.Path(T.__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    last_merge = "".join(lines[48894].split())  # line 0 is the '#version' header
    assert T.hf_tokenizer().convert_ids_to_tokens(T.MASK_ID) == last_merge == openai_bpe.decoder[T.MASK_ID]
    assert T.load_bpe()[1][-1] == tuple(lines[48894].split())


def test_bytes_to_unicode():
    table = T.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "\u0120" and table[0] == "\u0100"
