"""TFDS builder of the synthetic pedestrians: configs, the shot plan (who, which camera, which captions), splits.

`plan(config)` decides everything but the pixels (pure, deterministic in config.seed); the builder renders each
shot and stores it as PNG. Splits: `train` (training identities); on the disjoint test identities `test`
(every image, for text-to-image retrieval), and `query` / `gallery` for image ReID: per test identity,
`queries_per_identity` images from distinct cameras go to query, the rest to gallery, and every query has a
gallery image of its pid from another camera.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_builders.common import ReIDBuilder, example
from data_builders.synthetic_pedestrians import attributes, freeform, render


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Every number of the synthetic set. Ranges are (low, high)."""

    seed: int = 0
    num_identities: int = 48
    images_per_identity: int = 6
    num_cameras: int = 4
    cameras_per_identity: tuple[int, int] = (2, 4)  # each identity passes this many distinct cameras
    image_size: tuple[int, int] = (128, 64)  # (H, W)
    supersample: int = 2  # drawn at this multiple of image_size, then shrunk (anti-aliasing)
    domains: tuple[str, ...] = ("daylight", "night", "overcast")  # keys of render.DOMAINS
    train_fraction: float = 0.5  # of identities
    shared_fraction: float = 0.3  # of identities sitting in groups that share every coarse attribute
    max_group: int = 3
    queries_per_identity: int = 2
    captions_per_image: int = 2  # from distinct templates
    held_out_templates: int = 5  # the last templates, used only for test images
    caption_noise: float = 0.0  # probability that a training caption's attribute word is replaced by a wrong one
    freeform_fraction: float = 0.0  # of a training image's captions, free-form (freeform.py) instead of a template
    pid_offset: int = 0  # pids start after it: a corpus with an offset shares no person with the other configs
    # views
    facing_bias: float = 0.6  # probability of a camera's preferred facing (front / back / side)
    height_range: tuple[float, float] = (0.8, 0.92)  # person height / image height
    offset_jitter: tuple[float, float] = (0.06, 0.025)  # max crop offset (x of the width, y of the height)
    swing_range: tuple[float, float] = (0.1, 0.5)  # limb swing amplitude, radians
    brightness_jitter: float = 0.06  # fraction of 255
    contrast_jitter: float = 0.15
    camera_tint: float = 0.05  # max per-channel colour gain deviation of a camera
    scene_pan: float = 0.6  # max background pan of one image, fraction of the width
    png_compress_level: int = 1  # fast; PNG is lossless whatever the level


SMALL = dict(num_identities=48, images_per_identity=6, num_cameras=4)
# The demo trains from scratch: 1200 training identities with 3 captions per image (not 300 with 2) are what
# lets a small CLIP generalise to unseen people and held-out templates in minutes (measured: see configs/tde_nam.py)
DEMO = dict(num_identities=1500, images_per_identity=8, num_cameras=6, cameras_per_identity=(2, 5),
            train_fraction=0.8, captions_per_image=3)
# The synthetic CLIP-pretraining corpus (configs/tde_nam.py:synthetic_clip), the part CLIP's web data plays before
# the ablations: 8000 other people (pids from 100001, drawn from another seed), every identity a training one, all
# three domains, 4 images each, 3 clean captions per image of which about half free-form and the rest from the
# training templates (never the 5 held-out ones that the evaluation captions use)
CLIP_CORPUS = dict(seed=1, pid_offset=100000, num_identities=8000, images_per_identity=4, num_cameras=6,
                   cameras_per_identity=(2, 4), train_fraction=1.0, captions_per_image=3, freeform_fraction=0.5)
CONFIGS = (
    SyntheticConfig(name="small", description="48 identities x 6 images, 4 cameras: for tests", **SMALL),
    SyntheticConfig(name="small_noisy", description="small with 30% of caption attribute words wrong",
                    caption_noise=0.3, **SMALL),
    SyntheticConfig(name="demo", description="1500 identities (1200 train, 300 test) x 8 images, 6 cameras, "
                    "3 captions each: for the demo", **DEMO),
    SyntheticConfig(name="demo_noisy", description="demo with 30% of training caption attribute words wrong "
                    "(the NAM ablation)", caption_noise=0.3, **DEMO),
    SyntheticConfig(name="clip_corpus", description="8000 other identities x 4 images, clean free-form and template "
                    "captions, train split only: stage A, the synthetic CLIP pretraining", **CLIP_CORPUS),
)


@dataclasses.dataclass(frozen=True)
class Shot:
    """One image to render and what is recorded with it."""

    identity: attributes.Identity
    view: render.ViewParams
    file_name: str
    captions: tuple[str, ...]
    caption_sources: tuple[str, ...]


def _rng(config, *key: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, *key])


def shots(config, who: attributes.Identity) -> list[Shot]:
    """The images of one identity: cameras, views and captions (templates of its split)."""
    rng = _rng(config, 2, who.pid)
    k = int(rng.integers(config.cameras_per_identity[0], min(config.cameras_per_identity[1], config.num_cameras) + 1))
    cams = sorted(int(c) for c in rng.choice(config.num_cameras, k, replace=False))
    pool = attributes.template_split(config.held_out_templates)[who.split]
    out = []
    for i in range(config.images_per_identity):
        camid = cams[i % k]  # round robin: every chosen camera sees the person
        view = render.sample_view(_rng(config, 3, who.pid, i), camid, config.domains.index(who.domain), config)
        ids = _rng(config, 4, who.pid, i).choice(pool, config.captions_per_image, replace=False)
        crng = _rng(config, 5, who.pid, i)
        noise = config.caption_noise if who.split == "train" else 0.0  # evaluation captions stay clean
        caps = [attributes.caption(who, int(t), crng, noise).text for t in ids]
        sources = [attributes.template_name(int(t)) for t in ids]
        if config.freeform_fraction and who.split == "train":  # own rng: the template draws above stay as they were
            frng = _rng(config, 7, who.pid, i)
            for c in np.flatnonzero(frng.random(len(caps)) < config.freeform_fraction):
                caps[c], sources[c] = freeform.caption(who, frng, noise).text, freeform.SOURCE
        out.append(Shot(who, view, f"{who.domain}/{who.pid:04d}_c{camid}_{i:02d}.png", tuple(caps), tuple(sources)))
    return out


def _query_gallery(config, who: attributes.Identity, own: list[Shot]) -> tuple[list[Shot], list[Shot]]:
    """Queries: one image from each of `queries_per_identity` cameras; each needs a gallery image of its pid
    from another camera (guaranteed by at least two cameras per identity; checked)."""
    rng = _rng(config, 6, who.pid)
    cams = sorted({s.view.camid for s in own})
    query_cams = [cams[i] for i in rng.permutation(len(cams))[:config.queries_per_identity]]
    query = [next(s for s in own if s.view.camid == c) for c in query_cams]
    gallery = [s for s in own if s not in query]
    for q in query:
        if not any(g.view.camid != q.view.camid for g in gallery):
            raise ValueError(f"{config.name}: query {q.file_name} has no gallery image from another camera; "
                             f"raise images_per_identity or cameras_per_identity[0] (need >= 2 cameras)")
    return query, gallery


def plan(config) -> dict[str, list[Shot]]:
    """{split: shots}; pure and deterministic in config."""
    if config.cameras_per_identity[0] < 2:
        raise ValueError(f"cameras_per_identity {config.cameras_per_identity}: need at least 2 cameras per "
                         "identity so every query has a gallery image from another camera")
    splits = {"train": [], "test": [], "query": [], "gallery": []}
    for who in attributes.identities(config):
        own = shots(config, who)
        if who.split == "train":
            splits["train"] += own
            continue
        query, gallery = _query_gallery(config, who, own)
        splits["test"] += own
        splits["query"] += query
        splits["gallery"] += gallery
    return splits


def encode_png(image: np.ndarray, compress_level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def render_shot(config, shot: Shot) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 [H, W, 3], float32 [3, 4] part boxes)."""
    return render.render(shot.identity, shot.view, shot.identity.domain, tuple(config.image_size),
                         config.supersample)


class SyntheticPedestrians(ReIDBuilder):
    """Procedurally drawn pedestrians in three visual domains, with exact part boxes and template captions."""

    DESCRIPTION = __doc__
    BUILDER_CONFIGS = list(CONFIGS)
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "demo configs: 1500 identities, 3 captions per image."}

    def _needs_manual_dir(self) -> bool:
        return False

    def _examples(self, manual_dir: Path | None):
        # a corpus of training identities only (clip_corpus) has no test splits; TFDS needs every split it writes
        return {split: self._generate(items) for split, items in plan(self.builder_config).items() if items}

    def _generate(self, items: list[Shot]) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        for shot in items:
            image, boxes = render_shot(cfg, shot)
            yield shot.file_name, example(
                encode_png(image, cfg.png_compress_level), shot.file_name, shot.identity.pid, shot.view.camid,
                shot.captions, shot.caption_sources, shot.identity.domain, boxes)
