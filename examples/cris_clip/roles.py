"""The role of every word of a synthetic referring expression, for VMLSD's selection diagnostic.

The synthetic grammar (``synthetic.Expression.text``) has four sentence forms::

    the [size] [colour] <noun>                                   attribute
    the [size] [colour] <noun> <relation> the [size] [colour] <noun>   relation (to an anchor)
    the <ordinal> [size] [colour] <noun> from the <direction>   ordinal
    the <superlative> [size] [colour] <noun>                     superlative

where ``<noun>`` is a shape or the word "shape"; world v2 (``world_v2.py``) adds a location word
before or after the phrase (``left circle``, ``circle on top``) and the relation ``near``. Each
word gets one of :data:`ROLE_NAMES`: ``target_attribute`` (size/colour of the referent),
``target_noun``, ``relation`` (relation, ordinal, superlative and direction words), ``anchor`` (the
words naming the other object of a relation: the distractor a model must not segment) and
``function`` ("the"). ``token_roles``
spreads them over the CLIP BPE positions the model sees (a word may be several tokens); SOT,
EOT and padding get -1, which ``masksd.diagnostics.kept_by_role`` ignores.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # a script run of this folder (train.py) imports siblings by plain name
    from synthetic import COLOURS, DIRECTIONS, ORDINALS, RELATIONS, SHAPES, SIZES, SUPERLATIVES
    from world_v2 import RELATIONS as RELATIONS_V2
except ModuleNotFoundError:  # imported as examples.cris_clip.roles (tests)
    from .synthetic import COLOURS, DIRECTIONS, ORDINALS, RELATIONS, SHAPES, SIZES, SUPERLATIVES
    from .world_v2 import RELATIONS as RELATIONS_V2

ROLE_NAMES: tuple[str, ...] = ("target_attribute", "target_noun", "relation", "anchor", "function")
_ATTRIBUTES = frozenset(SIZES) | frozenset(COLOURS)
_NOUNS = frozenset(SHAPES) | {"shape"}
_RELATION_WORDS = frozenset(w for r in (*RELATIONS, *RELATIONS_V2) for w in r.split())
# "of", "to", ...: the anchor follows
_ANCHOR_NEXT = frozenset(r.split()[-1] for r in (*RELATIONS, *RELATIONS_V2))
_POSITION_WORDS = (frozenset(DIRECTIONS) | frozenset(SUPERLATIVES.values()) | frozenset(ORDINALS)
                   | {"from", "on"})


def word_roles(sentence: str) -> list[int]:
    """Role id (index into :data:`ROLE_NAMES`) of every word of ``sentence.split()``.

    Raises:
        ValueError: a word outside the synthetic grammar's vocabulary.
    """
    roles, after_relation = [], False
    for word in sentence.split():
        if word == "the":
            role = "function"
        elif word in _ATTRIBUTES or word in _NOUNS:
            role = "anchor" if after_relation else ("target_noun" if word in _NOUNS else "target_attribute")
        elif word in _RELATION_WORDS:  # "left" of "left circle" is a location, "of" then names the anchor
            role, after_relation = "relation", after_relation or word in _ANCHOR_NEXT
        elif word in _POSITION_WORDS:
            role = "relation"
        else:
            raise ValueError(f"{word!r} in {sentence!r} is not a word of the synthetic grammar")
        roles.append(ROLE_NAMES.index(role))
    return roles


def token_roles(sentence: str, tokenizer, context_length: int) -> Tensor:
    """``[context_length]`` int64: the role of the word each BPE position belongs to, -1 elsewhere.

    Positions follow open_clip's layout: SOT, the words' BPE tokens (truncated so that EOT fits),
    EOT, zero padding.
    """
    out = torch.full((context_length,), -1, dtype=torch.int64)
    position = 1  # after SOT
    for word, role in zip(sentence.split(), word_roles(sentence), strict=True):
        for _ in tokenizer.encode(word):
            if position >= context_length - 1:
                return out
            out[position] = role
            position += 1
    return out
