"""Who the synthetic pedestrians are, and how people describe them.

`identities(config)` draws every identity of a configuration (pure and deterministic in `config.seed`):
clothing, hair and accessories from the vocabularies below, one visual domain, one split. A fraction
(`config.shared_fraction`) of identities comes in small groups that share every coarse, captioned attribute
and differ only in details (pattern, logo, shade, build, height, bag side, accessory colours), so that
neither a caption nor a colour histogram alone finds the right person.

`caption(identity, template_id, rng, noise)` fills one of the TEMPLATES with the identity's attribute words;
with `noise > 0` each attribute word is replaced, with that probability, by a different word of the same slot
(always wrong for that identity), for the noise-aware-masking ablation. Every attribute word is one
whitespace-delimited token, so a caption's attribute words can be counted by splitting it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import numpy as np

RGB = tuple[int, int, int]

# Garment, shoe and accessory colours: names a person would use, and RGB values far enough apart that each
# name is recognisable in every domain. No name starts with a vowel, so "a {colour} ..." is always grammatical.
COLOURS: dict[str, RGB] = {
    "black": (30, 30, 34), "white": (236, 236, 230), "grey": (130, 130, 130), "red": (200, 32, 36),
    "blue": (36, 78, 196), "green": (40, 150, 64), "yellow": (236, 204, 44), "pink": (238, 112, 170),
    "purple": (122, 52, 156), "brown": (122, 78, 40),
}
HAIR_COLOURS: dict[str, RGB] = {"black": (24, 22, 20), "brown": (96, 60, 30), "blonde": (222, 192, 112),
                                "grey": (168, 168, 168)}
SKIN_TONES: tuple[RGB, ...] = ((240, 206, 176), (212, 162, 122), (162, 112, 76), (104, 72, 46))

# Slot -> vocabulary: the words a caption may use for that slot (and the pool noise draws replacements from).
VOCAB: dict[str, tuple[str, ...]] = {
    "hair_length": ("short", "long"),
    "hair_colour": tuple(HAIR_COLOURS),
    "upper_colour": tuple(COLOURS),
    "pattern": ("plain", "striped", "checked"),
    "upper_type": ("t-shirt", "shirt", "jacket", "sweater", "coat", "hoodie"),
    "logo": tuple(COLOURS),  # the logo's colour
    "lower_colour": tuple(COLOURS),
    "lower_type": ("trousers", "jeans", "shorts", "skirt"),
    "shoes_colour": ("black", "white", "grey", "brown", "red", "blue"),
    "shoes_type": ("sneakers", "boots", "loafers"),
    "bag_colour": tuple(COLOURS),
    "bag_type": ("backpack", "handbag", "briefcase"),
    "hat_colour": tuple(COLOURS),
    "hat_type": ("cap", "beanie"),
}
SLOTS = tuple(VOCAB)

# Priors of the attribute draw: how often each optional item appears, and how gender presentation skews
# hair length and garments (so "woman" and "man" are informative words but not a hard rule).
PRIORS = {
    "long_hair": {"woman": 0.7, "man": 0.15},
    "skirt": {"woman": 0.35, "man": 0.03},
    "bag": 0.45, "hat": 0.2, "logo": 0.25, "pattern": {"plain": 0.6, "striped": 0.25, "checked": 0.15},
    "shade": 0.12,  # garment colours vary by up to +-12% brightness between otherwise equal identities
    "build": (0.85, 1.15), "height": (0.93, 1.04),
}

# Captioned attributes a shared group agrees on (gender and skin too, though they are not slots).
COARSE = ("gender", "skin", "hair_length", "hair_colour", "upper_type", "upper_colour", "lower_type",
          "lower_colour", "shoes_type", "shoes_colour", "bag_type", "hat_type")


@dataclasses.dataclass(frozen=True)
class Identity:
    """One pedestrian: what the renderer draws and the captioner describes. Colours are names (see COLOURS)."""

    pid: int  # 1-based, unique in the whole dataset
    split: str  # 'train' or 'test'
    domain: str
    group: int  # identities with the same group share all COARSE attributes
    gender: str  # 'woman' / 'man' (presentation)
    skin: int  # index into SKIN_TONES
    hair_length: str
    hair_colour: str
    upper_type: str
    upper_colour: str
    pattern: str  # 'plain' / 'striped' / 'checked'
    pattern_colour: str  # colour of stripes/checks (a contrasting one)
    logo: str | None  # logo colour, or None
    lower_type: str
    lower_colour: str
    shoes_type: str
    shoes_colour: str
    bag_type: str | None
    bag_colour: str | None
    bag_side: str  # 'left' / 'right': the hand a handbag or briefcase hangs from
    hat_type: str | None
    hat_colour: str | None
    shade: float  # garment brightness factor - 1, in [-PRIORS['shade'], PRIORS['shade']]
    build: float  # body width factor
    height: float  # body height factor

    def words(self) -> dict[str, str]:
        """Slot -> the true word, for every slot this identity has (no bag: no bag slots)."""
        return {s: getattr(self, s) for s in SLOTS if getattr(self, s) is not None}

    def coarse(self) -> tuple:
        return tuple(getattr(self, a) for a in COARSE)


def _choice(rng: np.random.Generator, values, p=None):
    values = list(values)
    return values[int(rng.choice(len(values), p=p))]


def _contrast_colour(rng: np.random.Generator, colour: str) -> str:
    """A pattern colour that stands out against `colour` (light on dark, dark on light)."""
    light = sum(COLOURS[colour]) > 3 * 128
    return _choice(rng, ("black", "blue", "brown") if light else ("white", "yellow", "grey"))


def _coarse(rng: np.random.Generator) -> dict:
    gender = _choice(rng, ("woman", "man"))
    skirt = rng.random() < PRIORS["skirt"][gender]
    return {
        "gender": gender, "skin": int(rng.integers(len(SKIN_TONES))),
        "hair_length": "long" if rng.random() < PRIORS["long_hair"][gender] else "short",
        "hair_colour": _choice(rng, VOCAB["hair_colour"]),
        "upper_type": _choice(rng, VOCAB["upper_type"]), "upper_colour": _choice(rng, COLOURS),
        "lower_type": "skirt" if skirt else _choice(rng, ("trousers", "jeans", "shorts")),
        "lower_colour": _choice(rng, COLOURS),
        "shoes_type": _choice(rng, VOCAB["shoes_type"]), "shoes_colour": _choice(rng, VOCAB["shoes_colour"]),
        "bag_type": _choice(rng, VOCAB["bag_type"]) if rng.random() < PRIORS["bag"] else None,
        "hat_type": _choice(rng, VOCAB["hat_type"]) if rng.random() < PRIORS["hat"] else None,
    }


def _details(rng: np.random.Generator, coarse: dict) -> dict:
    pats = PRIORS["pattern"]
    return {
        "pattern": _choice(rng, pats, p=list(pats.values())),
        "pattern_colour": _contrast_colour(rng, coarse["upper_colour"]),
        "logo": _choice(rng, COLOURS) if rng.random() < PRIORS["logo"] else None,
        "bag_colour": _choice(rng, COLOURS) if coarse["bag_type"] else None,
        "bag_side": _choice(rng, ("left", "right")),
        "hat_colour": _choice(rng, COLOURS) if coarse["hat_type"] else None,
        "shade": float(rng.uniform(-PRIORS["shade"], PRIORS["shade"])),
        "build": float(rng.uniform(*PRIORS["build"])), "height": float(rng.uniform(*PRIORS["height"])),
    }


def _group_sizes(rng: np.random.Generator, n: int, shared_fraction: float, max_group: int) -> list[int]:
    """Sizes of the coarse-attribute groups, in a shuffled order: about shared_fraction * n identities
    sit in groups of 2..max_group, the rest alone."""
    shared, sizes = int(round(shared_fraction * n)), []
    while shared >= 2:
        size = min(int(rng.integers(2, max_group + 1)), shared)
        size = shared if shared - size == 1 else size  # never leave a group of one behind
        sizes.append(size)
        shared -= size
    sizes += [1] * (n - sum(sizes))
    return [sizes[i] for i in rng.permutation(len(sizes))]


def identities(config) -> list[Identity]:
    """All identities of a config (fields seed, num_identities, domains, train_fraction, shared_fraction,
    max_group, pid_offset); list index = pid - pid_offset - 1. Train pids come first; groups never straddle
    splits or domains."""
    rng = np.random.default_rng([config.seed, 1])
    sizes = _group_sizes(rng, config.num_identities, config.shared_fraction, config.max_group)
    n_train = int(round(config.train_fraction * config.num_identities))
    out: list[Identity] = []
    for g, size in enumerate(sizes):
        coarse = _coarse(rng)
        domain = config.domains[g % len(config.domains)]
        split = "train" if len(out) < n_train else "test"
        seen = set()
        for _ in range(size):
            details = _details(rng, coarse)
            while _visible_details(details) in seen:  # members must differ in something one can see
                details = _details(rng, coarse)
            seen.add(_visible_details(details))
            out.append(Identity(pid=config.pid_offset + len(out) + 1, split=split, domain=domain, group=g,
                                **coarse, **details))
    return out


def _visible_details(d: dict) -> tuple:
    return (d["pattern"], d["pattern_colour"], d["logo"], d["bag_colour"], d["bag_side"], d["hat_colour"],
            round(d["build"], 1))


# ------------------------------------------------------------------------------------------------- captions
# Fields: {A_person} "A woman"; {a_person}; {person}; {Pron} "She"; {pron}; {Pos} "Her"; {pos}; {obj}; phrases
# {hair} "long black hair", {upper} "a plain red jacket", {Upper}, {upper_bare} "plain red jacket",
# {logo} "with a white logo", {lower} "blue jeans" / "a blue skirt", {shoes} "white sneakers",
# {bag} "a black backpack", {bag_bare}, {hat} "a red cap"; and any slot word, e.g. {hair_colour}.
# [...] is optional: kept only when every field in it is present (no bag: bag clauses vanish).
TEMPLATES: tuple[str, ...] = (
    "{A_person} with {hair} wears {upper}[ {logo}], {lower} and {shoes}[, carrying {bag}].",
    "This {person} has {hair} and is dressed in {upper}[ {logo}] with {lower}.[ {Pron} is wearing {hat}.]"
    "[ {Pron} carries {bag}.]",
    "{A_person} walking along the street. {Pron} wears {upper}, {lower} and {shoes}, and has {hair}."
    "[ {Pron} has {bag} with {obj}.]",
    "The {person} is wearing {lower} and {upper}[ {logo}]. {Pos} hair is {hair_colour} and {hair_length}."
    "[ {Pron} has {bag}.]",
    "{Upper}, {lower} and {shoes} on {a_person} with {hair}.[ {Pron} wears {hat}.]",
    "Pedestrian: {person}, {hair}, {upper_bare}, {lower}, {shoes}[, {bag_bare}][, {hat_bare}].",
    "{A_person} in {upper}[ {logo}] and {lower} is walking[ with {bag}]. {Pron} has {hair} and wears {shoes}.",
    "Wearing {upper} over {lower}, this {person} with {hair} walks by in {shoes}.",
    "{A_person} whose {hair_length} hair is {hair_colour} is dressed in {upper} and {lower}"
    "[, wearing {hat}][, carrying {bag}].",
    "{A_person} with {hair}[ and {hat}] in {upper}, {lower} and {shoes}.",
    "The pedestrian is {a_person} with {hair}. {Pos} top is {upper}[ {logo}]; {pos} bottom is {lower}. "
    "{Pron} has {shoes} on.[ {Pron} holds {bag}.]",
    "{Upper}[ {logo}] and {lower} are worn by {a_person} with {hair}[, who also carries {bag}].",
    "{A_person} with {hair} in {upper}, {lower}, {shoes}[ and {hat}].",
    "There is {a_person} in {upper} and {lower}. {Pron} has {hair}[ and carries {bag}].",
    "{A_person} is wearing {upper}[ {logo}] paired with {lower} and {shoes}. "
    "{Pos} hair is {hair_length} and {hair_colour}.",
    "Seen walking: {a_person} with {hair}, in {upper}, {lower} and {shoes}[, with {bag}].",
    "{A_person} with {hair} has {upper} on, and {lower} with {shoes}.[ {Pron} also has {hat}.]",
    "Dressed in {lower} and {upper}[ {logo}], the {person} has {hair}[ and a {bag_bare}].",
    "{A_person} with {hair} is walking in {shoes}, {lower} and {upper}[, with {bag}][ and {hat}].",
    "{Pos} {upper_bare} stands out: {a_person} with {hair}, also in {lower} and {shoes}.",
    "{A_person} with {hair}, {upper}[ {logo}], {lower} and {shoes}.[ {Pron} carries {bag}.]",
    "{A_person} in {upper} walks past. {Pron} has {hair}, {lower} and {shoes}[ and {hat}].",
    "This is {a_person} wearing {upper}, {lower} and {shoes}; {pos} hair is {hair_colour} and {hair_length}"
    "[, and {pron} has {bag}].",
    "Look for {a_person} with {hair}, wearing {upper} and {lower}[ and carrying {bag}].",
    "{A_person} with {hair} is in {upper}[ {logo}] and {lower}. {Pron} wears {shoes}[ and {hat}]"
    "[ and carries {bag}].",
)
# Which slots each phrase field spells out (a caption mentions the slots of the fields it keeps).
_FIELD_SLOTS = {
    "hair": ("hair_length", "hair_colour"), "upper": ("pattern", "upper_colour", "upper_type"),
    "logo": ("logo",), "lower": ("lower_colour", "lower_type"), "shoes": ("shoes_colour", "shoes_type"),
    "bag": ("bag_colour", "bag_type"), "hat": ("hat_colour", "hat_type"),
}
_OPTIONAL = re.compile(r"\[([^\]]*)\]")
_FIELD = re.compile(r"\{(\w+)\}")


def template_name(template_id: int) -> str:
    return f"template_{template_id:02d}"


def template_split(num_held_out: int) -> dict[str, tuple[int, ...]]:
    """Template ids by split: the last `num_held_out` templates only describe test images."""
    n = len(TEMPLATES)
    return {"train": tuple(range(n - num_held_out)), "test": tuple(range(n - num_held_out, n))}


class Caption(NamedTuple):
    text: str
    slots: tuple[tuple[str, str, str], ...]  # (slot, true word, written word) for each attribute it mentions


def _field_base(field: str) -> str:
    """'Upper' / 'upper_bare' / 'hair_colour' -> the phrase or slot it comes from ('upper', 'hair_colour')."""
    return field.lower().removesuffix("_bare")


def _phrases(w: dict[str, str], gender: str) -> dict[str, str]:
    """Slot words (maybe noisy) -> template fields; fields of absent slots are left out."""
    woman = gender == "woman"
    f = {"person": gender, "a_person": f"a {gender}", "pron": "she" if woman else "he",
         "pos": "her" if woman else "his", "obj": "her" if woman else "him",
         "hair": f"{w['hair_length']} {w['hair_colour']} hair",
         "upper_bare": f"{w['pattern']} {w['upper_colour']} {w['upper_type']}",
         "lower": ("a " if w["lower_type"] == "skirt" else "") + f"{w['lower_colour']} {w['lower_type']}",
         "shoes": f"{w['shoes_colour']} {w['shoes_type']}", **w}
    f["upper"] = "a " + f["upper_bare"]
    if "logo" in w:
        f["logo"] = f"with a {w['logo']} logo"
    for item in ("bag", "hat"):
        if f"{item}_type" in w:
            f[f"{item}_bare"] = f"{w[f'{item}_colour']} {w[f'{item}_type']}"
            f[item] = "a " + f[f"{item}_bare"]
    for key in ("a_person", "pron", "pos", "upper"):
        f[key[0].upper() + key[1:]] = f[key][0].upper() + f[key][1:]
    return f


def _noisy(words: dict[str, str], rng: np.random.Generator, rate: float) -> dict[str, str]:
    """Each slot word replaced with probability `rate` by another word of its vocabulary. Draws the same
    random numbers whatever the rate, so captions with and without noise line up word for word."""
    out = {}
    for slot in SLOTS:  # fixed order and a fixed number of draws per slot
        u, k = rng.random(), int(rng.integers(len(VOCAB[slot]) - 1))
        if slot in words:
            others = [v for v in VOCAB[slot] if v != words[slot]]
            out[slot] = others[k] if u < rate else words[slot]
    return out


def _fill(template: str, fields: dict[str, str]) -> tuple[str, set[str]]:
    """Drops optional parts with a missing field, fills the rest; returns the text and the fields used."""
    text = _OPTIONAL.sub(lambda m: m.group(1) if all(f in fields for f in _FIELD.findall(m.group(1))) else "",
                         template)
    return text.format(**fields), set(_FIELD.findall(text))


def caption(identity: Identity, template_id: int, rng: np.random.Generator, noise: float = 0.0) -> Caption:
    """One caption of `identity` from TEMPLATES[template_id]; with `noise`, wrong attribute words (see _noisy)."""
    words = identity.words()
    said = _noisy(words, rng, noise)
    text, used = _fill(TEMPLATES[template_id], _phrases(said, identity.gender))
    mentioned = {s for f in used for s in _FIELD_SLOTS.get(_field_base(f), (_field_base(f),)) if s in VOCAB}
    slots = tuple((s, words[s], said[s]) for s in SLOTS if s in mentioned)
    return Caption(text, slots)
