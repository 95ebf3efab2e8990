"""Dense alignment for the CLIP v2 pretraining (``pretrain_clip.py --preset v2``, issue 16 item 2).

Captions of world v2 scenes (:func:`caption_sample`): one object (60 %) or two ("... and ..."), each
described by a world v2 expression of that object (``blue circle``, ``circle on left``, ``square near
red circle``), from a seed stream disjoint from the referring splits. Besides CLIP's global loss and
the word-patch MaxSim, :func:`dense_losses` adds two within-image contrasts that use the generator's
object masks (``labels``) — our pretraining stands in for real CLIP, so it may read them:

* sentence → patch: over the image's patches, a softmax of ``sentence · patch`` should put its mass
  on the patches of the objects the caption is *about* (each clause's subject, not its anchor), in
  proportion to their coverage — the ranking LMVSD's correlation filtering reads;
* word → patch: the same for every size/colour/shape word and the object it names (the anchor's
  words name the anchor) — the ranking of late interaction.

Each is the mean of a dot-product form (the paper's ``metric="dot"``: no normalisation, no
temperature) and a cosine form at CLIP's temperature (``metric="cosine"``).
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from einops import einsum
from torch import Tensor
from torch.utils.data import Dataset

from masksd.towers import Encoded

try:  # a script run of this folder (pretrain_clip.py) imports siblings by plain name
    from captions import Caption, CaptionSample, Mention
    from data import letterbox
    from pretrain_metrics import coverage
    from world_v2 import Expression, make_expression, make_scene, render, scene_rng
except ModuleNotFoundError:  # imported as examples.cris_clip.pretrain_dense (tests)
    from .captions import Caption, CaptionSample, Mention
    from .data import letterbox
    from .pretrain_metrics import coverage
    from .world_v2 import Expression, make_expression, make_scene, render, scene_rng

STREAM = 300  # seed-sequence tag of the v2 caption world: [seed, STREAM, split id, index]
TWO_CLAUSES_P = 0.4
ROLES = ("size", "colour", "shape")

Token = tuple[str, int | None, str | None]  # (word, object it names or None, role or None)


def expression_tokens(expr: Expression, target: int, anchor: int | None) -> list[Token]:
    """The words of ``expr.text()`` with the object each attribute word names."""
    def phrase(p: Any, obj: int | None) -> list[Token]:
        return [(getattr(p, r), obj, r) for r in ROLES if getattr(p, r) is not None]

    words: list[Token] = [("the", None, None)] if expr.article else []
    if expr.kind == "location" and expr.prefix:
        words.append((str(expr.direction), None, None))
    words += phrase(expr.target, target)
    if expr.kind == "location" and not expr.prefix:
        words += [("on", None, None), (str(expr.direction), None, None)]
    if expr.kind == "relation":
        words += [(w, None, None) for w in str(expr.relation).split()] + phrase(expr.anchor, anchor)
    return words


def caption_sample(split: str, index: int, *, seed: int = 0, image_size: int = 96) -> CaptionSample:
    """Caption scene ``index`` of ``split`` ("train" or "val"), deterministic in its arguments."""
    rng = scene_rng(split, index, seed, stream=STREAM)
    while True:
        scene = make_scene(rng, "train", image_size)
        if scene is None:
            continue
        objects, t, labels = scene
        subjects = [t] + ([int(rng.integers(len(objects)))] if rng.random() < TWO_CLAUSES_P else [])
        tokens: list[Token] = []
        for s in dict.fromkeys(subjects):  # a second subject equal to the first is dropped
            expr = make_expression(objects, s, rng)
            if expr is None:
                continue
            anchor = (next((i for i, o in enumerate(objects) if expr.anchor.matches(o)), None) if expr.anchor
                      else None)
            tokens += ([("and", None, None)] if tokens else []) + expression_tokens(expr, s, anchor)
        if tokens:
            mentions = tuple(Mention(k, obj, role) for k, (_, obj, role) in enumerate(tokens)
                             if obj is not None)
            return CaptionSample(render(objects, labels, rng), labels, objects,
                                 Caption(" ".join(w for w, _, _ in tokens), mentions),
                                 f"captions_v2/{split}/{seed}/{index}")


def subjects(caption: Caption) -> list[int]:
    """The object each clause (words between "and"s) is about: its first mentioned object."""
    words, out, clause_open = caption.text.split(), [], True
    by_word = {m.word: m.obj for m in caption.mentions}
    for k, w in enumerate(words):
        if w == "and":
            clause_open = True
        elif clause_open and k in by_word:
            out.append(by_word[k])
            clause_open = False
    return out


def dense_targets(sample: CaptionSample, grid: int, context_length: int) -> tuple[Tensor, Tensor]:
    """``(sentence [N], words [L, N])``: the patches' share on the caption's subjects, and on the object
    each word names (zero rows for other tokens). Caption words are single BPE tokens (after SOT)."""
    cover = coverage(sample.labels, grid, len(sample.objects))  # [objects, N]
    sentence = cover[subjects(sample.caption)].sum(0).clamp(max=1.0)
    words = torch.zeros(context_length, grid * grid)
    for m in sample.caption.mentions:
        if 1 + m.word < context_length - 1:
            words[1 + m.word] = cover[m.obj]
    return sentence, words


class DenseCaptionStream(Dataset):
    """Item ``i`` = caption scene ``i`` (or ``i mod scenes``): ``(image [3,S,S], ids [L], sentence [N],
    words [L, N])``, the targets of :func:`dense_targets`."""

    def __init__(self, split: str, *, seed: int, size: int, context_length: int, grid: int,
                 scenes: int | None = None) -> None:
        self.split, self.seed, self.size, self.scenes, self.grid = split, seed, size, scenes, grid
        self.context_length = context_length
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=context_length)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = caption_sample(self.split, index % self.scenes if self.scenes else index, seed=self.seed,
                           image_size=self.size)
        return (letterbox(s.image, self.size)[0], self.tokenizer([s.caption.text])[0],
                *dense_targets(s, self.grid, self.context_length))


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over rows with any target mass of ``-Σ p log softmax(logits)``, ``p = target / Σ target``
    (zero, with the graph kept, when no row has any)."""
    mass = target.sum(-1)
    rows = mass > 0
    if not rows.any():
        return logits.sum() * 0.0
    p = target[rows] / mass[rows, None]
    return -(p * F.log_softmax(logits[rows], dim=-1)).sum(-1).mean()


def dense_losses(
    image: Encoded, text: Encoded, sentence: Tensor, words: Tensor, scale: Tensor
) -> dict[str, Tensor]:
    """``{"dense_sentence", "dense_word"}`` for patch tokens ``[B, N, D]``, word tokens ``[B, L, D]``,
    sentence features ``[B, D]`` and the targets ``sentence [B, N]``, ``words [B, L, N]``."""
    patches, tokens, sent = image.tokens, text.tokens, text.global_feature
    unit = F.normalize(patches, dim=-1)
    dot_s = einsum(patches, sent, "b n d, b d -> b n")
    cos_s = scale * einsum(unit, F.normalize(sent, dim=-1), "b n d, b d -> b n")
    dot_w = einsum(tokens, patches, "b l d, b n d -> b l n")
    cos_w = scale * einsum(F.normalize(tokens, dim=-1), unit, "b l d, b n d -> b l n")
    return {"dense_sentence": (soft_cross_entropy(dot_s, sentence) + soft_cross_entropy(cos_s, sentence)) / 2,
            "dense_word": (soft_cross_entropy(dot_w.flatten(0, 1), words.flatten(0, 1))
                           + soft_cross_entropy(cos_w.flatten(0, 1), words.flatten(0, 1))) / 2}


def with_dense(terms: dict[str, Tensor], image: Encoded, text: Encoded, targets: list[Tensor], scale: Tensor,
               weight: float) -> dict[str, Tensor]:
    """``terms`` (``pretrain_clip.losses``) plus the dense terms, their sum × ``weight`` added to ``loss``."""
    if not targets or not weight:
        return terms
    dense = dense_losses(image, text, *targets, scale)
    return {**terms, **dense, "loss": terms["loss"] + weight * sum(dense.values())}
