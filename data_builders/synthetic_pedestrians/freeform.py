"""Free-form captions: what alt text, a photo tag or a passer-by says of a pedestrian, not a ReID template.

The synthetic CLIP-pretraining corpus (builder config `clip_corpus`, docs/data.md) plays the part of CLIP's web
data, whose captions mention some of what is in the picture, in any order and wording. `caption(identity, rng)`
picks a random subset of the identity's attributes (at least two), shuffles them, writes each as a phrase in one of
several forms ("in a red jacket", "wearing a red jacket", "red jacket") and sets them in one of FRAMES, sometimes
with the scene (the domain: "at night") and what the person is doing. Every attribute word is the identity's own
(the corpus is clean); with `noise > 0` words are replaced as in `attributes.caption` (the same `_noisy` draw).

None of FRAMES is a sentence of `attributes.TEMPLATES`, so the held-out templates of the evaluation captions stay
unseen by a model pretrained on this corpus.
"""

from __future__ import annotations

import numpy as np

from data_builders.synthetic_pedestrians import attributes

SOURCE = "freeform"  # the caption_sources entry of a free-form caption

# {subject} "a woman"; {items} the attribute phrases joined; {doing} an activity; {scene} the domain's setting
FRAMES: tuple[str, ...] = (
    "{subject} {items}",
    "{subject} {doing} {scene}, {items}",
    "photo of {subject} {items}",
    "{Subject} {doing}. {items_sentence}",
    "cctv still {scene}: {subject} {items}",
    "{tags}",
    "{subject}, {tags}",
    "{tags}. {Subject} {doing} {scene}",
    "a picture taken {scene} of {subject} {doing}, {items}",
    "{Subject} {items}, {doing} {scene}.",
    "street camera, {scene}. {Subject} {items}",
    "someone {items}",
)
SUBJECTS = {"woman": ("a woman", "a lady", "a young woman", "a female pedestrian", "a person"),
            "man": ("a man", "a guy", "a young man", "a male pedestrian", "a person")}
DOING = ("walking", "walking by", "standing", "crossing the street", "waiting", "passing the camera",
         "on the sidewalk")
SCENES = {"daylight": ("in daylight", "on a sunny day", "during the day"),
          "night": ("at night", "in the dark", "under street lights"),
          "overcast": ("on a cloudy day", "under heavy clouds", "on an overcast day")}
# How each attribute group is written: (verb or preposition before it | "" for a bare tag)
_LEADS = {"hair": ("with",), "upper": ("in", "wearing"), "lower": ("in", "wearing"),
          "shoes": ("in", "wearing", "with"), "bag": ("carrying", "with", "holding"), "hat": ("wearing", "with")}


def _groups(w: dict[str, str]) -> dict[str, str]:
    """Attribute group -> its noun phrase, from (possibly noisy) slot words; the pattern is sometimes left out
    when plain, the logo rides on the top."""
    upper = f"{w['upper_colour']} {w['upper_type']}"
    upper = f"{w['pattern']} {upper}" if w["pattern"] != "plain" else upper
    if "logo" in w:
        upper += f" with a {w['logo']} logo"
    lower = f"{w['lower_colour']} {w['lower_type']}"
    g = {"hair": f"{w['hair_length']} {w['hair_colour']} hair",
         "upper": f"a {upper}", "lower": f"a {lower}" if w["lower_type"] == "skirt" else lower,
         "shoes": f"{w['shoes_colour']} {w['shoes_type']}"}
    for item in ("bag", "hat"):
        if f"{item}_type" in w:
            g[item] = f"a {w[f'{item}_colour']} {w[f'{item}_type']}"
    return g


def _join(parts: list[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        return parts[0]
    last = " and " if rng.random() < 0.7 else ", "
    return ", ".join(parts[:-1]) + last + parts[-1]


def _strip_article(phrase: str) -> str:
    return phrase.removeprefix("a ")


def caption(identity: attributes.Identity, rng: np.random.Generator, noise: float = 0.0) -> attributes.Caption:
    """One free-form caption of `identity`: text and the (slot, true word, written word) of each slot it names."""
    words = identity.words()
    said = attributes._noisy(words, rng, noise)
    groups = _groups(said)
    names = list(groups)
    k = int(rng.integers(min(2, len(names)), len(names) + 1))
    chosen = [names[i] for i in rng.permutation(len(names))[:k]]
    phrases = [f"{_LEADS[g][int(rng.integers(len(_LEADS[g])))]} {groups[g]}" for g in chosen]
    tags = [_strip_article(groups[g]) for g in chosen]
    subject = SUBJECTS[identity.gender][int(rng.integers(len(SUBJECTS[identity.gender])))]
    scenes = SCENES[identity.domain]
    scene = scenes[int(rng.integers(len(scenes)))]
    pronoun = "She" if identity.gender == "woman" else "He"
    fields = {"subject": subject, "Subject": subject[0].upper() + subject[1:], "items": _join(phrases, rng),
              "items_sentence": f"{pronoun} is seen {_join(phrases, rng)}.",
              "doing": DOING[int(rng.integers(len(DOING)))], "scene": scene,
              "tags": ", ".join(tags)}
    text = FRAMES[int(rng.integers(len(FRAMES)))].format(**fields)
    mentioned = {s for g in chosen for s in _GROUP_SLOTS[g]} - ({"pattern"} if said["pattern"] == "plain" else set())
    slots = tuple((s, words[s], said[s]) for s in attributes.SLOTS if s in mentioned and s in words)
    return attributes.Caption(text, slots)


_GROUP_SLOTS = {"hair": ("hair_length", "hair_colour"), "upper": ("pattern", "upper_colour", "upper_type", "logo"),
                "lower": ("lower_colour", "lower_type"), "shoes": ("shoes_colour", "shoes_type"),
                "bag": ("bag_colour", "bag_type"), "hat": ("hat_colour", "hat_type")}
