"""Synthetic world v2: RefCOCO-like referents, so that a study can tell whether masking helps (issue 16).

The demo world (``synthetic.py``) has referents of ~1.7 patches; here they are large and share
their category with other objects, as in RefCOCO:

* 96 px images (patch 8: a 12×12 grid), 3-5 flat shapes (``synthetic``'s colours and shapes) of two
  size classes by *area*: small 8-11 %, large 15-24 % of the image, so every shape of a class covers
  the same area. Objects may overlap (a later one occludes an earlier one; two of one colour never
  touch) and leave the frame, but each keeps at least :data:`MIN_VISIBLE` of its area in view;
  masks are the visible pixels.
* The referent's shape is its *category*: with probability :data:`SAME_CATEGORY_P` one or two
  further objects of that shape are in the scene (RefCOCO chooses referents among objects of the
  same category), so the noun alone rarely names the referent.
* Short expressions (RefCOCO averages 3.6 words), the noun always present:
  ``attribute`` (``blue circle``, ``the large blue circle``), ``location`` among the objects the
  phrase matches (``left circle``, ``circle on top``) and ``relation`` to a uniquely named anchor
  (``circle left of red square``, ``square near circle``). Every expression is resolved by
  :func:`resolve` with margins (:data:`LOCATION_MARGIN`, :data:`NEAR_MARGIN`): exactly one object.
* The compositional split keeps ``synthetic.HELD_OUT_COMBOS``: only its targets have a held-out
  (colour, shape); the other splits' targets never do.

Deterministic: sample ``i`` of a split is a function of ``(seed, split, i)`` alone
(``np.random.default_rng([seed, STREAM, split_id, i])``, a stream disjoint from the demo world's).
``python examples/cris_clip/world_v2_stats.py`` prints the world's statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

try:  # a script run of this folder imports siblings by plain name
    import synthetic
except ModuleNotFoundError:  # imported as examples.cris_clip.world_v2 (tests)
    from . import synthetic

COLOURS, HELD_OUT_COMBOS, SHAPES, SPLIT_IDS = (synthetic.COLOURS, synthetic.HELD_OUT_COMBOS, synthetic.SHAPES,
                                               synthetic.SPLIT_IDS)
Phrase, SceneObject, SyntheticReferDataset, SyntheticSample = (synthetic.Phrase, synthetic.SceneObject,
                                                               synthetic.SyntheticReferDataset,
                                                               synthetic.SyntheticSample)

IMAGE_SIZE = 96  # with the demo CLIP's patch 8: a 12×12 grid
STREAM = 200  # seed-sequence tag of world v2: [seed, STREAM, split id, index]
AREAS: dict[str, tuple[float, float]] = {"small": (0.08, 0.11), "large": (0.15, 0.24)}  # of the image
OBJECT_COUNTS = (3, 4, 5)
SAME_CATEGORY_P = 0.9  # a scene holds >= 2 objects of the referent's shape
MIN_VISIBLE = 0.65  # share of each object's area left in view (in frame, not occluded)
LOCATION_MARGIN = 0.1  # the extreme object beats the runner-up by this much (image fractions)
NEAR_MARGIN = 0.08  # "near": the nearest beats the second nearest by this distance
DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "near")
KINDS, KIND_P = ("attribute", "location", "relation"), (0.3, 0.4, 0.3)
ARTICLE_P = 0.3  # "the large blue circle" vs "large blue circle"
DEFAULT_SIZES: dict[str, int] = {"train": 8000, "val": 2000, "test": 2000, "compositional": 2000}


@dataclass(frozen=True)
class Expression:
    """``kind`` ``attribute`` (``target`` alone), ``location`` (the object matching ``target`` farthest
    towards ``direction``; ``prefix``: "left circle", else "circle on left") or ``relation``
    (``relation`` to the object named by ``anchor``)."""

    kind: str
    target: Phrase
    direction: str | None = None
    prefix: bool = True
    relation: str | None = None
    anchor: Phrase | None = None
    article: bool = False

    def text(self) -> str:
        words = ["the"] if self.article else []
        if self.kind == "location" and self.prefix:
            words.append(str(self.direction))
        words.append(self.target.text())
        if self.kind == "location" and not self.prefix:
            words += ["on", str(self.direction)]
        if self.kind == "relation":
            assert self.anchor is not None
            words += [str(self.relation), self.anchor.text()]
        return " ".join(words)


# --------------------------------------------------------------------------------- semantics
def _key(obj: SceneObject, direction: str) -> float:
    """Smaller = farther towards ``direction``."""
    return {"left": obj.cx, "right": -obj.cx, "top": obj.cy, "bottom": -obj.cy}[direction]


def _signed(obj: SceneObject, anchor: SceneObject, relation: str) -> float:
    """> 0: ``obj <relation> anchor`` holds (axis relations); distance for ``near``."""
    return {"left of": anchor.cx - obj.cx, "right of": obj.cx - anchor.cx, "above": anchor.cy - obj.cy,
            "below": obj.cy - anchor.cy}.get(relation, math.hypot(obj.cx - anchor.cx, obj.cy - anchor.cy))


def resolve(expr: Expression, objects: list[SceneObject]) -> list[int]:
    """The objects ``expr`` refers to, with margins: a valid expression gives exactly one, a
    borderline configuration (near-ties, an ambiguous anchor) gives none."""
    cands = [i for i, o in enumerate(objects) if expr.target.matches(o)]
    if expr.kind == "attribute":
        return cands
    if expr.kind == "location":
        keys = sorted((_key(objects[i], str(expr.direction)), i) for i in cands)
        if len(keys) < 2:
            return []  # "left circle" with a single circle is not how a location word is used
        return [keys[0][1]] if keys[1][0] - keys[0][0] >= LOCATION_MARGIN else []
    assert expr.anchor is not None and expr.relation is not None
    anchors = [i for i, o in enumerate(objects) if expr.anchor.matches(o)]
    if len(anchors) != 1:
        return []
    cands = [i for i in cands if i != anchors[0]]
    values = [_signed(objects[i], objects[anchors[0]], expr.relation) for i in cands]
    if not cands:
        return []
    if expr.relation == "near":
        order = np.argsort(values)
        if len(cands) > 1 and values[int(order[1])] - values[int(order[0])] < NEAR_MARGIN:
            return []
        return [cands[int(order[0])]]
    if any(abs(v) < LOCATION_MARGIN for v in values):
        return []
    return [i for i, v in zip(cands, values, strict=True) if v > 0]


# ------------------------------------------------------------------------------------ scenes
def circumradius(shape: str, area: float) -> float:
    """Circumscribed radius (image fractions) of ``shape`` covering ``area`` of the unit image."""
    factor = {"circle": math.pi, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4}[shape]  # area / R²
    return math.sqrt(area / factor)


def inside(obj: SceneObject, size: int) -> np.ndarray:
    """bool ``[size, size]``: the pixels (sampled at their centres) that ``obj`` covers."""
    c = (np.arange(size) + 0.5) / size
    dx, dy, r = c[None, :] - obj.cx, c[:, None] - obj.cy, obj.radius
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return (np.abs(dx) <= r / math.sqrt(2)) & (np.abs(dy) <= r / math.sqrt(2))
    s3 = math.sqrt(3.0)  # upward equilateral triangle, centroid at the centre
    return (dy <= r / 2) & (s3 * dx - dy <= r) & (-s3 * dx - dy <= r)


def _specs(rng: np.random.Generator, split: str) -> list[tuple[str, str, str]]:
    """(colour, shape, size) of the target (first) and its distractors."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    pool = (sorted(HELD_OUT_COMBOS) if split == "compositional"
            else [c for c in combos if c not in HELD_OUT_COMBOS])
    colours, sizes = list(COLOURS), list(AREAS)
    colour, shape = pool[int(rng.integers(len(pool)))]
    n = int(rng.choice(OBJECT_COUNTS))
    same = int(rng.integers(1, 3)) if rng.random() < SAME_CATEGORY_P else 0
    specs = [(colour, shape, sizes[int(rng.integers(2))])]
    for k in range(n - 1):
        c, s = colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))]
        if k < same:
            s = shape
        elif s == shape:  # the category count is decided above
            s = SHAPES[(SHAPES.index(shape) + 1 + int(rng.integers(len(SHAPES) - 1))) % len(SHAPES)]
        if rng.random() < 0.3:
            c = colour
        specs.append((c, s, sizes[int(rng.integers(2))]))
    return specs


def make_scene(rng: np.random.Generator, split: str, size: int = IMAGE_SIZE
               ) -> tuple[list[SceneObject], int, np.ndarray] | None:
    """Objects in drawing order, the target's index and the labels int8 ``[size, size]`` (object
    index, -1 background); None when the scene does not come out as drawn (retry)."""
    specs = _specs(rng, split)
    order = [int(i) for i in rng.permutation(len(specs))]  # drawing order: the target anywhere
    objects: list[SceneObject] = []
    areas: list[float] = []  # each object's whole area in pixels
    shapes: list[np.ndarray] = []  # each object's pixels, occluded ones included
    target, labels = -1, np.full((size, size), -1, dtype=np.int8)
    for k in order:
        colour, shape, size_class = specs[k]
        area = float(rng.uniform(*AREAS[size_class]))
        for _ in range(30):
            cx, cy = (float(v) for v in rng.uniform(0.12, 0.88, size=2))
            rgb = tuple(int(v)
                        for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-12, 13, size=3), 0, 255))
            obj = SceneObject(colour, shape, size_class, cx, cy, circumradius(shape, area), rgb)
            pixels = inside(obj, size)
            grown = inside(replace(obj, radius=obj.radius * 1.12), size)
            if any((grown & m).any() for m, o in zip(shapes, objects, strict=True) if o.colour == colour):
                continue  # objects of one colour never touch: their outline would not show
            trial = labels.copy()
            trial[pixels] = len(objects)
            visible = np.bincount(trial.ravel() + 1, minlength=len(objects) + 2)[1:]
            if all(v >= MIN_VISIBLE * a for v, a in zip(visible, [*areas, area * size * size], strict=True)):
                labels, target = trial, (len(objects) if k == 0 else target)
                objects.append(obj)
                areas.append(area * size * size)
                shapes.append(pixels)
                break
        else:
            if k == 0:
                return None
    same = sum(o.shape == objects[target].shape for o in objects) if target >= 0 else 0
    if len(objects) < 3 or (same < 2 and any(specs[k][1] == specs[0][1] for k in range(1, len(specs)))):
        return None
    return objects, target, labels


# ------------------------------------------------------------------------------- expressions
def _phrases(obj: SceneObject) -> list[Phrase]:
    """Phrases naming ``obj``'s shape, fewest attributes first."""
    return [Phrase(shape=obj.shape), Phrase(colour=obj.colour, shape=obj.shape),
            Phrase(size=obj.size, shape=obj.shape), Phrase(size=obj.size, colour=obj.colour, shape=obj.shape)]


def _unique(objects: list[SceneObject], i: int, rng: np.random.Generator) -> Phrase | None:
    """A phrase naming only ``objects[i]``: the shortest (80 %) or any."""
    unique = [p for p in _phrases(objects[i]) if sum(p.matches(o) for o in objects) == 1]
    if not unique:
        return None
    n = min(len(p.text().split()) for p in unique)
    pool = [p for p in unique if len(p.text().split()) == n] if rng.random() < 0.8 else unique
    return pool[int(rng.integers(len(pool)))]


def _try(kind: str, objects: list[SceneObject], t: int, rng: np.random.Generator) -> Expression | None:
    article = bool(rng.random() < ARTICLE_P)
    if kind == "attribute":
        phrase = _unique(objects, t, rng)
        return Expression("attribute", phrase, article=article) if phrase is not None else None
    valid: list[Expression] = []
    if kind == "location":
        for phrase in _phrases(objects[t])[:3]:  # phrases matching >= 2 objects, location needed
            if sum(phrase.matches(o) for o in objects) >= 2:
                for d in DIRECTIONS:
                    e = Expression("location", phrase, direction=d, prefix=bool(rng.random() < 0.4),
                                   article=article)
                    valid += [e] if resolve(e, objects) == [t] else []
    else:
        for a in range(len(objects)):
            anchor = _unique(objects, a, rng) if a != t else None
            for phrase in _phrases(objects[t])[:3] if anchor is not None else ():
                if sum(phrase.matches(o) for i, o in enumerate(objects) if i != a) < 2:
                    continue  # the relation must be needed
                for rel in RELATIONS:
                    e = Expression("relation", phrase, relation=rel, anchor=anchor, article=article)
                    valid += [e] if resolve(e, objects) == [t] else []
    if not valid:
        return None
    shortest = min(len(e.text().split()) for e in valid)  # short expressions, as RefCOCO's
    pool = [e for e in valid if len(e.text().split()) <= shortest + 2]
    return pool[int(rng.integers(len(pool)))]


def make_expression(objects: list[SceneObject], t: int, rng: np.random.Generator) -> Expression | None:
    """An expression naming ``objects[t]``: a kind drawn by :data:`KIND_P`, the others as fallback."""
    first = KINDS[int(rng.choice(len(KINDS), p=KIND_P))]
    for kind in [first, *(k for k in KINDS if k != first)]:
        if (expr := _try(kind, objects, t, rng)) is not None:
            return expr
    return None


def render(objects: list[SceneObject], labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[S, S, 3]``: a flat dark background and each object's visible pixels in its colour."""
    image = np.empty((*labels.shape, 3), dtype=np.uint8)
    image[:] = rng.integers(10, 45, size=3)
    for i, o in enumerate(objects):
        image[labels == i] = o.rgb
    return image


# ------------------------------------------------------------------------------------ public
def scene_rng(split: str, index: int, seed: int, stream: int = STREAM) -> np.random.Generator:
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    return np.random.default_rng([int(seed), stream, SPLIT_IDS[split], int(index)])


def generate_sample(
    split: str, index: int, *, image_size: int = IMAGE_SIZE, seed: int = 0
) -> SyntheticSample:
    """Sample ``index`` of ``split`` (deterministic in ``(split, index, seed)``); ``expression`` is
    this module's :class:`Expression`."""
    rng = scene_rng(split, index, seed)
    while True:
        scene = make_scene(rng, split, image_size)
        if scene is None:
            continue
        objects, t, labels = scene
        if (expr := make_expression(objects, t, rng)) is not None:
            return SyntheticSample(image=render(objects, labels, rng), mask=labels == t, sentence=expr.text(),
                                   target_index=t, objects=objects, expression=expr,  # type: ignore[arg-type]
                                   id=f"world_v2/{split}/{seed}/{index}")


class WorldV2Dataset(SyntheticReferDataset):
    """Lazily generated split of world v2; items as ``synthetic.SyntheticReferDataset``'s:
    ``image`` uint8 ``[S, S, 3]`` (96 px unless ``image_size`` is given), ``mask`` bool ``[S, S]``,
    ``sentence``, ``id``."""

    generate = staticmethod(generate_sample)
    default_sizes = DEFAULT_SIZES
