"""Captioned scenes of the synthetic world, for CLIP pretraining (``pretrain_clip.py``).

A scene is drawn exactly as the referring splits draw theirs (:func:`synthetic.generate_scene`:
3-6 shapes, distractors sharing the first object's colour or shape); its caption joins one to
three clauses with "and", each about objects the caption has not mentioned yet:

* object:   ``a large red circle``
* position: ``the blue square at the top left`` (the scene in thirds; the object's centre lies at
  least :data:`POSITION_MARGIN` from the thirds' borders)
* relation: ``a triangle left of the small green circle`` (``left of``/``right of``/``above``/
  ``below`` with the referring world's margin; ``nearest to``: the object nearest to the anchor
  among all others, by the referring world's distance margin)

Every noun phrase names exactly one object of the scene (a random unique subset of its size,
colour and shape, or all three), so each attribute word has a referent: :class:`Mention` records
``(word index, object index, role)``, which the patch-word alignment figure scores. Captions have
at most :data:`MAX_WORDS` words, each a single CLIP BPE token, so they fit the demo's 17-token
context with SOT and EOT. Pure numpy; sample ``i`` of a split is deterministic in
``(seed, split, i)`` and comes from a seed stream disjoint from the referring splits' streams.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

try:  # a script run of this folder (pretrain_clip.py) imports siblings by plain name
    from synthetic import ATTRS, AXIS_MARGIN, DIST_MARGIN, Phrase, SceneObject, generate_scene
except ModuleNotFoundError:  # imported as examples.cris_clip.captions (tests)
    from .synthetic import ATTRS, AXIS_MARGIN, DIST_MARGIN, Phrase, SceneObject, generate_scene

CAPTION_SPLITS: dict[str, int] = {"train": 0, "val": 1}  # val: the held-out scenes
STREAM = 100  # seed-sequence tag of the caption world: [seed, STREAM, split, index]
MAX_WORDS = 15  # + SOT + EOT = the demo CLIP's context length (17)
POSITION_MARGIN = 0.05  # min distance of an object's centre from the borders of the thirds
ARTICLES: tuple[str, ...] = ("a", "the")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "nearest to")
POSITIONS: tuple[tuple[str, ...], ...] = (  # [row][column] of the object's centre, in thirds
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the middle", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)
CLAUSE_COUNTS, CLAUSE_COUNT_P = (1, 2, 3), (0.25, 0.45, 0.3)
CLAUSE_KINDS, CLAUSE_KIND_P = ("object", "position", "relation"), (0.3, 0.35, 0.35)

Token = tuple[str, int | None, str | None]  # (word, object it names or None, role or None)


@dataclass(frozen=True)
class Mention:
    """Word ``word`` (index into ``caption.text.split()``) names ``role`` of object ``obj``."""

    word: int
    obj: int
    role: str  # "size", "colour" or "shape"


@dataclass(frozen=True)
class Caption:
    text: str
    mentions: tuple[Mention, ...]


@dataclass
class CaptionSample:
    """A rendered scene and its caption: ``image`` uint8 ``[S, S, 3]``, ``labels`` int8 ``[S, S]``
    (object index, -1 = background), ``objects``, ``caption``, ``id``."""

    image: np.ndarray
    labels: np.ndarray
    objects: list[SceneObject]
    caption: Caption
    id: str


def describable(objects: list[SceneObject]) -> list[int]:
    """Objects whose (size, colour, shape) no other object of the scene shares."""
    full = [(o.size, o.colour, o.shape) for o in objects]
    return [i for i, f in enumerate(full) if full.count(f) == 1]


def noun_phrase(objects: list[SceneObject], i: int, rng: np.random.Generator) -> list[Token]:
    """``a|the [size] [colour] shape|'shape'`` naming only ``objects[i]`` (which must be describable):
    all three attributes half of the time, otherwise a random unique subset."""
    o = objects[i]
    unique = [p for k in (1, 2, 3) for attrs in itertools.combinations(ATTRS, k)
              if sum((p := Phrase(**{a: getattr(o, a) for a in attrs})).matches(x) for x in objects) == 1]
    phrase = unique[-1] if rng.random() < 0.5 else unique[int(rng.integers(len(unique)))]
    tokens: list[Token] = [(ARTICLES[int(rng.integers(len(ARTICLES)))], None, None)]
    tokens += [(getattr(phrase, role), i, role) for role in ATTRS if getattr(phrase, role) is not None]
    return tokens + ([("shape", None, None)] if phrase.shape is None else [])


def position(o: SceneObject) -> str | None:
    """Where the object's centre lies in the scene's thirds, or None too close to a border."""
    def third(v: float) -> int | None:
        return min(int(v * 3), 2) if min(abs(v - 1 / 3), abs(v - 2 / 3)) >= POSITION_MARGIN else None

    row, col = third(o.cy), third(o.cx)
    return None if row is None or col is None else POSITIONS[row][col]


def holds(relation: str, objects: list[SceneObject], t: int, a: int) -> bool:
    """Whether ``objects[t] <relation> objects[a]`` holds clearly (the referring world's margins)."""
    o, n = objects[t], objects[a]
    if relation == "nearest to":
        others = [np.hypot(x.cx - n.cx, x.cy - n.cy) for k, x in enumerate(objects) if k not in (t, a)]
        return not others or np.hypot(o.cx - n.cx, o.cy - n.cy) + DIST_MARGIN <= min(others)
    gap = {"left of": n.cx - o.cx, "right of": o.cx - n.cx, "above": n.cy - o.cy, "below": o.cy - n.cy}
    return gap[relation] >= AXIS_MARGIN


def make_caption(
    objects: list[SceneObject], rng: np.random.Generator, *, max_words: int = MAX_WORDS
) -> Caption:
    """A true caption of the scene (see the module docstring); needs one describable object."""
    free = [int(i) for i in rng.permutation(describable(objects))]
    if not free:
        raise ValueError("no object of the scene has a unique description")
    tokens: list[Token] = []
    for _ in range(int(rng.choice(CLAUSE_COUNTS, p=CLAUSE_COUNT_P))):
        if not free:
            break
        t = free.pop()
        kind = CLAUSE_KINDS[int(rng.choice(len(CLAUSE_KINDS), p=CLAUSE_KIND_P))]
        clause, used = noun_phrase(objects, t, rng), []
        if kind == "position" and (where := position(objects[t])) is not None:
            clause += [(w, None, None) for w in where.split()]
        elif kind == "relation":
            for a in free:
                valid = [r for r in RELATIONS if holds(r, objects, t, a)]
                if valid:
                    relation = valid[int(rng.integers(len(valid)))]
                    clause += [(w, None, None) for w in relation.split()] + noun_phrase(objects, a, rng)
                    used.append(a)
                    break
        joined = tokens + ([("and", None, None)] if tokens else []) + clause
        if len(joined) > max_words:
            break
        tokens = joined
        free = [a for a in free if a not in used]
    mentions = tuple(Mention(k, obj, role) for k, (_, obj, role) in enumerate(tokens) if obj is not None)
    return Caption(" ".join(w for w, _, _ in tokens), mentions)  # type: ignore[arg-type]


def caption_sample(split: str, index: int, *, seed: int = 0, image_size: int = 64) -> CaptionSample:
    """Scene ``index`` of caption split ``split`` ("train" or "val"), deterministic in its arguments."""
    if split not in CAPTION_SPLITS:
        raise ValueError(f"split must be one of {sorted(CAPTION_SPLITS)}, got {split!r}")
    rng = np.random.default_rng([int(seed), STREAM, CAPTION_SPLITS[split], int(index)])
    while True:
        objects, image, labels = generate_scene(rng, image_size=image_size)
        if describable(objects):
            return CaptionSample(image, labels, objects, make_caption(objects, rng),
                                 f"captions/{split}/{seed}/{index}")
