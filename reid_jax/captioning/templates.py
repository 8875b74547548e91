"""TDE's template bank: the static instruction, caption templates with the paper's slots, and their checks.

A template is a sentence pattern whose bracketed slots the MLLM fills from the image, e.g.
"Wearing [clothing description], this [person/woman/man] has [hair description] ...". Captions written from
varied templates are varied in order and phrasing, which is what TDE adds over one static instruction.

`check_template` decides what a template may look like (only the six slots, each at most once, clothing and the
person always there, at least `min_slots` slots); `similarity` and `add_new` keep near-duplicates out;
`grow_bank` asks an LLM for more in a multi-turn dialogue (the `templates` subcommand).
A bank on disk is a UTF-8 text file, one template per line; a template's id is its line index (so growing a
bank by appending keeps the ids of the captions already written).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from reid_jax import files
from reid_jax.errors import UserError

SLOTS = ("[clothing description]", "[hair description]", "[footwear description]", "[accessory description]",
         "[belongings description]", "[person/woman/man]")
REQUIRED_SLOTS = ("[clothing description]", "[person/woman/man]")

# The instruction for the 'static' captions (one fixed prompt for every image).
STATIC_INSTRUCTION = (
    "Describe the pedestrian in this image in one or two sentences: whether it is a man or a woman, the rough "
    "age (child, young, middle-aged or old), the hair, the clothes on the upper and lower body with their "
    "colours, the shoes, and anything worn or carried, such as a hat, glasses, a bag or an umbrella. Mention "
    "only what you can see.")  # covers CLIP-SCGI's attributes too: gender, age, hair, clothing, shoes, belongings

# The instruction for 'template' captions; the template goes on the last line after "Template: ".
TEMPLATE_INSTRUCTION = (
    "Describe the pedestrian in this image following the sentence pattern below. Replace every bracketed "
    "placeholder with what you see, for example [clothing description] with the kinds and colours of the "
    "clothes, and [person/woman/man] with the right word. If something a placeholder asks for is not visible, "
    "rephrase so it is left out. Answer with the description only, without brackets.\n"
    "Template: {template}")

TEMPLATES: tuple[str, ...] = (
    "A [person/woman/man] with [hair description], dressed in [clothing description] and [footwear description], "
    "carrying [belongings description].",
    "The [person/woman/man] is wearing [clothing description] with [footwear description]; [hair description] "
    "and [accessory description] complete the look.",
    "Wearing [clothing description], this [person/woman/man] has [hair description] and walks in "
    "[footwear description].",
    "In [clothing description] and [footwear description], the [person/woman/man] carries "
    "[belongings description].",
    "[hair description] frames the face of a [person/woman/man] in [clothing description].",
    "This [person/woman/man] has [hair description], wears [accessory description], and is dressed in "
    "[clothing description].",
    "A [person/woman/man] walking by in [clothing description], [footwear description] on the feet, holding "
    "[belongings description].",
    "With [hair description] and [accessory description], the [person/woman/man] wears [clothing description].",
    "The [person/woman/man] has on [clothing description] and [footwear description], and carries "
    "[belongings description]. The hair is [hair description].",
    "Dressed in [clothing description], a [person/woman/man] with [hair description] walks along carrying "
    "[belongings description].",
    "[clothing description] and [footwear description] are what this [person/woman/man] wears; "
    "[hair description] is also visible.",
    "You can see a [person/woman/man] with [hair description]. The outfit is [clothing description], finished "
    "with [footwear description].",
    "A [person/woman/man] sporting [hair description] and [accessory description], in [clothing description].",
    "The [person/woman/man] in the picture wears [clothing description]; on the feet are "
    "[footwear description].",
    "Carrying [belongings description], the [person/woman/man] wears [clothing description] and has "
    "[hair description].",
    "This is a [person/woman/man] in [clothing description] with [footwear description], [hair description], "
    "and [accessory description].",
    "Here is a [person/woman/man] whose hair is [hair description], clothed in [clothing description].",
    "A [person/woman/man] stands out in [clothing description]; [footwear description] and "
    "[belongings description] go with it.",
    "The [person/woman/man] is clad in [clothing description] and [footwear description], with "
    "[accessory description] on.",
    "Wearing [footwear description] and [clothing description], the [person/woman/man] has [hair description] "
    "and holds [belongings description].",
    "From head to toe: [hair description], [clothing description], [footwear description]; the "
    "[person/woman/man] also has [belongings description].",
    "A [person/woman/man] with [accessory description] and [hair description] walks in [footwear description], "
    "wearing [clothing description].",
    "The outfit of this [person/woman/man] is [clothing description], paired with [footwear description].",
    "Seen from the camera: a [person/woman/man] in [clothing description], [hair description], carrying "
    "[belongings description].",
    "On the street, a [person/woman/man] wears [clothing description] and [accessory description]; the hair "
    "is [hair description].",
    "The [person/woman/man] has [hair description] and wears [clothing description], [footwear description], "
    "and [accessory description], holding [belongings description].",
    "[belongings description] in hand, the [person/woman/man] walks in [clothing description] and "
    "[footwear description].",
    "A [person/woman/man] whose clothing is [clothing description] and whose shoes are "
    "[footwear description].",
    "Look for a [person/woman/man] with [hair description] wearing [clothing description].",
    "The [person/woman/man] is dressed in [clothing description]. [hair description] and "
    "[accessory description] are also noticeable.",
    "There is a [person/woman/man] in [clothing description] who carries [belongings description] and wears "
    "[footwear description].",
    "In this image, a [person/woman/man] with [hair description] wears [clothing description] and "
    "[accessory description].",
    "A [person/woman/man] in [footwear description] and [clothing description], with [hair description].",
    "The [person/woman/man] appears in [clothing description], has [hair description], and carries "
    "[belongings description].",
    "Attired in [clothing description], the [person/woman/man] also wears [footwear description] and "
    "[accessory description].",
    "The clothes are [clothing description], the shoes [footwear description], and the hair "
    "[hair description] on this [person/woman/man].",
    "A [person/woman/man] going past, in [clothing description], with [belongings description] and "
    "[hair description].",
    "This [person/woman/man] wears [accessory description], [clothing description] and [footwear description].",
    "Notice the [person/woman/man]: [hair description], [clothing description], and [belongings description].",
    "The [person/woman/man] walks in [footwear description], wearing [clothing description] and carrying "
    "[belongings description]; the hair is [hair description].",
    "A [person/woman/man] dressed in [clothing description] has [hair description] and "
    "[accessory description].",
    "With [belongings description] and [footwear description], a [person/woman/man] in "
    "[clothing description] passes by.",
    "Someone described as a [person/woman/man] with [hair description] is wearing [clothing description] and "
    "[footwear description].",
    "The [person/woman/man] wears [clothing description]; [belongings description] and "
    "[accessory description] can be seen as well.",
    "A [person/woman/man] in [clothing description], [footwear description] and [accessory description], with "
    "[hair description], carrying [belongings description].",
    "Clothing: [clothing description]. Hair: [hair description]. Shoes: [footwear description]. A "
    "[person/woman/man] carrying [belongings description].",
)

_BRACKETED = re.compile(r"\[[^\[\]]*\]")
_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,3}[.):])\s*")  # "1. ", "2) ", "- ", "* " before a template
_WORD = re.compile(r"\[[^\[\]]*\]|[a-z0-9']+")


@dataclasses.dataclass(frozen=True)
class TemplateRules:
    """What a kept template looks like, and how close to an existing one counts as a near-duplicate."""

    min_slots: int = 3  # distinct slots; REQUIRED_SLOTS always among them
    min_chars: int = 30
    max_chars: int = 400
    max_similarity: float = 0.85  # word-level difflib ratio (slots as one word); at or above = near-duplicate


def check_template(text: str, rules: TemplateRules = TemplateRules()) -> str | None:
    """None if `text` is a well-formed template, else why not (one short phrase)."""
    found = _BRACKETED.findall(text)
    unknown = sorted({s for s in found if s not in SLOTS})
    if unknown:
        return f"unknown slot {unknown[0]}"
    rest = _BRACKETED.sub("", text)
    if any(c in rest for c in "[]{}<>"):
        return "stray bracket"
    repeated = sorted({s for s in found if found.count(s) > 1})
    if repeated:
        return f"slot {repeated[0]} used twice"
    missing = [s for s in REQUIRED_SLOTS if s not in found]
    if missing:
        return f"missing {missing[0]}"
    if len(set(found)) < rules.min_slots:
        return f"{len(set(found))} slots (< {rules.min_slots})"
    if not rules.min_chars <= len(text) <= rules.max_chars:
        return f"length {len(text)} outside [{rules.min_chars}, {rules.max_chars}]"
    return None


def words(text: str) -> list[str]:
    """Lower-case words with each slot as one word; punctuation dropped (what similarity compares)."""
    return _WORD.findall(text.lower())


def similarity(a: str, b: str) -> float:
    """Word-sequence similarity in [0, 1] (difflib ratio): 1 = same words in the same order."""
    return difflib.SequenceMatcher(None, words(a), words(b), autojunk=False).ratio()


def nearest(text: str, bank: Iterable[str]) -> tuple[float, str | None]:
    """(highest similarity, that template) of `text` against `bank`; (0, None) for an empty bank."""
    return max(((similarity(text, t), t) for t in bank), default=(0.0, None), key=lambda x: x[0])


def add_new(bank: list[str], candidates: Iterable[str], rules: TemplateRules = TemplateRules()):
    """Appends the well-formed candidates that are not near-duplicates of the bank (or of each other).

    Returns (kept, rejected): kept templates in order, and (candidate, reason) pairs. `bank` is extended in place.
    """
    kept, rejected = [], []
    for cand in candidates:
        why = check_template(cand, rules)
        if why is None:
            score, twin = nearest(cand, bank)
            if score >= rules.max_similarity:
                why = f"near-duplicate ({score:.2f}) of: {twin}"
        if why is None:
            bank.append(cand)
            kept.append(cand)
        else:
            rejected.append((cand, why))
    return kept, rejected


def candidates_in(reply: str) -> list[str]:
    """Template candidates in an LLM reply: lines holding a bracket, list marks and quotes stripped.

    Lines without any bracket are prose ("Sure, here are ten more:") and are not candidates at all.
    """
    out = []
    for line in reply.splitlines():
        line = _LIST_MARK.sub("", line.strip()).strip().strip('"\u201c\u201d`').strip()
        if "[" in line or "]" in line:
            out.append(_BRACKETED.sub(_canonical_slot, line))
    return out


def _canonical_slot(m: re.Match) -> str:
    """'[Clothing Description]' -> '[clothing description]'; unknown slots are left for check_template."""
    slot = m.group(0).lower()
    return slot if slot in SLOTS else m.group(0)


# ------------------------------------------------------------------------------------------------ the dialogue
@dataclasses.dataclass(frozen=True)
class DialogueConfig:
    rounds: int = 5
    per_round: int = 10  # templates asked for per round
    examples: int = 8  # bank templates shown in the first message (spread over the bank)
    temperature: float = 0.9  # high: the point is variety
    max_tokens: int = 1500


SYSTEM_PROMPT = "You write sentence templates for describing pedestrians seen by surveillance cameras."
FIRST_ASK = (
    "Below are templates for describing a person's appearance. Each uses some of these placeholders, written "
    "exactly like this: {slots}. Every template must use [clothing description] and [person/woman/man] and at "
    "least {min_slots} placeholders in all, each at most once, and no other brackets.\n\nExamples:\n{examples}\n\n"
    "Write {n} new templates that differ from the examples and from each other in word order, sentence "
    "structure and phrasing. One template per line, nothing else.")
NEXT_ASK = ("Write {n} more templates, different from all templates in this conversation. Same rules: one per "
            "line, only the placeholders listed, nothing else.")


def dialogue(bank: list[str], chat: Callable[[list[dict]], str], cfg: DialogueConfig = DialogueConfig(),
             rules: TemplateRules = TemplateRules(), on_round: Callable[[int, list, list], None] | None = None):
    """Grows `bank` in place by `cfg.rounds` turns of one conversation; `chat(messages) -> reply text`.

    The whole conversation is sent each turn (the model sees what it already wrote). Returns (kept, rejected)
    over all rounds; `on_round(round, kept, rejected)` is called after each (e.g. to save the bank).
    """
    step = max(1, len(bank) // max(1, cfg.examples))
    examples = "\n".join(bank[::step][:cfg.examples])
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": FIRST_ASK.format(slots=", ".join(SLOTS), min_slots=rules.min_slots,
                                                             examples=examples, n=cfg.per_round)}]
    all_kept, all_rejected = [], []
    for r in range(cfg.rounds):
        if r:
            messages.append({"role": "user", "content": NEXT_ASK.format(n=cfg.per_round)})
        reply = chat(messages)
        messages.append({"role": "assistant", "content": reply})
        kept, rejected = add_new(bank, candidates_in(reply), rules)
        all_kept += kept
        all_rejected += rejected
        if on_round:
            on_round(r, kept, rejected)
    return all_kept, all_rejected


# ------------------------------------------------------------------------------------------------ bank files
class BankError(UserError, ValueError):
    """A bank file that cannot be read or written, or holds a bad template; the message names file and line."""


def load_bank(path: str | Path | None, rules: TemplateRules = TemplateRules()) -> list[str]:
    """The built-in TEMPLATES (path None) or a bank file (one template per line; blank lines ignored).

    Every line must be a well-formed template: a bad one stops with its line number (ids are line indices,
    so silently skipping would shift them).
    """
    if path is None:
        return list(TEMPLATES)
    path = Path(path)
    if not path.is_file():
        raise BankError(f"{path}: no such file; expected a template bank written by "
                        "`python -m reid_jax.captioning templates` (one template per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BankError(f"{path}: cannot be read as a template bank ({e}); expected UTF-8 text, one template "
                        "per line") from None
    bank = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        why = check_template(line.strip(), rules)
        if why:
            raise BankError(f"{path}:{lineno}: not a valid template ({why}): {line.strip()!r}; fix or delete "
                             f"the line (slots allowed: {', '.join(SLOTS)})")
        bank.append(line.strip())
    if not bank:
        raise BankError(f"{path}: no templates; expected one template per line")
    return bank


def save_bank(bank: list[str], path: str | Path) -> None:
    """Writes the bank atomically (temporary file + rename): a crash leaves the old bank or the new, whole."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_text_atomically(path, "".join(t + "\n" for t in bank))
    except OSError as e:
        raise BankError(f"--out {path}: cannot be written ({e.strerror}); choose a path in a folder you can write "
                        "to") from None
