"""The 20 object classes of the synthetic world, one outline generator per class.

Every generator takes a ``numpy.random.Generator`` (for small per-instance variation that
keeps the class recognisable: a star's inner radius, a ring's thickness, an arrow's head)
and returns a :class:`Outline`: an ordered list of filled polygons in a *unit frame*
(x to the right, y downward, the outline's bounding box centred on the origin with its
longer half-side equal to 1). Polygons marked ``add=False`` are holes, cut out of what was
drawn before (ring, gear, crescent).

The classes were chosen to stay distinguishable under any rotation and a moderate aspect
change (0.7-1.4): there is a square but no diamond or rectangle (those are a rotated or
stretched square), a circle but no ellipse, and no parallelogram (a sheared square at
aspect 1.4 is too close to a rectangle).

Clutter (never annotated) lives here too: :func:`clutter_outline` draws random blobs,
irregular polygons and scribbled strokes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = [
    "CLASS_NAMES", "SHAPES", "CLUTTER_KINDS", "Outline", "Polygon", "Stroke",
    "shape_outline", "clutter_outline",
]


@dataclass(frozen=True)
class Polygon:
    """A filled polygon (``points`` is an (N, 2) float array); ``add=False`` cuts a hole."""

    points: np.ndarray
    add: bool = True


@dataclass(frozen=True)
class Stroke:
    """An open polyline of a given ``width`` (in unit-frame units); used for scribbles."""

    points: np.ndarray
    width: float


@dataclass
class Outline:
    """What to draw for one object, in the unit frame, in drawing order."""

    parts: list = field(default_factory=list)  # Polygon | Stroke

    def normalized(self) -> "Outline":
        """Centre the additive parts' bounding box on the origin, longer half-side = 1."""
        pts = np.concatenate(
            [p.points for p in self.parts if isinstance(p, Stroke) or p.add], axis=0
        )
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        centre = (lo + hi) / 2.0
        half = float(max(hi - lo)) / 2.0 or 1.0
        parts = []
        for p in self.parts:
            q = (p.points - centre) / half
            if isinstance(p, Stroke):
                parts.append(Stroke(q, p.width / half))
            else:
                parts.append(Polygon(q, p.add))
        return Outline(parts)


# ---- helpers ---------------------------------------------------------------------------

def _ring_points(n: int, radius: float = 1.0, phase: float = 0.0,
                 centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    t = phase + 2.0 * np.pi * np.arange(n) / n
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)


def _poly(*pts) -> np.ndarray:
    return np.asarray(pts, dtype=np.float64)


def _star(n_points: int, inner: float) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * n_points) / n_points
    r = np.where(np.arange(2 * n_points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


# ---- the 20 classes --------------------------------------------------------------------

def circle(rng: np.random.Generator) -> Outline:
    return Outline([Polygon(_ring_points(40))])


def square(rng: np.random.Generator) -> Outline:
    return Outline([Polygon(_poly((-1, -1), (1, -1), (1, 1), (-1, 1)))])


def triangle(rng: np.random.Generator) -> Outline:
    # an isosceles triangle whose apex angle varies a little (equilateral +- 10 degrees)
    half_base = math.tan(math.radians(30 + rng.uniform(-5, 5)))
    return Outline([Polygon(_poly((0, -1), (half_base * 2, 1), (-half_base * 2, 1)))])


def pentagon(rng: np.random.Generator) -> Outline:
    return Outline([Polygon(_ring_points(5, phase=-np.pi / 2))])


def hexagon(rng: np.random.Generator) -> Outline:
    return Outline([Polygon(_ring_points(6))])


def star5(rng: np.random.Generator) -> Outline:
    return Outline([Polygon(_star(5, rng.uniform(0.38, 0.5)))])


def star4(rng: np.random.Generator) -> Outline:
    return Outline([Polygon(_star(4, rng.uniform(0.28, 0.4)))])


def cross(rng: np.random.Generator) -> Outline:
    w = rng.uniform(0.3, 0.38)
    return Outline([Polygon(_poly(
        (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
        (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
    ))])


def ring(rng: np.random.Generator) -> Outline:
    return Outline([
        Polygon(_ring_points(40)),
        Polygon(_ring_points(32, radius=rng.uniform(0.5, 0.62)), add=False),
    ])


def crescent(rng: np.random.Generator) -> Outline:
    r = rng.uniform(0.8, 0.9)
    dx = rng.uniform(0.4, 0.5)
    return Outline([
        Polygon(_ring_points(40)),
        Polygon(_ring_points(40, radius=r, centre=(dx, -0.1)), add=False),
    ])


def heart(rng: np.random.Generator) -> Outline:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return Outline([Polygon(np.stack([x, y], axis=1))])


def arrow(rng: np.random.Generator) -> Outline:
    w = rng.uniform(0.16, 0.24)   # shaft half-width
    h = rng.uniform(0.55, 0.7)    # head half-width
    neck = rng.uniform(0.0, 0.2)  # where the head starts
    return Outline([Polygon(_poly(
        (-1, -w), (neck, -w), (neck, -h), (1, 0), (neck, h), (neck, w), (-1, w),
    ))])


def semicircle(rng: np.random.Generator) -> Outline:
    t = np.linspace(np.pi, 2 * np.pi, 24)
    arc = np.stack([np.cos(t), np.sin(t)], axis=1)
    return Outline([Polygon(arc)])


def lshape(rng: np.random.Generator) -> Outline:
    a = rng.uniform(0.36, 0.45)
    return Outline([Polygon(_poly((0, 0), (a, 0), (a, 1 - a), (1, 1 - a), (1, 1), (0, 1)))])


def tshape(rng: np.random.Generator) -> Outline:
    a = rng.uniform(0.3, 0.38)
    return Outline([Polygon(_poly(
        (0, 0), (1, 0), (1, a), (0.5 + a / 2, a), (0.5 + a / 2, 1), (0.5 - a / 2, 1),
        (0.5 - a / 2, a), (0, a),
    ))])


def trapezoid(rng: np.random.Generator) -> Outline:
    top = rng.uniform(0.3, 0.45)
    return Outline([Polygon(_poly((-1, 0.55), (1, 0.55), (top, -0.55), (-top, -0.55)))])


def hourglass(rng: np.random.Generator) -> Outline:
    waist = rng.uniform(0.1, 0.2)
    return Outline([Polygon(_poly(
        (-0.8, -1), (0.8, -1), (waist, 0), (0.8, 1), (-0.8, 1), (-waist, 0),
    ))])


def ushape(rng: np.random.Generator) -> Outline:
    a = rng.uniform(0.3, 0.36)
    return Outline([Polygon(_poly(
        (0, 0), (a, 0), (a, 1 - a), (1 - a, 1 - a), (1 - a, 0), (1, 0), (1, 1), (0, 1),
    ))])


def gear(rng: np.random.Generator) -> Outline:
    teeth = 8
    inner = rng.uniform(0.72, 0.8)
    pts = []
    for i in range(teeth):
        a0 = 2 * np.pi * i / teeth
        step = 2 * np.pi / teeth
        for frac, r in ((0.0, inner), (0.15, 1.0), (0.5, 1.0), (0.65, inner)):
            a = a0 + frac * step
            pts.append((r * np.cos(a), r * np.sin(a)))
    return Outline([
        Polygon(np.asarray(pts)),
        Polygon(_ring_points(20, radius=rng.uniform(0.25, 0.32)), add=False),
    ])


def zshape(rng: np.random.Generator) -> Outline:
    return Outline([Polygon(_poly(
        (0, 0), (2, 0), (2, 1), (3, 1), (3, 2), (1, 2), (1, 1), (0, 1),
    ))])


# The fixed class order: category ids are 1..20 in this order.
SHAPES: dict[str, Callable[[np.random.Generator], Outline]] = {
    "circle": circle,
    "square": square,
    "triangle": triangle,
    "pentagon": pentagon,
    "hexagon": hexagon,
    "star5": star5,
    "star4": star4,
    "cross": cross,
    "ring": ring,
    "crescent": crescent,
    "heart": heart,
    "arrow": arrow,
    "semicircle": semicircle,
    "lshape": lshape,
    "tshape": tshape,
    "trapezoid": trapezoid,
    "hourglass": hourglass,
    "ushape": ushape,
    "gear": gear,
    "zshape": zshape,
}
CLASS_NAMES: tuple[str, ...] = tuple(SHAPES)


def shape_outline(name: str, rng: np.random.Generator) -> Outline:
    """The normalised outline of one instance of class ``name``."""
    try:
        fn = SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown shape class {name!r}; known: {', '.join(CLASS_NAMES)}") from None
    return fn(rng).normalized()


# ---- clutter (never annotated) ---------------------------------------------------------

def _blob(rng: np.random.Generator) -> Outline:
    t = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 4, 5):
        r += rng.uniform(0.05, 0.25) / (k - 1) ** 0.5 * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.35, None)
    return Outline([Polygon(np.stack([r * np.cos(t), r * np.sin(t)], axis=1))])


def _irregular(rng: np.random.Generator) -> Outline:
    # many vertices at jittered angles and random radii: jagged, never a clean polygon
    n = int(rng.integers(7, 12))
    t = 2 * np.pi * (np.arange(n) + rng.uniform(-0.35, 0.35, size=n)) / n
    r = rng.uniform(0.4, 1.0, size=n)
    return Outline([Polygon(np.stack([r * np.cos(t), r * np.sin(t)], axis=1))])


def _scribble(rng: np.random.Generator) -> Outline:
    n = int(rng.integers(3, 7))
    pts = rng.uniform(-1, 1, size=(n, 2))
    return Outline([Stroke(pts, width=float(rng.uniform(0.05, 0.12)))])


CLUTTER_KINDS: dict[str, Callable[[np.random.Generator], Outline]] = {
    "blob": _blob,
    "irregular": _irregular,
    "scribble": _scribble,
}


def clutter_outline(rng: np.random.Generator) -> tuple[str, Outline]:
    """A random clutter outline (kind name, normalised outline)."""
    kind = ("blob", "irregular", "scribble")[int(rng.integers(0, 3))]
    return kind, CLUTTER_KINDS[kind](rng).normalized()
