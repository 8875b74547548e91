"""Procedural drawing of one pedestrian image, and its exact part boxes.

`render(identity, view, domain, size)` draws a background scene, then the body in flat colours with PIL
ImageDraw at `supersample` x the output size (for anti-aliased edges), shrinks it, and applies the domain's
style (colour cast, saturation, blur, sensor noise) and the view's lighting. Every shape is drawn twice: in
colour, and as its part label (head, upper body, legs) into a label image, so the part boxes are the extents
of the pixels actually drawn for each part, after pose, scale, offset and cropping.

Body geometry is in body units: u across (0 = body centre, + = image right), v down (0 = top of the body,
1 = feet), scaled by the person's height in pixels.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_builders.synthetic_pedestrians.attributes import COLOURS, HAIR_COLOURS, SKIN_TONES, Identity

RGB = tuple[int, int, int]
BACKGROUND, HEAD, UPPER, LEGS = 0, 1, 2, 3  # label values; accessories (bags) count as background
FACINGS = ("front", "back", "side")


@dataclasses.dataclass(frozen=True)
class DomainStyle:
    """How a visual domain looks. Colours are 0-255 RGB; the cast applies to the whole image."""

    gain: tuple[float, float, float]  # colour cast: multiplies R, G, B
    bias: tuple[float, float, float]  # added after the gain (haze lifts blacks, night adds a blue floor)
    saturation: float  # 1 = as drawn, 0 = grey
    blur: float  # Gaussian blur radius, output pixels
    noise: float  # std of additive sensor noise
    scene: str  # background kind: 'street' (walls with windows, tiles), 'lamps' (dark, lit), 'facade' (soft panels)
    walls: tuple[RGB, ...]  # the colours a camera's scene draws its wall from
    grounds: tuple[RGB, ...]


DOMAINS: dict[str, DomainStyle] = {
    "daylight": DomainStyle(gain=(1.04, 1.0, 0.94), bias=(6, 4, 0), saturation=1.1, blur=0.0, noise=2.0,
                            scene="street", walls=((214, 190, 160), (196, 128, 96), (232, 224, 206)),
                            grounds=((172, 166, 160), (150, 152, 146))),
    "night": DomainStyle(gain=(0.48, 0.52, 0.72), bias=(2, 4, 16), saturation=0.75, blur=0.4, noise=9.0,
                         scene="lamps", walls=((44, 48, 76), (34, 34, 54)), grounds=((38, 38, 48), (48, 42, 42))),
    "overcast": DomainStyle(gain=(0.86, 0.9, 0.93), bias=(30, 32, 34), saturation=0.6, blur=0.9, noise=3.0,
                            scene="facade", walls=((152, 156, 160), (136, 142, 142), (172, 170, 162)),
                            grounds=((122, 130, 118), (112, 114, 116))),
}


@dataclasses.dataclass(frozen=True)
class ViewParams:
    """One shot of one person by one camera (see sample_view for the ranges)."""

    camid: int
    facing: str  # 'front' / 'back' / 'side'
    mirror: bool  # side views only: walking to the image left (front/back keep the bag on its side)
    phase: float  # walking phase, radians: which limbs are forward
    swing: float  # limb swing amplitude, radians
    height: float  # person height / image height, before the identity's own height factor
    dx: float  # body centre offset, fraction of the width (the detector's crop offset)
    dy: float  # body offset, fraction of the height
    brightness: float  # added to every channel, fraction of 255
    contrast: float  # scales deviations from the image mean
    tint: tuple[float, float, float]  # the camera's own colour gain
    scene: int  # seed of the camera's background layout (one per domain and camera)
    pan: float  # per-image pan of the background, fraction of the width
    noise_seed: int


def sample_view(rng: np.random.Generator, camid: int, domain_index: int, config) -> ViewParams:
    """A random view from camera `camid`; each camera prefers one facing and has its own scene and tint."""
    facing = FACINGS[camid % 3] if rng.random() < config.facing_bias else FACINGS[int(rng.integers(3))]
    cam = np.random.SeedSequence([config.seed, domain_index, camid])
    tint = 1 + np.random.default_rng(cam).uniform(-config.camera_tint, config.camera_tint, 3)
    return ViewParams(
        camid=camid, facing=facing, mirror=bool(rng.random() < 0.5) and facing == "side",
        phase=float(rng.uniform(0, 2 * math.pi)),
        swing=float(rng.uniform(*config.swing_range)), height=float(rng.uniform(*config.height_range)),
        dx=float(rng.uniform(-1, 1) * config.offset_jitter[0]),
        dy=float(rng.uniform(-1, 1) * config.offset_jitter[1]),
        brightness=float(rng.uniform(-1, 1) * config.brightness_jitter),
        contrast=float(1 + rng.uniform(-1, 1) * config.contrast_jitter),
        tint=tuple(float(t) for t in tint), scene=int(cam.generate_state(1)[0]),
        pan=float(rng.uniform(0, config.scene_pan)), noise_seed=int(rng.integers(2**31)))


def render(identity: Identity, view: ViewParams, domain: str, size: tuple[int, int],
           supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 [H, W, 3] image, float32 [3, 4] boxes of head, upper body, legs as normalised x0, y0, x1, y1).

    size is (H, W). A part with no visible pixel gets the box -1 (does not happen within sample_view's ranges).
    """
    style = DOMAINS[domain]
    h, w = size
    bg = _background(style, view.scene, view.pan, size)
    canvas = Image.fromarray(np.repeat(np.repeat(bg, supersample, 0), supersample, 1))
    labels = Image.new("L", canvas.size, BACKGROUND)
    _draw_person(_Painter(canvas, labels, identity, view), identity, view)
    image = canvas.resize((w, h), Image.BOX)
    if style.blur:
        image = image.filter(ImageFilter.GaussianBlur(style.blur))
    return _finish(np.asarray(image, np.float32), style, view), _boxes(np.asarray(labels))


def domain_colour(rgb, domain: str) -> np.ndarray:
    """The colour a drawn `rgb` takes in `domain` (cast and saturation; no lighting or noise): float32 [..., 3]."""
    return _cast(np.asarray(rgb, np.float32), DOMAINS[domain])


def _cast(x: np.ndarray, style: DomainStyle) -> np.ndarray:
    x = x * np.float32(style.gain) + np.float32(style.bias)
    grey = x.mean(-1, keepdims=True)
    return grey + np.float32(style.saturation) * (x - grey)


def _finish(x: np.ndarray, style: DomainStyle, view: ViewParams) -> np.ndarray:
    """Domain cast, camera tint, lighting jitter and sensor noise on a float [H, W, 3] image -> uint8."""
    x = _cast(x * np.float32(view.tint), style)
    mean = x.mean()
    x = (x - mean) * np.float32(view.contrast) + mean + np.float32(view.brightness * 255)
    x += np.random.default_rng(view.noise_seed).normal(0, style.noise, x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _boxes(labels: np.ndarray) -> np.ndarray:
    """[Hs, Ws] part labels -> float32 [3, 4] normalised extents of HEAD, UPPER, LEGS (x1, y1 exclusive)."""
    hs, ws = labels.shape
    out = np.full((3, 4), -1, np.float32)
    for i, part in enumerate((HEAD, UPPER, LEGS)):
        mask = labels == part
        rows, cols = mask.any(1), mask.any(0)
        if rows.any():
            out[i] = (cols.argmax() / ws, rows.argmax() / hs, (ws - cols[::-1].argmax()) / ws,
                      (hs - rows[::-1].argmax()) / hs)
    return out


# ----------------------------------------------------------------------------------------------- background
def _background(style: DomainStyle, scene: int, pan: float, size: tuple[int, int]) -> np.ndarray:
    """The camera's scene, panned by `pan`: uint8 [H, W, 3] before the domain style."""
    rng = np.random.default_rng(scene)
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x += pan * w
    horizon = h * rng.uniform(0.55, 0.72)
    wall = np.float32(style.walls[int(rng.integers(len(style.walls)))]) + rng.uniform(-12, 12, 3)
    ground = np.float32(style.grounds[int(rng.integers(len(style.grounds)))]) + rng.uniform(-10, 10, 3)
    above = (y < horizon)[..., None]
    img = np.where(above, wall, ground).astype(np.float32)
    img = {"street": _street, "lamps": _lamps, "facade": _facade}[style.scene](img, rng, x, y, horizon)
    return np.clip(img, 0, 255).astype(np.uint8)


def _street(img, rng, x, y, horizon):
    """Daylight: a wall with a grid of windows, a kerb, and a tiled pavement: sharp, high-contrast edges."""
    px, py = rng.integers(12, 20), rng.integers(14, 22)
    windows = ((x % px) < 0.55 * px) & ((y % py) < 0.5 * py) & (y < horizon - 5)
    img[windows] = np.float32((88, 108, 128)) + rng.uniform(-10, 10, 3)
    tiles = (y > horizon + 2) & (((x + 0.4 * (y - horizon)) % 11 < 1) | ((y - horizon) % 7 < 1))
    img[tiles] *= 0.72
    img[(y >= horizon) & (y < horizon + 2)] *= 0.55  # kerb
    return img


def _lamps(img, rng, x, y, horizon):
    """Night: dark buildings with a few lit windows, street lamps glowing, a faint reflection on the ground."""
    img *= (0.55 + 0.45 * y / y.max())[..., None]
    px, py = int(rng.integers(7, 11)), int(rng.integers(8, 12))
    lit = rng.random((64, 64)) < 0.25
    on = lit[(y // py).astype(int) % 64, (x // px).astype(int) % 64] & (x % px < 3) & (y % py < 3) & (y < horizon)
    img[on] = (230, 200, 110)
    for _ in range(int(rng.integers(1, 3))):
        lx, ly, r = rng.uniform(0, 1.3 * x.shape[1]), rng.uniform(0.05, 0.4) * y.shape[0], rng.uniform(6, 12)
        glow = np.exp(-((x - lx) ** 2 + (y - ly) ** 2) / (2 * r * r))
        img += glow[..., None] * np.float32((255, 205, 120))
        img += (np.exp(-((x - lx) ** 2) / (2 * r * r)) * (y > horizon) * 0.25)[..., None] * np.float32((160, 130, 80))
    return img


def _facade(img, rng, x, y, horizon):
    """Overcast: soft facade panels and floors, a flat ground: low contrast, nothing sharp."""
    period, floors = rng.uniform(14, 24), rng.uniform(16, 26)
    panels = 1 + 0.07 * np.sin(2 * np.pi * x / period) + 0.04 * np.cos(2 * np.pi * y / floors)
    img *= np.where(y < horizon, panels, 1 + 0.03 * np.sin(2 * np.pi * (x + y) / 9))[..., None]
    return img


# ---------------------------------------------------------------------------------------------------- body
class _Painter:
    """Draws body-unit shapes into the colour canvas and the label image at once."""

    def __init__(self, canvas: Image.Image, labels: Image.Image, who: Identity, view: ViewParams):
        self.rgb, self.lab = ImageDraw.Draw(canvas), ImageDraw.Draw(labels)
        hs, ws = canvas.size[1], canvas.size[0]
        self.scale = view.height * who.height * hs  # pixels per body unit
        self.top = (hs - self.scale) / 2 + view.dy * hs
        self.cx = ws / 2 + view.dx * ws
        self.sign = -1.0 if view.mirror else 1.0
        self.outline = max(1, round(hs / 128))  # a thin dark edge, about one output pixel wide

    def pt(self, u: float, v: float) -> tuple[float, float]:
        return self.cx + self.sign * u * self.scale, self.top + v * self.scale

    def poly(self, pts, colour: RGB, part: int, edge: bool = True):
        xy = [self.pt(u, v) for u, v in pts]
        self.rgb.polygon(xy, fill=colour, outline=_shade(colour, 0.6) if edge else None,
                         width=self.outline if edge else 1)
        self.lab.polygon(xy, fill=part)

    def ellipse(self, u: float, v: float, ru: float, rv: float, colour: RGB, part: int, edge: bool = True):
        (x0, y0), (x1, y1) = self.pt(u - ru, v - rv), self.pt(u + ru, v + rv)
        box = (min(x0, x1), y0, max(x0, x1), y1)
        self.rgb.ellipse(box, fill=colour, outline=_shade(colour, 0.6) if edge else None, width=self.outline)
        self.lab.ellipse(box, fill=part)

    def chord(self, u: float, v: float, r: float, start: float, end: float, colour: RGB, part: int):
        """Circle segment between angles start..end (degrees, clockwise from image right, before mirroring)."""
        if self.sign < 0:
            start, end = 180 - end, 180 - start
        (x0, y0), (x1, y1) = self.pt(u - r, v - r), self.pt(u + r, v + r)
        box = (min(x0, x1), y0, max(x0, x1), y1)
        self.rgb.chord(box, start, end, fill=colour)
        self.lab.chord(box, start, end, fill=part)

    def rect(self, u0, v0, u1, v1, colour: RGB, part: int, edge: bool = False):
        self.poly([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], colour, part, edge)


def _shade(colour, factor: float) -> RGB:
    return tuple(int(min(255, max(0, c * factor))) for c in colour)


def _limb(root, angle: float, length: float, w0: float, w1: float, t0: float = 0.0, t1: float = 1.0):
    """Corners of the part of a tapered limb between fractions t0..t1 of its length; angle 0 = straight down."""
    du, dv, nu, nv = math.sin(angle), math.cos(angle), math.cos(angle), -math.sin(angle)
    (a, wa), (b, wb) = [((root[0] + du * length * t, root[1] + dv * length * t), w0 + (w1 - w0) * t)
                        for t in (t0, t1)]
    return [(a[0] + nu * wa / 2, a[1] + nv * wa / 2), (b[0] + nu * wb / 2, b[1] + nv * wb / 2),
            (b[0] - nu * wb / 2, b[1] - nv * wb / 2), (a[0] - nu * wa / 2, a[1] - nv * wa / 2)]


def _end(root, angle: float, length: float):
    return root[0] + math.sin(angle) * length, root[1] + math.cos(angle) * length


@dataclasses.dataclass
class _Pose:
    """Joint positions in body units for one view."""

    head: tuple[float, float]
    r_head: float
    shoulder: float  # torso half-width at the shoulders
    hip: float  # torso half-width at the hips
    arms: list  # [(root, angle)], far (drawn first) to near
    legs: list  # [(root, angle, length)]


ARM_LEN, LEG_LEN, SHOULDER_V, HIP_V = 0.31, 0.44, 0.165, 0.5


def _pose(who: Identity, view: ViewParams) -> _Pose:
    s = math.sin(view.phase) * view.swing
    woman = who.gender == "woman"
    sw = (0.1 if woman else 0.118) * who.build
    hw = (0.09 if woman else 0.084) * who.build
    if view.facing == "side":  # limbs swing forward and back around one shoulder / hip joint
        sw, hw = 0.62 * sw, 0.75 * hw
        arms = [((0.0, 0.18), s), ((0.0, 0.18), -s)]
        legs = [((0.0, 0.48), -0.8 * s, LEG_LEN), ((0.0, 0.48), 0.8 * s, LEG_LEN)]
        head = (0.012, 0.075)
    else:  # seen from front or back: the swing shows as small angles and a lifted foot
        arms = [((-(sw - 0.012), 0.18), -0.1 + 0.25 * s), ((sw - 0.012, 0.18), 0.1 + 0.25 * s)]
        legs = [((-0.5 * hw, 0.48), -0.04 + 0.15 * s, LEG_LEN * (1 - 0.06 * max(0.0, math.sin(view.phase)))),
                ((0.5 * hw, 0.48), 0.04 + 0.15 * s, LEG_LEN * (1 - 0.06 * max(0.0, -math.sin(view.phase))))]
        head = (0.0, 0.075)
    return _Pose(head=head, r_head=0.058 if woman else 0.062, shoulder=sw, hip=hw, arms=arms, legs=legs)


def _palette(who: Identity) -> dict[str, RGB]:
    garment = 1 + who.shade
    return {"skin": SKIN_TONES[who.skin], "hair": HAIR_COLOURS[who.hair_colour],
            "upper": _shade(COLOURS[who.upper_colour], garment), "lower": _shade(COLOURS[who.lower_colour], garment),
            "pattern": COLOURS[who.pattern_colour], "shoes": COLOURS[who.shoes_colour],
            "logo": COLOURS[who.logo] if who.logo else None, "bag": COLOURS[who.bag_colour] if who.bag_type else None,
            "hat": COLOURS[who.hat_colour] if who.hat_type else None}


def _draw_person(p: _Painter, who: Identity, view: ViewParams):
    """Back to front: hood and hair behind the head, legs, lower garment, torso, arms, head, accessories."""
    pose, col = _pose(who, view), _palette(who)
    side = view.facing == "side"
    if who.upper_type == "hoodie":  # the hood frames the head; it counts as head
        p.ellipse(pose.head[0], pose.head[1] + 0.012, pose.r_head * 1.3, pose.r_head * 1.3, col["upper"], HEAD)
    if who.hair_length == "long" and view.facing != "back":
        u0 = -pose.r_head * 1.15
        p.rect(u0, pose.head[1], pose.r_head * (0.3 if side else 1.15), 0.25, col["hair"], HEAD)
    if side:  # the far arm hangs behind the body
        _arm(p, who, pose, pose.arms[0], col, far=True)
    if who.bag_type == "backpack" and side:
        p.rect(-pose.shoulder - 0.075, 0.19, -pose.shoulder + 0.01, 0.41, col["bag"], BACKGROUND, edge=True)
    _legs(p, who, pose, col)
    _torso(p, who, view, pose, col)
    for arm in pose.arms[1:] if side else pose.arms:
        _arm(p, who, pose, arm, col, far=False)
    _head(p, who, view, pose, col)
    _bag(p, who, view, pose, col)


def _legs(p: _Painter, who: Identity, pose: _Pose, col):
    """Legs (skin or trousers), shoes, then shorts / skirt / hip block; all count as legs."""
    covered = who.lower_type in ("trousers", "jeans")
    p.rect(-pose.hip, 0.46, pose.hip, 0.56, col["lower"], LEGS)
    for root, angle, length in pose.legs:
        p.poly(_limb(root, angle, length, 0.078, 0.058), col["lower"] if covered else col["skin"], LEGS)
        if who.lower_type == "jeans":  # a lighter seam down the leg
            p.poly(_limb(root, angle, length, 0.012, 0.01, 0.05, 0.95), _shade(col["lower"], 1.35), LEGS, False)
        if who.lower_type == "shorts":
            p.poly(_limb(root, angle, length, 0.088, 0.08, 0.0, 0.36), col["lower"], LEGS)
        _shoe(p, who, root, angle, length, col)
    if who.lower_type == "skirt":
        flare = 1.5 if len({r for r, _, _ in pose.legs}) > 1 else 1.7
        p.poly([(-pose.hip * 1.05, 0.46), (pose.hip * 1.05, 0.46), (pose.hip * flare, 0.71),
                (-pose.hip * flare, 0.71)], col["lower"], LEGS)


def _shoe(p: _Painter, who: Identity, root, angle: float, length: float, col):
    foot = _end(root, angle, length)
    if who.shoes_type == "boots":
        p.poly(_limb(root, angle, length, 0.078, 0.066, 0.76, 1.0), col["shoes"], LEGS)
    low = who.shoes_type == "loafers"
    ru, rv = (0.036, 0.016) if low else (0.042, 0.022)
    p.ellipse(foot[0] + 0.012, foot[1] + rv * 0.6, ru, rv, col["shoes"], LEGS)
    if who.shoes_type == "sneakers":  # white sole
        p.rect(foot[0] + 0.012 - ru, foot[1] + rv * 1.1, foot[0] + 0.012 + ru, foot[1] + rv * 1.6,
               COLOURS["white"], LEGS)


def _torso(p: _Painter, who: Identity, view: ViewParams, pose: _Pose, col):
    """Torso trapezoid (longer for a coat), pattern, and the garment's telltale details."""
    sw, hw = pose.shoulder, pose.hip
    bottom, hb = (0.66, hw * 1.25) if who.upper_type == "coat" else (HIP_V, hw)
    p.rect(-0.022, 0.115, 0.022, SHOULDER_V + 0.01, col["skin"], HEAD)  # neck
    p.poly([(-sw, SHOULDER_V), (sw, SHOULDER_V), (hb, bottom), (-hb, bottom)], col["upper"], UPPER)
    for u in (-sw + 0.03, sw - 0.03):  # rounded shoulders
        p.ellipse(u, SHOULDER_V + 0.025, 0.032, 0.028, col["upper"], UPPER, edge=False)
    half = lambda v: sw + (hb - sw) * (v - SHOULDER_V) / (bottom - SHOULDER_V)  # noqa: E731
    if who.pattern != "plain":
        period, thick = (0.065, 0.02) if who.pattern == "striped" else (0.06, 0.009)
        for v in np.arange(SHOULDER_V + 0.04, bottom - thick, period):
            p.poly([(-half(v), v), (half(v), v), (half(v + thick), v + thick), (-half(v + thick), v + thick)],
                   col["pattern"], UPPER, edge=False)
        if who.pattern == "checked":
            for u in np.arange(-min(sw, hb) + 0.02, min(sw, hb) - 0.01, period):
                p.rect(u, SHOULDER_V + 0.01, u + thick, bottom, col["pattern"], UPPER)
    if view.facing == "front":
        _front_details(p, who, pose, bottom, col)


def _front_details(p: _Painter, who: Identity, pose: _Pose, bottom: float, col):
    dark = _shade(col["upper"], 0.65)
    kind = who.upper_type
    if kind == "jacket":  # open front over an inner shirt
        p.rect(-0.024, SHOULDER_V, 0.024, bottom, col["pattern"], UPPER)
    elif kind == "shirt":  # collar and buttons
        for s in (-1, 1):
            p.poly([(0, SHOULDER_V + 0.03), (s * 0.035, SHOULDER_V - 0.005), (s * 0.01, SHOULDER_V - 0.005)],
                   _shade(col["upper"], 1.3), UPPER, edge=False)
    elif kind == "sweater":  # ribbed hem
        p.rect(-pose.hip, bottom - 0.03, pose.hip, bottom, dark, UPPER)
    elif kind == "hoodie":  # front pocket
        p.poly([(-0.05, bottom - 0.1), (0.05, bottom - 0.1), (0.065, bottom - 0.02), (-0.065, bottom - 0.02)],
               dark, UPPER)
    if kind in ("shirt", "coat"):
        for v in np.arange(SHOULDER_V + 0.05, bottom - 0.02, 0.07):
            p.ellipse(0.0, v, 0.007, 0.007, dark, UPPER, edge=False)
    if who.logo:
        p.rect(0.015, 0.215, 0.065, 0.262, col["logo"], UPPER, edge=True)


def _arm(p: _Painter, who: Identity, pose: _Pose, arm, col, far: bool):
    """Sleeve (long, or short over a bare arm) and hand; the far arm of a side view is drawn darker."""
    root, angle = arm
    shade = 0.75 if far else 1.0
    garment, skin = _shade(col["upper"], shade), _shade(col["skin"], shade)
    short = who.upper_type == "t-shirt"
    p.poly(_limb(root, angle, ARM_LEN, 0.056, 0.044), skin if short else garment, UPPER)
    if short:
        p.poly(_limb(root, angle, ARM_LEN, 0.064, 0.058, 0.0, 0.38), garment, UPPER)
    hand = _end(root, angle, ARM_LEN + 0.02)
    p.ellipse(hand[0], hand[1], 0.026, 0.026, skin, UPPER)


def _head(p: _Painter, who: Identity, view: ViewParams, pose: _Pose, col):
    """Face or back of the head, hair, hat; long hair falls over the back in a back view."""
    (u, v), r = pose.head, pose.r_head
    back, side = view.facing == "back", view.facing == "side"
    p.ellipse(u, v, r, r, col["skin"], HEAD)
    if back:
        p.chord(u, v, r * 1.04, 150, 30, col["hair"], HEAD)
        if who.hair_length == "long":
            p.rect(-r * 1.15, v, r * 1.15, 0.3, col["hair"], HEAD)
    elif side:
        p.chord(u, v, r * 1.06, 120, 300, col["hair"], HEAD)  # the back half, diagonally
        p.ellipse(u + r * 0.55, v + 0.004, 0.007, 0.007, (40, 30, 30), HEAD, edge=False)
    else:
        p.chord(u, v - 0.008, r * 1.06, 180, 360, col["hair"], HEAD)
        for s in (-1, 1):
            p.ellipse(u + s * r * 0.38, v + 0.008, 0.007, 0.007, (40, 30, 30), HEAD, edge=False)
    if who.hat_type == "cap":
        p.chord(u, v - 0.012, r * 1.1, 180, 360, col["hat"], HEAD)
        if side:
            p.rect(u, v - 0.03, u + r * 1.9, v - 0.015, _shade(col["hat"], 0.8), HEAD)
        elif not back:
            p.ellipse(u, v - 0.015, r * 1.2, 0.012, _shade(col["hat"], 0.8), HEAD)
    elif who.hat_type == "beanie":
        p.chord(u, v - 0.004, r * 1.12, 170, 10, col["hat"], HEAD)
        p.rect(u - r * 1.1, v - 0.012, u + r * 1.1, v - 0.002, _shade(col["hat"], 0.75), HEAD)


def _bag(p: _Painter, who: Identity, view: ViewParams, pose: _Pose, col):
    """Backpack (straps in front, the pack from behind) or a bag hanging from the hand on the bag's side."""
    if who.bag_type is None:
        return
    if who.bag_type == "backpack":
        if view.facing == "front":
            for s in (-1, 1):
                p.poly(_limb((s * pose.shoulder * 0.55, SHOULDER_V), s * 0.05, 0.2, 0.024, 0.02), col["bag"],
                       BACKGROUND, edge=False)
        elif view.facing == "back":
            p.rect(-0.07, 0.2, 0.07, 0.39, col["bag"], BACKGROUND, edge=True)
            p.rect(-0.07, 0.2, 0.07, 0.245, _shade(col["bag"], 0.75), BACKGROUND, edge=True)
        return
    # the person's right hand is on the image left when seen from the front
    arm = pose.arms[-1] if view.facing == "side" else pose.arms[
        int((who.bag_side == "right") == (view.facing == "back"))]
    hu, hv = _end(arm[0], arm[1], ARM_LEN + 0.02)
    wu, hh = (0.036, 0.07) if who.bag_type == "handbag" else (0.05, 0.065)
    p.rect(hu - 0.004, hv, hu + 0.004, hv + 0.02, _shade(col["bag"], 0.6), BACKGROUND)  # handle
    p.rect(hu - wu, hv + 0.015, hu + wu, hv + 0.015 + hh, col["bag"], BACKGROUND, edge=True)
