"""The generated fashion benchmark: simplified garments whose attributes live in different regions.

The real fine-grained benchmarks (FashionAI, DeepFashion) cannot be downloaded here, so this
generator builds a data set on which attribute-specific similarity is *necessary*:

- seven attributes, drawn independently, each tied to a region: ``sleeve_length`` (arms),
  ``neckline`` and ``collar`` (both at the neck: same place, different features, so channel
  attention matters), ``hem_length`` (bottom), ``pocket`` (torso), and the global ``colour`` and
  ``pattern``;
- strong nuisance that a global embedding latches onto: random background colour and clutter,
  position, scale, small rotation, lighting (brightness, gradient, colour cast) and sensor noise;
- some attributes are sometimes hidden, and then labelled with the schema's ``not_visible`` value:
  the hem cut off by the bottom of the frame, an object over the pockets, or over the neck.
  A hidden attribute's region really is hidden: changing its value changes no pixel.

Every item is a pure function of ``(seed, index)``: all random numbers are drawn in a fixed order
from the item's own generator *before* anything depends on the labels, so the same seed gives the
same bytes whatever the worker count, and :func:`_render` can re-render an item with one attribute
changed and everything else identical (the tests use that to check labels and boxes).

Geometry is defined in garment-local units (``W`` = one torso width, origin at the centre of the
neck edge, y pointing down) and mapped to pixels by a scale, a rotation and a translation.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from .catalog import write_catalog
from .errors import FgpluginError
from .progress import OnProgress, report
from .schema import Attribute, AttributeSchema
from .splits import make_splits

NOT_VISIBLE = "not_visible"
SUPERSAMPLE = 2  # draw at 2x and downscale: anti-aliased edges at no extra code
JPEG_QUALITY = 90

# -- the attributes --------------------------------------------------------------------------------
SLEEVE_LENGTH = {"sleeveless": 0.0, "short": 0.24, "elbow": 0.47, "long": 0.70}  # along the arm, in W
NECKLINES = ("round", "v_neck", "square", "boat")
COLLARS = ("none", "pointed", "rounded", "stand")
HEM_LENGTH = {"hip": 1.00, "thigh": 1.22, "knee": 1.44, "calf": 1.66}  # hem line y, in W
POCKETS = ("none", "patch", "flap", "kangaroo")
COLOURS = {
    "red": (200, 30, 40), "orange": (240, 125, 20), "yellow": (240, 210, 45), "green": (35, 145, 60),
    "blue": (35, 70, 195), "purple": (125, 50, 165), "pink": (245, 135, 185), "black": (32, 32, 36),
    "white": (238, 238, 232),
}
PATTERNS = ("solid", "stripes", "checks", "dots", "floral")
BRANDS = ("Aurora", "Brightline", "Cobalt & Co", "Dunmore", "Elmwood", "Fjord", "Gable", "Harbor")
CATEGORIES = ("casual", "formal", "sport", "outdoor", "lounge")

# How often an attribute is hidden (the event is cancelled when the geometry does not allow it).
P_HEM_CROP = 0.12
P_POCKET_OCCLUDER = 0.10
P_NECK_OCCLUDER = 0.06

# -- fixed garment geometry (garment-local units) -------------------------------------------------
NECK_EDGE = 0.30  # the torso's top edge is flat between x = -0.30 and 0.30 (y = 0)
SHOULDER = (0.48, 0.06)
ARMPIT = (0.46, 0.36)
WAIST = (0.42, 0.75)
FLARE = 0.36  # skirt half-width grows by this much per unit below the waist
HEM_BAND = 0.06
NECK_ZONE = (-0.47, -0.13, 0.47, 0.39)  # holds every neckline x collar combination
POCKET_ZONE = (-0.40, 0.47, 0.40, 0.76)  # holds every pocket style
MAX_ROTATION_DEG = 6.0
SCALE_RANGE = (0.33, 0.41)  # W as a fraction of the image side
SLEEVE_ANGLE_DEG = (55.0, 62.0)  # sleeves point down and out (a flat lay), angle from vertical

REGIONS = {
    "sleeve_length": "arms", "neckline": "neck", "collar": "neck", "hem_length": "bottom",
    "pocket": "torso", "colour": "global", "pattern": "global",
}


def synth_schema() -> AttributeSchema:
    """The generated benchmark's schema (also written to ``schema.toml`` by :func:`generate`)."""

    def attr(name: str, values, description: str, hidden: bool) -> Attribute:
        vals = tuple(values) + ((NOT_VISIBLE,) if hidden else ())
        return Attribute(name, vals, description, NOT_VISIBLE if hidden else None, REGIONS[name])

    return AttributeSchema(
        attributes=(
            attr("sleeve_length", SLEEVE_LENGTH, "How far the sleeves reach down the arms", False),
            attr("neckline", NECKLINES, "Shape of the neck opening", True),
            attr("collar", COLLARS, "Collar type around the neck opening", True),
            attr("hem_length", HEM_LENGTH, "Where the hem ends (hidden when cut off by the frame)", True),
            attr("pocket", POCKETS, "Pockets on the lower torso (hidden when something covers them)", True),
            attr("colour", COLOURS, "Main fabric colour", False),
            attr("pattern", PATTERNS, "Fabric pattern", False),
        ),
        name="fgplugin-synth",
        metadata={"brand": "keyword", "category": "keyword", "price": "float", "in_stock": "boolean",
                  "added": "date"},
    )


_SCHEMA = synth_schema()
_VISIBLE = {a.name: a.visible_values for a in _SCHEMA}

Box = tuple[float, float, float, float]


@dataclass
class SynthItem:
    image: Image.Image
    labels: dict[str, str]  # attribute -> value (the not_visible value when hidden)
    boxes: dict[str, Box | None]  # attribute -> [x0, y0, x1, y1] in image pixels; None when hidden
    metadata: dict[str, Any]
    index: int = 0
    id: str = ""


@dataclass
class _Geometry:
    """What the tests need beyond the item: the true (possibly hidden) values and the hiders."""

    true_labels: dict[str, str]
    occluders: list[Box] = field(default_factory=list)  # pixel rectangles drawn over the garment
    hem_cropped: bool = False


def item_id(index: int) -> str:
    return f"syn{index:06d}"


# -- small geometry helpers ------------------------------------------------------------------------
class _Frame:
    """Garment-local units -> image pixels: p = centre + W * R(theta) @ (x, y)."""

    def __init__(self, w: float, theta: float, cx: float, cy: float):
        self.w, self.cx, self.cy = w, cx, cy
        self.c, self.s = math.cos(theta), math.sin(theta)

    def rel(self, x: float, y: float) -> tuple[float, float]:
        return (self.w * (self.c * x - self.s * y), self.w * (self.s * x + self.c * y))

    def px(self, x: float, y: float) -> tuple[float, float]:
        dx, dy = self.rel(x, y)
        return (self.cx + dx, self.cy + dy)

    def pts(self, points, ss: int = 1) -> list[tuple[float, float]]:
        return [(ss * p[0], ss * p[1]) for p in (self.px(x, y) for x, y in points)]

    def bbox(self, points) -> Box:
        xy = np.array([self.px(x, y) for x, y in points])
        return (float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max()))


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _ellipse(cx, cy, rx, ry, t0=0.0, t1=2 * math.pi, n=28):
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in np.linspace(t0, t1, n)]


def _mirror(points):
    return [(-x, y) for x, y in points]


def _toward(c, target, k: float) -> tuple[int, int, int]:
    return tuple(int(round(a + (b - a) * k)) for a, b in zip(c, target))  # type: ignore[return-value]


def _contrast(c, k: float) -> tuple[int, int, int]:
    """A shade that stands out from c: lighter for dark colours, darker for light ones."""
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return _toward(c, (255, 255, 255) if lum < 110 else (0, 0, 0), k)


# -- garment parts (garment-local polygons) --------------------------------------------------------
def _torso(hem: str) -> list[tuple[float, float]]:
    y = HEM_LENGTH[hem]
    hw = WAIST[0] + FLARE * (y - WAIST[1])
    right = [(NECK_EDGE, 0.0), SHOULDER, ARMPIT, WAIST, (hw, y)]
    return _mirror(right[::-1]) + right


def _hem_band(hem: str) -> list[tuple[float, float]]:
    y = HEM_LENGTH[hem]
    y0 = y - HEM_BAND
    hw, hw0 = WAIST[0] + FLARE * (y - WAIST[1]), WAIST[0] + FLARE * (y0 - WAIST[1])
    return [(-hw0, y0), (hw0, y0), (hw, y), (-hw, y)]


def _sleeve(length: float, angle: float, side: int) -> tuple[list, list]:
    """(sleeve polygon, cuff polygon) for one side; empty for sleeveless."""
    if length <= 0:
        return [], []
    d = (side * math.sin(angle), math.cos(angle))
    s0, a0 = (side * SHOULDER[0], SHOULDER[1]), (side * ARMPIT[0], ARMPIT[1])
    # Taper: the end is 85% as wide as the start.
    mid = ((s0[0] + a0[0]) / 2, (s0[1] + a0[1]) / 2)

    def at(p, t, taper):
        q = (p[0] + t * d[0], p[1] + t * d[1])
        m = (mid[0] + t * d[0], mid[1] + t * d[1])
        return (m[0] + (q[0] - m[0]) * taper, m[1] + (q[1] - m[1]) * taper)

    taper_end = 0.85
    inner = (side * 0.25, 0.22)  # tucked under the torso so the sleeve joins it cleanly
    poly = [inner, s0, at(s0, length, taper_end), at(a0, length, taper_end), a0]
    c = max(0.0, length - 0.06)
    tc = 1 - (1 - taper_end) * c / length
    cuff = [at(s0, c, tc), at(s0, length, taper_end), at(a0, length, taper_end), at(a0, c, tc)]
    return poly, cuff


def _armhole(side: int) -> list[tuple[float, float]]:
    """Where a sleeve would start: the evidence region for 'sleeveless'."""
    return [(side * SHOULDER[0], SHOULDER[1]), (side * (SHOULDER[0] + 0.18), SHOULDER[1] + 0.04),
            (side * (ARMPIT[0] + 0.18), ARMPIT[1]), (side * ARMPIT[0], ARMPIT[1])]


def _neck_cut(neckline: str) -> tuple[list, float]:
    """(cut polygon, half-width of the opening)."""
    if neckline == "round":
        return _ellipse(0, -0.01, 0.19, 0.20, 0, math.pi), 0.19
    if neckline == "v_neck":
        return [(-0.19, -0.01), (0.19, -0.01), (0.0, 0.35)], 0.19
    if neckline == "square":
        return _rect(-0.17, -0.01, 0.17, 0.20), 0.17
    if neckline == "boat":
        return _ellipse(0, -0.01, 0.28, 0.08, 0, math.pi), 0.28
    raise FgpluginError(f"unknown neckline {neckline!r}")


def _collar(collar: str, hw: float) -> list[list[tuple[float, float]]]:
    if collar == "none":
        return []
    if collar == "pointed":
        right = [(hw - 0.01, -0.015), (hw + 0.15, -0.035), (hw + 0.03, 0.27)]
        return [right, _mirror(right)]
    if collar == "rounded":
        right = _ellipse(hw + 0.07, 0.03, 0.085, 0.11)
        return [right, _mirror(right)]
    if collar == "stand":
        return [[(-hw - 0.02, 0.01), (-hw - 0.01, -0.09), (hw + 0.01, -0.09), (hw + 0.02, 0.01)]]
    raise FgpluginError(f"unknown collar {collar!r}")


def _pockets(pocket: str) -> list[tuple[list, str]]:
    """(polygon, role) pairs; role picks the colour: 'fill', 'flap' or 'slit'."""
    if pocket == "none":
        return []
    if pocket in ("patch", "flap"):
        out = []
        for s in (1, -1):
            out.append((_rect(s * 0.09, 0.51, s * 0.33, 0.73), "fill"))
            if pocket == "flap":
                flap = [(s * 0.08, 0.50), (s * 0.34, 0.50), (s * 0.34, 0.60), (s * 0.21, 0.66), (s * 0.08, 0.60)]
                out.append((flap, "flap"))
        return out
    if pocket == "kangaroo":
        body = [(-0.22, 0.52), (0.22, 0.52), (0.35, 0.63), (0.35, 0.74), (-0.35, 0.74), (-0.35, 0.63)]
        slits = [[(0.22, 0.52), (0.35, 0.63), (0.32, 0.65), (0.19, 0.54)],
                 [(-0.22, 0.52), (-0.35, 0.63), (-0.32, 0.65), (-0.19, 0.54)]]
        return [(body, "fill")] + [(s, "slit") for s in slits]
    raise FgpluginError(f"unknown pocket {pocket!r}")


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - np.float32(0.5)
    return yy, xx


def _paste(canvas: Image.Image, src: Image.Image | tuple, mask: Image.Image) -> None:
    """canvas.paste limited to the mask's bounding box (most of the canvas is background)."""
    bb = mask.getbbox()
    if bb is None:
        return
    piece = src.crop(bb) if isinstance(src, Image.Image) else src
    canvas.paste(piece, bb, mask.crop(bb))


def _inside(p: tuple[float, float], box: Box) -> bool:
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def _clip_box(b: Box, size: int) -> Box:
    return tuple(round(float(min(max(v, 0.0), size)), 1) for v in b)  # type: ignore[return-value]


# -- rendering ---------------------------------------------------------------------------------------
@dataclass
class _Layout:
    """Where the garment lies and what hides parts of it: drawn whatever the labels are."""

    w: float  # one garment width W, in output pixels
    sleeve_angle: float
    frame: _Frame
    hem_cropped: bool
    pocket_occluded: bool
    pocket_occluder_params: np.ndarray
    neck_occluded: bool
    neck_occluder_params: np.ndarray


@dataclass
class _Look:
    """Colours, pattern, clutter, lighting and noise: drawn whatever the labels are (only ``base``
    starts from the colour label, and its jitter is drawn all the same)."""

    base: tuple[int, int, int]
    bg: tuple[int, int, int]
    bg2: tuple[int, int, int]
    bg_mix: float
    phase: np.ndarray
    flower_jitter: np.ndarray
    centre_colour: tuple[int, int, int]
    n_clutter: int
    clutter: np.ndarray
    brightness: float
    grad_angle: float
    grad_amp: float
    cast: np.ndarray
    noise_sigma: float
    noise: np.ndarray
    occluder_colours: np.ndarray


@dataclass
class _Pen:
    """The supersampled canvas and what every garment part is drawn with."""

    canvas: Image.Image
    draw: ImageDraw.ImageDraw
    frame: _Frame
    w: float  # one garment width W, in output pixels
    base: tuple[int, int, int]
    line_w: int
    outline: tuple[int, int, int]
    ss: int = SUPERSAMPLE

    @classmethod
    def new(cls, size: int, layout: _Layout, look: _Look) -> "_Pen":
        S = size * SUPERSAMPLE
        canvas = Image.new("RGB", (S, S), look.bg)
        line_w = max(1, int(round(0.025 * layout.w * SUPERSAMPLE)))
        return cls(canvas, ImageDraw.Draw(canvas), layout.frame, layout.w, look.base, line_w,
                   _contrast(look.base, 0.75))

    @property
    def side(self) -> int:
        return self.canvas.size[0]

    def pts(self, points) -> list[tuple[float, float]]:
        return self.frame.pts(points, self.ss)


def render_item(index: int, seed: int, size: int = 224) -> SynthItem:
    """Render item ``index`` of the data set with ``seed``: a pure function of (seed, index, size)."""
    return _render(index, seed, size)[0]


def _render(index: int, seed: int, size: int = 224, overrides: dict[str, str] | None = None) -> tuple[SynthItem, _Geometry]:
    """Render one item; ``overrides`` replaces drawn attribute values (everything else unchanged).

    Every random number is drawn first, in a fixed order (labels, metadata, layout, look); only the
    drawing that follows depends on the labels."""
    if size < 64:
        raise FgpluginError(f"image size {size} is too small (at least 64 px)")
    if index < 0 or seed < 0:
        raise FgpluginError(f"index and seed must be non-negative (got index {index}, seed {seed})")
    rng = np.random.default_rng([seed, index])
    true = _draw_labels(rng, overrides)
    metadata = _draw_metadata(rng)
    layout = _draw_layout(rng, index, size)
    look = _draw_look(rng, true["colour"], size)

    pen = _Pen.new(size, layout, look)
    _paint_background(pen, look)
    fabric = _paint_fabric(pen, look, true["pattern"])
    # Sleeves (behind the torso), then the torso, each cut out of the fabric with a mask.
    sleeves = [_sleeve(SLEEVE_LENGTH[true["sleeve_length"]], layout.sleeve_angle, s) for s in (1, -1)]
    if true["sleeve_length"] != "sleeveless":
        _paint_sleeves(pen, fabric, sleeves)
    _paint_torso(pen, fabric, true["hem_length"])
    if true["sleeve_length"] == "sleeveless":
        _paint_bound_armholes(pen)
    _paint_neck(pen, true["neckline"], true["collar"])
    _paint_pockets(pen, true["pocket"])
    occluders = _paint_occluders(pen, layout, look.occluder_colours)
    image = _light(pen.canvas.reduce(pen.ss), look, size)

    labels, boxes = _labels_and_boxes(true, sleeves, layout.frame, occluders, size, f"item {index} (seed {seed})")
    item = SynthItem(image, labels, boxes, metadata, index, item_id(index))
    return item, _Geometry(true, occluders, layout.hem_cropped)


# -- the random draws, in their fixed order --------------------------------------------------------
def _draw_labels(rng: np.random.Generator, overrides: dict[str, str] | None) -> dict[str, str]:
    """Independent, uniform over each attribute's visible values; ``overrides`` replace draws."""
    true = {a: vals[int(rng.integers(len(vals)))] for a, vals in _VISIBLE.items()}
    for k, v in (overrides or {}).items():
        if k not in _VISIBLE or v not in _VISIBLE[k]:
            raise FgpluginError(f"override {k}={v!r} is not a visible value of the synthetic schema")
        true[k] = v
    return true


def _draw_metadata(rng: np.random.Generator) -> dict[str, Any]:
    day = int(rng.integers(0, 730))
    return {
        "brand": BRANDS[int(rng.integers(len(BRANDS)))],
        "category": CATEGORIES[int(rng.integers(len(CATEGORIES)))],
        "price": round(float(np.clip(rng.lognormal(3.6, 0.5), 5.0, 500.0)), 2),
        "in_stock": bool(rng.random() < 0.8),
        "added": (np.datetime64("2024-01-01") + np.timedelta64(day, "D")).astype(str),
    }


def _draw_layout(rng: np.random.Generator, index: int, size: int) -> _Layout:
    """Scale, rotation, position and the hiding events: every number drawn whatever the labels are."""
    w = size * rng.uniform(*SCALE_RANGE)
    theta = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    sleeve_angle = math.radians(rng.uniform(*SLEEVE_ANGLE_DEG))
    u_x, u_y = rng.random(), rng.random()
    crop_event, crop_u = rng.random() < P_HEM_CROP, rng.random()
    pocket_occ, pocket_occ_params = rng.random() < P_POCKET_OCCLUDER, rng.random(6)
    neck_occ, neck_occ_params = rng.random() < P_NECK_OCCLUDER, rng.random(6)

    # Extents over *all* values, so the placement does not depend on the labels.
    long_sleeves = [p for s in (1, -1) for p in _sleeve(SLEEVE_LENGTH["long"], sleeve_angle, s)[0]]
    f0 = _Frame(w, theta, 0.0, 0.0)
    cx, cy = _place(f0, long_sleeves, u_x, u_y, index, size)
    hem_cropped = False
    if crop_event:
        bottom_rel = _hem_crop_bottom(f0, long_sleeves, crop_u)
        if bottom_rel is not None:
            cy = size - bottom_rel
            hem_cropped = True
    return _Layout(w, sleeve_angle, _Frame(w, theta, cx, cy), hem_cropped, pocket_occ, pocket_occ_params,
                   neck_occ, neck_occ_params)


def _place(f0: _Frame, long_sleeves: list, u_x: float, u_y: float, index: int, size: int) -> tuple[float, float]:
    """The garment's centre in pixels: uniform over the positions that keep every value in frame."""
    extents = long_sleeves + _torso("calf") + _rect(*NECK_ZONE)
    rel = np.array([f0.rel(x, y) for x, y in extents])
    margin = 0.03 * size
    lo, hi = margin - rel.min(0), size - margin - rel.max(0)
    if np.any(hi < lo):  # cannot happen with SCALE_RANGE, but never place out of frame silently
        raise FgpluginError(f"item {index}: garment does not fit a {size}px frame")
    return lo[0] + u_x * (hi[0] - lo[0]), lo[1] + u_y * (hi[1] - lo[1])


def _hem_crop_bottom(f0: _Frame, long_sleeves: list, crop_u: float) -> float | None:
    """Where the frame's bottom edge falls (relative to the centre) to cut off every hem, or None
    when the geometry does not allow it."""
    # The frame's bottom edge must pass below every sleeve end and the pockets (they stay visible)
    # and above the shortest hem (so no hem value is visible): both are value-independent.
    keep = long_sleeves + _rect(*POCKET_ZONE)
    top_of_hem = _hem_band("hip")[:2]
    keep_y = max(f0.rel(x, y)[1] for x, y in keep) + 2
    hem_y = min(f0.rel(x, y)[1] for x, y in top_of_hem) - 2
    if hem_y > keep_y:
        return keep_y + crop_u * (hem_y - keep_y)
    return None


def _draw_look(rng: np.random.Generator, colour: str, size: int) -> _Look:
    # Colours.
    base = np.array(COLOURS[colour], dtype=float)
    base = tuple(int(v) for v in np.clip(base + rng.uniform(-14, 14, 3), 0, 255))
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    bg2 = tuple(int(v) for v in rng.integers(0, 256, 3))
    bg_mix = rng.uniform(0.0, 0.6)
    # Pattern parameters (drawn whatever the pattern is).
    phase = rng.random(2)
    flower_jitter = rng.uniform(-0.06, 0.06, (12, 12, 2))
    centre_colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    # Background clutter.
    n_clutter = int(rng.integers(4, 13))
    clutter = rng.random((12, 8))
    # Lighting and noise.
    brightness = rng.uniform(0.72, 1.22)
    grad_angle, grad_amp = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.3)
    cast = rng.uniform(0.9, 1.1, 3)
    noise_sigma = rng.uniform(2.0, 9.0)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)
    occluder_colours = rng.integers(0, 256, (2, 2, 3))
    return _Look(base, bg, bg2, bg_mix, phase, flower_jitter, centre_colour, n_clutter, clutter,  # type: ignore[arg-type]
                 brightness, grad_angle, grad_amp, cast, noise_sigma, noise, occluder_colours)


# -- painting at SUPERSAMPLE x ---------------------------------------------------------------------
def _paint_background(pen: _Pen, look: _Look) -> None:
    """A two-colour gradient band, then clutter (always behind the garment)."""
    S, draw = pen.side, pen.draw
    if look.bg_mix > 0.05:
        for i in range(8):
            c = _toward(look.bg, look.bg2, look.bg_mix * i / 7)
            draw.rectangle([0, i * S // 8, S, (i + 1) * S // 8], fill=c)
    for k in range(look.n_clutter):
        t, x, y, a, b, r, g, bl = look.clutter[k]
        col = (int(r * 255), int(g * 255), int(bl * 255))
        x0, y0 = x * S, y * S
        x1, y1 = x0 + (0.05 + 0.35 * a) * S, y0 + (0.05 + 0.35 * b) * S
        if t < 0.35:
            draw.rectangle([x0, y0, x1, y1], fill=col)
        elif t < 0.65:
            draw.ellipse([x0, y0, x1, y1], fill=col)
        elif t < 0.85:
            draw.line([x0, y0, x1, y1], fill=col, width=max(1, int((0.01 + 0.03 * a) * S)))
        else:  # a striped block: background texture that is not the garment's pattern
            step = max(4, int((0.02 + 0.03 * b) * S))
            for yy in range(int(y0), int(y1), 2 * step):
                draw.rectangle([x0, yy, x1, yy + step], fill=col)


def _paint_fabric(pen: _Pen, look: _Look, pattern: str) -> Image.Image:
    """The fabric: base colour plus the pattern, in garment coordinates (it turns with the garment)."""
    S, w, ss = pen.side, pen.w, pen.ss
    pattern_colour = _contrast(pen.base, 0.4)  # quieter than the parts' details
    phase, flower_jitter = look.phase, look.flower_jitter
    fabric = Image.new("RGB", (S, S), pen.base)
    fd = ImageDraw.Draw(fabric)
    x_lo, x_hi, y_lo, y_hi = -1.25, 1.25, -0.2, 1.8
    if pattern in ("stripes", "checks"):
        period, thick = (0.20, 0.07) if pattern == "stripes" else (0.24, 0.06)
        for y in np.arange(y_lo + phase[0] * period, y_hi, period):
            fd.polygon(pen.pts(_rect(x_lo, y, x_hi, y + thick)), fill=pattern_colour)
        if pattern == "checks":
            for x in np.arange(x_lo + phase[1] * period, x_hi, period):
                fd.polygon(pen.pts(_rect(x, y_lo, x + thick, y_hi)), fill=pattern_colour)
    elif pattern == "dots":
        period, r = 0.2, 0.05 * w * ss
        for i, y in enumerate(np.arange(y_lo + phase[0] * period, y_hi, period)):
            for x in np.arange(x_lo + (phase[1] + 0.5 * (i % 2)) * period, x_hi, period):
                px, py = pen.pts([(x, y)])[0]
                fd.ellipse([px - r, py - r, px + r, py + r], fill=pattern_colour)
    elif pattern == "floral":
        period, pr = 0.3, 0.042 * w * ss
        for i, y in enumerate(np.arange(y_lo + phase[0] * period, y_hi, period)):
            for j, x in enumerate(np.arange(x_lo + phase[1] * period, x_hi, period)):
                jx, jy = flower_jitter[i % 12, j % 12]
                for t in range(5):
                    a = 2 * math.pi * t / 5
                    px, py = pen.pts([(x + jx + 0.055 * math.cos(a), y + jy + 0.055 * math.sin(a))])[0]
                    fd.ellipse([px - pr, py - pr, px + pr, py + pr], fill=pattern_colour)
                px, py = pen.pts([(x + jx, y + jy)])[0]
                fd.ellipse([px - 0.7 * pr, py - 0.7 * pr, px + 0.7 * pr, py + 0.7 * pr], fill=look.centre_colour)
    return fabric


def _paint_sleeves(pen: _Pen, fabric: Image.Image, sleeves: list[tuple[list, list]]) -> None:
    mask = Image.new("L", (pen.side, pen.side), 0)
    md = ImageDraw.Draw(mask)
    for poly, _ in sleeves:
        md.polygon(pen.pts(poly), fill=255)
    _paste(pen.canvas, fabric, mask)
    for poly, cuff in sleeves:
        pen.draw.polygon(pen.pts(cuff), fill=_contrast(pen.base, 0.55))
        pen.draw.polygon(pen.pts(poly), outline=pen.outline, width=pen.line_w)


def _paint_torso(pen: _Pen, fabric: Image.Image, hem: str) -> None:
    # The torso is the longest (calf) shape cut at the hem line, so its sides rasterise the same
    # whatever the hem length: a hem cut off by the frame then changes no visible pixel.
    S = pen.side
    longest = pen.pts(_torso("calf"))
    above_hem = Image.new("L", (S, S), 0)
    ImageDraw.Draw(above_hem).polygon(pen.pts(_rect(-3, -1, 3, HEM_LENGTH[hem])), fill=255)
    mask = Image.new("L", (S, S), 0)
    ImageDraw.Draw(mask).polygon(longest, fill=255)
    _paste(pen.canvas, fabric, ImageChops.darker(mask, above_hem))
    mask = Image.new("L", (S, S), 0)
    ImageDraw.Draw(mask).polygon(longest, outline=255, width=pen.line_w)
    _paste(pen.canvas, pen.outline, ImageChops.darker(mask, above_hem))
    pen.draw.polygon(pen.pts(_hem_band(hem)), fill=_contrast(pen.base, 0.55), outline=pen.outline,
                     width=pen.line_w)


def _paint_bound_armholes(pen: _Pen) -> None:
    """A sleeveless garment's bound armholes: positive evidence of no sleeve."""
    for s in (1, -1):
        pen.draw.line(pen.pts([(s * SHOULDER[0], SHOULDER[1]), (s * ARMPIT[0], ARMPIT[1])]),
                      fill=_contrast(pen.base, 0.7), width=2 * pen.line_w)


def _paint_neck(pen: _Pen, neckline: str, collar: str) -> None:
    """The opening shows the dark (or light) inside of the back, then the collar around it."""
    cut, hw = _neck_cut(neckline)
    pen.draw.polygon(pen.pts(cut), fill=_contrast(pen.base, 0.9), outline=pen.outline, width=pen.line_w)
    for poly in _collar(collar, hw):
        pen.draw.polygon(pen.pts(poly), fill=_contrast(pen.base, 0.6), outline=pen.outline, width=pen.line_w)


def _paint_pockets(pen: _Pen, pocket: str) -> None:
    for poly, role in _pockets(pocket):
        fill = {"fill": _contrast(pen.base, 0.45), "flap": _contrast(pen.base, 0.8), "slit": pen.outline}[role]
        pen.draw.polygon(pen.pts(poly), fill=fill, outline=pen.outline, width=pen.line_w)
        if role == "flap":
            bx = sum(p[0] for p in poly[:2]) / 2
            px, py = pen.pts([(bx, 0.605)])[0]
            r = 0.03 * pen.w * pen.ss
            pen.draw.ellipse([px - r, py - r, px + r, py + r], fill=pen.outline)


def _paint_occluders(pen: _Pen, layout: _Layout, colours: np.ndarray) -> list[Box]:
    """An object over the pockets or the neck, covering that zone with a margin; returns their boxes."""
    occluders: list[Box] = []
    # The margin is small on the side facing the other zone, so one object never touches both.
    for event, params, zone, cols, near in (
        (layout.pocket_occluded, layout.pocket_occluder_params, POCKET_ZONE, colours[0], 1),  # its top faces the neck
        (layout.neck_occluded, layout.neck_occluder_params, NECK_ZONE, colours[1], 3),  # its bottom faces the pockets
    ):
        if not event:
            continue
        ob = _occluder_box(pen, params, zone, near)
        occluders.append(ob)
        _paint_occluder(pen, ob, params, cols)
    return occluders


def _occluder_box(pen: _Pen, params: np.ndarray, zone: Box, near: int) -> Box:
    w = pen.w
    zb = pen.frame.bbox(_rect(*zone))
    m = w * (0.04 + 0.06 * params[:4])  # left, top, right, bottom
    m[near] = 0.015 * w
    if zone is NECK_ZONE:  # narrow at the sides: the armholes beside it stay in view
        m[[0, 2]] = w * (0.02 + 0.03 * params[[0, 2]])
    return (zb[0] - m[0], zb[1] - m[1], zb[2] + m[2], zb[3] + m[3])


def _paint_occluder(pen: _Pen, ob: Box, params: np.ndarray, cols: np.ndarray) -> None:
    ss, line_w = pen.ss, pen.line_w
    c1, c2 = tuple(int(v) for v in cols[0]), tuple(int(v) for v in cols[1])
    pen.draw.rounded_rectangle([v * ss for v in ob], radius=0.15 * pen.w * ss, fill=c1,
                               outline=c2, width=2 * line_w)
    # A strap or a label on it, so it looks like an object rather than a hole.
    ly = ob[1] + (0.2 + 0.6 * params[4]) * (ob[3] - ob[1])
    pen.draw.rectangle([ob[0] * ss + 3 * line_w, ly * ss, ob[2] * ss - 3 * line_w, ly * ss + 3 * line_w], fill=c2)


def _light(small: Image.Image, look: _Look, size: int) -> Image.Image:
    """Lighting and noise, identical for any labels (the noise field was drawn with the look)."""
    yy, xx = _grid(size)
    gain = np.float32(look.brightness) * (1 + np.float32(2 * look.grad_amp) * (
        xx * np.float32(math.cos(look.grad_angle)) + yy * np.float32(math.sin(look.grad_angle))))
    arr = np.asarray(small, dtype=np.float32)
    arr *= gain[..., None]
    arr *= look.cast.astype(np.float32)
    noise = look.noise
    noise *= np.float32(look.noise_sigma)
    arr += noise
    arr += np.float32(0.5)
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


# -- labels and boxes ------------------------------------------------------------------------------
def _visible(points, frame: _Frame, size: int, occluders: list[Box]) -> bool:
    for p in (frame.px(x, y) for x, y in points):
        if not (0 <= p[0] < size and 0 <= p[1] < size):
            return False
        if any(_inside(p, ob) for ob in occluders):
            return False
    return True


def _regions_and_evidence(true: dict[str, str], sleeves: list[tuple[list, list]]) -> tuple[dict, dict]:
    """Per attribute: the region its box covers, and the evidence: the points that must be in view for
    the label to be readable. Sleeves: their ends (or, without sleeves, the armholes' outer side).
    Colour and pattern: the garment is always seen."""
    sleeveless = true["sleeve_length"] == "sleeveless"
    sleeve_pts = _armhole(1) + _armhole(-1) if sleeveless else [p for poly, _ in sleeves for p in poly]
    cut, hw = _neck_cut(true["neckline"])
    cut_pts = cut + [p for poly in _collar(true["collar"], hw) for p in poly]
    neck_pts = _rect(*NECK_ZONE)
    hem_pts = _hem_band(true["hem_length"])
    pocket_pts = _rect(*POCKET_ZONE)
    pocket_drawn = [p for poly, _ in _pockets(true["pocket"]) for p in poly] or _rect(-0.3, 0.52, 0.3, 0.72)
    body = _torso(true["hem_length"]) + sleeve_pts + neck_pts
    hem_hw = WAIST[0] + FLARE * (HEM_LENGTH[true["hem_length"]] - WAIST[1])
    regions = {
        "sleeve_length": sleeve_pts,
        "neckline": neck_pts,
        "collar": neck_pts,
        "hem_length": _rect(-hem_hw - 0.03, WAIST[1] + 0.02, hem_hw + 0.03, HEM_LENGTH[true["hem_length"]] + 0.03),
        "pocket": pocket_pts,
        "colour": body,
        "pattern": body,
    }
    sleeve_ends = ([p for s in (1, -1) for p in _armhole(s)[1:3]] if sleeveless
                   else [p for poly, _ in sleeves for p in poly[2:4]])
    evidence = {"sleeve_length": sleeve_ends, "neckline": cut_pts, "collar": cut_pts,
                "hem_length": hem_pts, "pocket": pocket_drawn, "colour": [], "pattern": []}
    return regions, evidence


def _labels_and_boxes(true: dict[str, str], sleeves: list[tuple[list, list]], frame: _Frame, occluders: list[Box],
                      size: int, which: str) -> tuple[dict[str, str], dict[str, Box | None]]:
    """The labels (not_visible where the evidence is out of view) and the boxes (None when hidden)."""
    regions, evidence = _regions_and_evidence(true, sleeves)
    labels: dict[str, str] = {}
    boxes: dict[str, Box | None] = {}
    for a in _SCHEMA:
        if _visible(evidence[a.name], frame, size, occluders):
            labels[a.name] = true[a.name]
            boxes[a.name] = _clip_box(frame.bbox(regions[a.name]), size)
        else:
            if a.not_visible is None:  # the layout rules keep these in view; fail loudly if not
                raise FgpluginError(f"{which}: {a.name} is out of view")
            labels[a.name] = a.not_visible
            boxes[a.name] = None
    return labels, boxes


# -- writing a data set ------------------------------------------------------------------------------
def _render_and_save(index: int, *, seed: int, size: int, images_dir: str) -> tuple[int, dict, dict, dict]:
    item = render_item(index, seed, size)
    item.image.save(os.path.join(images_dir, f"{item.id}.jpg"), quality=JPEG_QUALITY)
    return index, item.labels, item.boxes, item.metadata


def generate(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    size: int = 224,
    workers: int | None = None,
    on_progress: OnProgress | None = None,
) -> Path:
    """Render ``n`` items into ``out_dir`` and return the catalog path.

    Writes ``images/<id>.jpg``, ``catalog.jsonl``, ``schema.toml``, ``boxes.jsonl`` (per id: attribute
    -> ground-truth box in image pixels, or null when hidden), ``splits.json`` (70/10/20, queries and
    candidates 1:4, fixed by ``seed``) and ``generator.json`` (the parameters). Same seed, same bytes,
    whatever ``workers`` is. ``on_progress`` gets a step per rendered item, the first (0 of ``n``)
    once the worker processes exist.
    """
    if n < 1:
        raise FgpluginError(f"n must be at least 1 (got {n})")
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    job = partial(_render_and_save, seed=seed, size=size, images_dir=str(images_dir))
    results = _render_all(job, n, workers or min(2, os.cpu_count() or 1), on_progress)
    return _write_dataset(out, results, seed=seed, size=size)


_Rendered = tuple[int, dict, dict, dict]  # what a worker sends back: (index, labels, boxes, metadata)


def _render_all(job: Callable[[int], _Rendered], n: int, workers: int,
                on_progress: OnProgress | None) -> list[_Rendered]:
    results: list[_Rendered | None] = [None] * n
    # Workers are forked where the platform can (Linux): no re-import of the caller's __main__, so
    # generate() works from any script or notebook. They render with numpy and PIL only (never
    # torch). The first progress step comes once the pool exists, so a display that starts on it
    # (the CLI's) does not run its refresh thread while the workers are forked.
    pool = None
    if workers > 1:
        methods = mp.get_all_start_methods()
        pool = mp.get_context("fork" if "fork" in methods else "spawn").Pool(workers)
    task = f"rendering {n} garments"
    try:
        report(on_progress, task, 0, n)
        if pool is None:
            stream = map(job, range(n))
        else:
            stream = pool.imap_unordered(job, range(n), chunksize=max(1, min(32, n // (8 * workers))))
        for done, res in enumerate(stream, start=1):
            results[res[0]] = res
            report(on_progress, task, done, n)
    finally:
        if pool:
            pool.terminate() if any(r is None for r in results) else pool.close()
            pool.join()
    return results  # type: ignore[return-value]  # every slot is filled once the stream ends


def _write_dataset(out: Path, results: list[_Rendered], *, seed: int, size: int) -> Path:
    """Everything but the images, from the rendered items' labels, boxes and metadata."""
    schema = synth_schema()
    schema.save(out / "schema.toml")
    rows, box_rows = [], []
    for index, labels, boxes, metadata in results:
        iid = item_id(index)
        rows.append({"id": iid, "image": f"images/{iid}.jpg", **labels, **metadata})
        box_rows.append({"id": iid, "boxes": {k: (list(v) if v is not None else None) for k, v in boxes.items()}})
    tmp = write_catalog(out / "catalog.jsonl.tmp", rows)
    with (out / "boxes.jsonl").open("w", encoding="utf-8") as f:
        for r in box_rows:
            f.write(json.dumps(r) + "\n")
    make_splits([r["id"] for r in rows], seed=seed).save(out / "splits.json")
    (out / "generator.json").write_text(json.dumps(
        {"generator": "fgplugin.synth", "n": len(results), "seed": seed, "size": size, "schema": schema.fingerprint()},
        indent=2) + "\n", encoding="utf-8")
    return tmp.replace(out / "catalog.jsonl")  # last: a catalog on disk means a complete data set


def load_boxes(catalog_dir: str | Path) -> dict[str, dict[str, Box | None]]:
    """Ground-truth boxes written by :func:`generate` (a catalog path or its folder)."""
    p = Path(catalog_dir)
    if p.is_file():
        p = p.parent
    path = p / "boxes.jsonl"
    if not path.is_file():
        raise FgpluginError(f"{path}: no boxes file (only generated catalogs have ground-truth boxes)")
    out: dict[str, dict[str, Box | None]] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["id"])] = {k: (tuple(float(x) for x in v) if v is not None else None)  # type: ignore[misc]
                                       for k, v in row["boxes"].items()}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise FgpluginError(f"{path}: row {n} is not a valid boxes row ({type(e).__name__}: {e})") from None
    return out


__all__ = ["SynthItem", "synth_schema", "render_item", "generate", "load_boxes", "item_id", "NOT_VISIBLE"]
