"""Deterministic synthetic referring-segmentation dataset (pure numpy).

Each scene holds 3-6 non-overlapping flat shapes on a dark background. Every object has a
colour (red, green, blue, yellow, purple, white), a shape (circle, square, triangle), a size
(small, large) and a position. A referring expression names exactly one object, using
attributes ("the large blue square"), a spatial relation to a uniquely named anchor ("the
triangle left of the green circle", "the circle nearest to the blue triangle") or an ordinal
("the second square from the left", "the leftmost red shape"). Every expression is checked
with :func:`resolve` (exactly one object satisfies it, with geometric margins so that it is
unambiguous to the eye) and distractors are drawn to share the target's colour or shape, so
a model has to use every word.

Splits come from disjoint seed streams (``np.random.default_rng([seed, split_id, index])``),
so sample ``i`` of a split does not depend on how many samples are drawn. The
``compositional`` split only has targets whose (colour, shape) is in :data:`HELD_OUT_COMBOS`;
``train``/``val``/``test`` targets never do (held-out combos may still appear as distractors
or anchors there). Masks are exact: objects' circumscribed circles are disjoint, so the
rendered pixel sets are disjoint and the mask is the target's rendered pixels.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 190, 60),
                                             "blue": (50, 90, 235), "yellow": (235, 215, 40),
                                             "purple": (155, 60, 205),
                                             "white": (240, 240, 240)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.075, "large": 0.125}  # extent, fraction of image side
HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("green", "circle"),
                                                          ("blue", "square"), ("purple", "triangle")})
SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "compositional": 3}
DEFAULT_SIZES: dict[str, int] = {"train": 4000, "val": 500, "test": 500, "compositional": 500}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "nearest to", "farthest from")
DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
SUPERLATIVES: dict[str, str] = {d: f"{d}most" for d in DIRECTIONS}  # "leftmost", ...
ORDINALS: tuple[str, ...] = ("first", "second", "third")
ATTRS: tuple[str, ...] = ("size", "colour", "shape")
AXIS_MARGIN = 0.05  # min |coordinate difference| for left/right/above/below and ordinals
DIST_MARGIN = 0.06  # min gap between nearest (farthest) and the runner-up distance
GAP = 0.02  # min gap between objects' circumscribed circles
_CIRCUM = {"circle": 1.0, "square": 0.8 * np.sqrt(2.0), "triangle": 1.15}


@dataclass(frozen=True)
class SceneObject:
    """One object; ``cx, cy`` in [0, 1] image fractions (y down), ``radius`` circumscribed."""

    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Phrase:
    """A noun phrase ``the [size] [colour] shape|'shape'``; ``None`` = attribute not used."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return all(getattr(self, a) in (None, getattr(obj, a)) for a in ATTRS)

    def text(self) -> str:
        words = [w for w in (self.size, self.colour) if w]
        return " ".join([*words, self.shape or "shape"])


@dataclass(frozen=True)
class Expression:
    """Structured referring expression.

    ``kind`` is ``"attribute"`` (target phrase only), ``"relation"`` (``relation`` in
    :data:`RELATIONS`, relative to the object named by ``anchor``) or ``"ordinal"``
    (``ordinal``-th (1-based) object matching ``target`` counted from ``direction``).
    """

    kind: str
    target: Phrase
    relation: str | None = None
    anchor: Phrase | None = None
    ordinal: int | None = None
    direction: str | None = None
    superlative: bool = False

    def text(self) -> str:
        if self.kind == "attribute":
            return f"the {self.target.text()}"
        if self.kind == "relation":
            assert self.anchor is not None
            return f"the {self.target.text()} {self.relation} the {self.anchor.text()}"
        assert self.ordinal is not None and self.direction is not None
        if self.superlative:
            return f"the {SUPERLATIVES[self.direction]} {self.target.text()}"
        return f"the {ORDINALS[self.ordinal - 1]} {self.target.text()} from the {self.direction}"


@dataclass
class SyntheticSample:
    """A rendered scene with one referring expression.

    Attributes:
        image: uint8 ``[H, W, 3]``.
        mask: bool ``[H, W]``, the target object's rendered pixels.
        sentence: the referring expression (lower case, <= 12 words).
        target_index: index of the referred object in ``objects``.
        objects: the scene's :class:`SceneObject` list.
        expression: the structured :class:`Expression` behind ``sentence``.
        id: ``"synthetic/<split>/<seed>/<index>"``.
    """

    image: np.ndarray
    mask: np.ndarray
    sentence: str
    target_index: int
    objects: list[SceneObject]
    expression: Expression
    id: str = ""


# --------------------------------------------------------------------- semantics
def _coord(obj: SceneObject, direction: str) -> float:
    """Sort key: smaller = closer to the side named by ``direction``."""
    return {"left": obj.cx, "right": -obj.cx, "top": obj.cy, "bottom": -obj.cy}[direction]


def _rel_value(obj: SceneObject, anchor: SceneObject, relation: str) -> float:
    """Signed quantity; for the 4 axis relations > 0 means the relation holds."""
    if relation == "left of":
        return anchor.cx - obj.cx
    if relation == "right of":
        return obj.cx - anchor.cx
    if relation == "above":
        return anchor.cy - obj.cy
    if relation == "below":
        return obj.cy - anchor.cy
    return float(np.hypot(obj.cx - anchor.cx, obj.cy - anchor.cy))


def resolve(expr: Expression, objects: list[SceneObject], *, margins: bool = False) -> list[int]:
    """Indices of the objects ``expr`` refers to (a valid expression gives exactly one).

    With ``margins=True`` borderline configurations (objects nearly aligned, near-equal
    distances, anchor not unique) make the result empty, i.e. the expression is rejected.
    """
    cands = [i for i, o in enumerate(objects) if expr.target.matches(o)]
    if expr.kind == "attribute":
        return cands
    if expr.kind == "relation":
        assert expr.anchor is not None and expr.relation is not None
        anchors = [i for i, o in enumerate(objects) if expr.anchor.matches(o)]
        if len(anchors) != 1:
            return []
        a = anchors[0]
        cands = [i for i in cands if i != a]
        vals = [_rel_value(objects[i], objects[a], expr.relation) for i in cands]
        if expr.relation in ("nearest to", "farthest from"):
            if not cands:
                return []
            order = np.argsort(vals)
            pick = int(order[0] if expr.relation == "nearest to" else order[-1])
            if margins and len(cands) > 1:
                runner = vals[int(order[1] if expr.relation == "nearest to" else order[-2])]
                if abs(vals[pick] - runner) < DIST_MARGIN:
                    return []
            return [cands[pick]]
        if margins and any(abs(v) < AXIS_MARGIN for v in vals):
            return []
        return [i for i, v in zip(cands, vals, strict=True) if v > 0]
    if expr.kind == "ordinal":
        assert expr.ordinal is not None and expr.direction is not None
        keys = sorted((_coord(objects[i], expr.direction), i) for i in cands)
        if len(keys) < expr.ordinal:
            return []
        if margins and any(b[0] - a[0] < AXIS_MARGIN for a, b in itertools.pairwise(keys)):
            return []
        return [keys[expr.ordinal - 1][1]]
    raise ValueError(f"unknown expression kind {expr.kind!r}")


# ------------------------------------------------------------------------ scenes
def _make_scene(rng: np.random.Generator, split: str) -> tuple[list[SceneObject], int]:
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    held = sorted(HELD_OUT_COMBOS)
    pool = held if split == "compositional" else [c for c in combos if c not in HELD_OUT_COMBOS]
    colours, sizes = list(COLOURS), list(SIZES)
    t_colour, t_shape = pool[rng.integers(len(pool))]
    specs = [(t_colour, t_shape, sizes[rng.integers(2)])]
    for _ in range(int(rng.integers(3, 7)) - 1):  # distractors share attributes with target
        r = rng.random()
        colour, shape = colours[rng.integers(6)], SHAPES[rng.integers(3)]
        if r < 0.35:
            colour = t_colour
        elif r < 0.7:
            shape = t_shape
        elif r < 0.8:
            colour, shape = t_colour, t_shape
        specs.append((colour, shape, sizes[rng.integers(2)]))
    objects: list[SceneObject] = []
    for k, (colour, shape, size) in enumerate(specs):
        radius = SIZES[size] * _CIRCUM[shape]
        lo, hi = radius + 0.01, 1.0 - radius - 0.01
        cand = rng.uniform(lo, hi, size=(64, 2))
        ok = np.ones(len(cand), dtype=bool)
        for o in objects:
            d = np.hypot(cand[:, 0] - o.cx, cand[:, 1] - o.cy)
            ok &= d >= radius + o.radius + GAP
        if not ok.any():
            if k == 0:
                raise RuntimeError("unreachable: first object always fits")
            continue  # drop this distractor
        cx, cy = cand[int(np.argmax(ok))]
        base = np.array(COLOURS[colour])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, size=3), 0, 255))
        objects.append(SceneObject(colour, shape, size, float(cx), float(cy), radius, rgb))
    return objects, 0


def _render(objects: list[SceneObject], size: int, bg: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise at pixel centres. Returns image uint8 [S,S,3] and labels int8 [S,S] (-1 bg)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = bg
    labels = np.full((size, size), -1, dtype=np.int8)
    for idx, o in enumerate(objects):
        x0, x1 = max(int((o.cx - o.radius) * size) - 1, 0), min(int((o.cx + o.radius) * size) + 2, size)
        y0, y1 = max(int((o.cy - o.radius) * size) - 1, 0), min(int((o.cy + o.radius) * size) + 2, size)
        xs = (np.arange(x0, x1) + 0.5) / size - o.cx
        ys = (np.arange(y0, y1) + 0.5) / size - o.cy
        dx, dy = xs[None, :], ys[:, None]
        e = SIZES[o.size]
        if o.shape == "circle":
            inside = dx * dx + dy * dy <= e * e
        elif o.shape == "square":
            inside = (np.abs(dx) <= 0.8 * e) & (np.abs(dy) <= 0.8 * e)
        else:  # upward equilateral triangle with circumradius o.radius, centroid at centre
            r = o.radius
            s3 = np.sqrt(3.0)
            inside = (dy <= r / 2) & (s3 * dx - dy <= r) & (-s3 * dx - dy <= r)
        region = labels[y0:y1, x0:x1]
        region[inside] = idx
        image[y0:y1, x0:x1][inside] = o.rgb
    return image, labels


# ------------------------------------------------------------------- expressions
def _subsets(obj: SceneObject, *, allow_empty: bool) -> list[Phrase]:
    """All phrases describing ``obj``, fewest attributes first."""
    out = []
    for k in range(0 if allow_empty else 1, 4):
        for attrs in itertools.combinations(ATTRS, k):
            out.append(Phrase(**{a: getattr(obj, a) for a in attrs}))
    return out


def _n_attrs(p: Phrase) -> int:
    return sum(v is not None for v in (p.size, p.colour, p.shape))


_PHRASE_WEIGHTS = (0.15, 0.45, 0.3, 0.1)  # by number of attributes in a target phrase


def _pick(options: list, phrases: list[Phrase], rng: np.random.Generator):
    """Pick one of ``options`` favouring phrases with one or two attributes."""
    w = np.array([_PHRASE_WEIGHTS[_n_attrs(p)] for p in phrases])
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def _minimal_unique(objects: list[SceneObject], idx: int, rng: np.random.Generator) -> Phrase | None:
    """A phrase naming only ``objects[idx]``: minimal, sometimes with extra attributes."""
    phrases = [p for p in _subsets(objects[idx], allow_empty=False)
               if sum(p.matches(o) for o in objects) == 1]
    if not phrases:
        return None
    n_min = min(_n_attrs(p) for p in phrases)
    minimal = [p for p in phrases if _n_attrs(p) == n_min]
    pool = minimal if rng.random() < 0.8 else phrases
    return pool[rng.integers(len(pool))]


def _try_relation(objects: list[SceneObject], t: int, rng: np.random.Generator) -> Expression | None:
    for a in rng.permutation(len(objects)):
        if a == t:
            continue
        anchor = _minimal_unique(objects, int(a), rng)
        if anchor is None:
            continue
        for rel in rng.permutation(RELATIONS):
            valid = []
            for phrase in _subsets(objects[t], allow_empty=True):
                # the relation must be needed: the phrase alone names >= 2 non-anchor objects
                others = [i for i, o in enumerate(objects) if i != a and phrase.matches(o)]
                if len(others) < 2:
                    continue
                expr = Expression("relation", phrase, relation=str(rel), anchor=anchor)
                if resolve(expr, objects, margins=True) == [t]:
                    valid.append(expr)
            if valid:
                return _pick(valid, [e.target for e in valid], rng)
    return None


def _try_ordinal(objects: list[SceneObject], t: int, rng: np.random.Generator) -> Expression | None:
    for direction in rng.permutation(DIRECTIONS):
        valid = []
        for phrase in _subsets(objects[t], allow_empty=True):
            n = sum(phrase.matches(o) for o in objects)
            if n < 2 or n > 4:
                continue
            for k in (1, 2, 3):
                superlative = k == 1 and bool(rng.random() < 0.5)
                expr = Expression("ordinal", phrase, ordinal=k, direction=str(direction),
                                  superlative=superlative)
                if resolve(expr, objects, margins=True) == [t]:
                    valid.append(expr)
        if valid:
            return _pick(valid, [e.target for e in valid], rng)
    return None


def _make_expression(objects: list[SceneObject], t: int, rng: np.random.Generator) -> Expression | None:
    kinds = ["attribute", "relation", "ordinal"]
    first = kinds[int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
    for kind in [first] + [k for k in kinds if k != first]:
        if kind == "attribute":
            phrase = _minimal_unique(objects, t, rng)
            expr = Expression("attribute", phrase) if phrase is not None else None
        elif kind == "relation":
            expr = _try_relation(objects, t, rng)
        else:
            expr = _try_ordinal(objects, t, rng)
        if expr is not None:
            return expr
    return None


# ------------------------------------------------------------------------ public
def generate_sample(split: str, index: int, *, image_size: int = 64, seed: int = 0) -> SyntheticSample:
    """Sample ``index`` of ``split`` (deterministic in ``(split, index, seed)``)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    rng = np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])
    while True:
        objects, t = _make_scene(rng, split)
        if len(objects) < 3:
            continue
        expr = _make_expression(objects, t, rng)
        if expr is None:
            continue
        # shuffle so the target is not always object 0
        perm = rng.permutation(len(objects))
        objects = [objects[int(i)] for i in perm]
        t = int(np.flatnonzero(perm == t)[0])
        assert resolve(expr, objects, margins=True) == [t]
        bg = tuple(int(v) for v in rng.integers(10, 45, size=3))
        image, labels = _render(objects, image_size, bg)
        return SyntheticSample(image=image, mask=labels == t, sentence=expr.text(), target_index=t,
                               objects=objects, expression=expr, id=f"synthetic/{split}/{seed}/{index}")


def generate_scene(rng: np.random.Generator, *, image_size: int = 64, split: str = "train"
                   ) -> tuple[list[SceneObject], np.ndarray, np.ndarray]:
    """A scene drawn as ``split``'s referring samples draw theirs, without an expression (for other
    generators, e.g. ``captions.py``): objects in random order, image uint8 ``[S, S, 3]`` and labels
    int8 ``[S, S]`` (object index, -1 = background)."""
    while True:
        objects, _ = _make_scene(rng, split)
        if len(objects) >= 3:
            objects = [objects[int(i)] for i in rng.permutation(len(objects))]
            bg = tuple(int(v) for v in rng.integers(10, 45, size=3))
            return objects, *_render(objects, image_size, bg)


class SyntheticReferDataset(Dataset):
    """Lazily generated split; item ``i`` is :attr:`generate` ``(split, i)`` as a dict: ``image``
    uint8 ``[H, W, 3]``, ``mask`` bool ``[H, W]``, ``sentence``, ``id``. ``image_size`` None: the
    world's own. World v2's dataset subclasses this one with its own generator and split sizes."""

    generate = staticmethod(generate_sample)
    default_sizes: dict[str, int] = DEFAULT_SIZES

    def __init__(self, split: str, *, num_samples: int | None = None, image_size: int | None = None,
                 seed: int = 0) -> None:
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        n = self.default_sizes[split] if num_samples is None else num_samples
        self.split, self.num_samples, self.seed, self.image_size = split, int(n), seed, image_size

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        size = {} if self.image_size is None else {"image_size": self.image_size}
        s = self.generate(self.split, int(index), seed=self.seed, **size)
        return {"image": s.image, "mask": s.mask, "sentence": s.sentence, "id": s.id}
