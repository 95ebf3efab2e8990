"""Scorers: which tokens a masked branch keeps before masking a random share of them.

A scorer maps one step's ``Step`` and the masked modality to scores over that
modality's *units* (``[B, N_u]``, higher = keep first):

* ``"correlation"`` (the paper, Eqs. 3 and 6): each token's scoring feature against the other
  modality's global feature (dot product, or cosine); needs one shared space (CLIP's joint
  embedding, or any pair of taps that live in one space). With ``surgery=True`` (CLIP
  Surgery's feature surgery, Li et al. 2023), token ``i`` of sample ``b`` scores
  ``s(i, b) - mean_c s(i, c)`` over the batch's ``B`` global features ``c``: what a token shares
  with every sentence of the batch (the background's generic match to any text) is removed.
* ``"prediction"``: the main branch's own foreground probability ``sigmoid(M_seg)``, average
  pooled onto the image unit grid: a model-agnostic stand-in for models without a shared
  space (images only).
* ``"late_interaction"``: each token's best match among the other modality's *tokens*
  (ColBERT's / FILIP's MaxSim: a patch scores ``max_j v_i · w_j`` over the real words, a word
  ``max_i w_j · v_i`` over the patches) instead of against one global feature; needs both
  modalities' tokens in one space. For a CLIP whose global sentence feature does not point at
  the referent's patches while its words do (``docs/benchmarks.md`` §2).
* ``"random"``: uniform scores (an ablation: top-K becomes a random subset).
* any callable ``scorer(step, modality) -> [B, N_u]``.

A tower (or tap) may give scoring features other than the tokens the decoder consumes,
``Encoded.scoring`` (CLIP ViT dense-alignment features: ``masksd.adapters.clip_dense``); the
token scorers read those (``masksd.towers.scoring_tokens``).

Scores live on the modality's units (``masksd.step.Units``): the embedded tokens, or a coarser
scoring grid onto which masks are expanded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from masksd.masking import correlation_scores
from masksd.step import Step, other
from masksd.towers import align_scores, scoring_tokens

__all__ = ["SCORERS", "Needs", "register_scorer", "score", "scorer_needs", "surgery_scores"]

Scorer = Callable[[Step, str], Tensor]
Needs = Literal["tokens", "other_global", "other_tokens", "image"]
NEEDS: tuple[str, ...] = ("tokens", "other_global", "other_tokens", "image")


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., Tensor]
    needs: tuple[Needs, ...]


_REGISTRY: dict[str, _Entry] = {}


def register_scorer(
    name: str, *, needs: tuple[Needs, ...] = ()
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a scorer under ``name`` (``BranchConfig(scorer=name)``), with what it needs from the
    model, checked when the wrapper is built: ``"tokens"`` (the masked modality's scoring tokens),
    ``"other_global"`` (the other modality's global feature, or its tokens to pool),
    ``"other_tokens"`` (the other modality's tokens), ``"image"`` (images only).

    The function is ``fn(step, modality, *, metric, surgery) -> [B, N_u]`` scores (see the module
    docstring); a decorator::

        @register_scorer("saliency", needs=("image",))
        def saliency(step, modality, *, metric, surgery): ...
    """
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"register_scorer({name!r}): unknown needs {unknown}; choose from {NEEDS}")

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        _REGISTRY[name] = _Entry(fn, tuple(needs))
        return fn

    return add


def scorer_needs(name: str) -> tuple[Needs, ...]:
    """What the registered scorer ``name`` needs (``register_scorer``); ValueError when unknown."""
    if name not in _REGISTRY:
        raise ValueError(f"scorer must be one of {tuple(_REGISTRY)} or a callable, got {name!r}")
    return _REGISTRY[name].needs


@register_scorer("correlation", needs=("tokens", "other_global"))
def _correlation(step: Step, modality: str, *, metric: str, surgery: bool) -> Tensor:
    encoded, theirs = step.encoded(modality), step.encoded(other(modality))
    if encoded is None or theirs is None or not step.view(modality).tokens_declared:
        raise ValueError(
            f"scorer 'correlation' needs scoring features: {modality} tokens and the other modality's "
            "global feature in one space (towers provide them; for a hooked model declare "
            f"HookSpec.{modality}.tokens and the other modality's global_/tokens), or choose "
            "scorer='prediction' or 'random'"
        )
    tokens, guide = scoring_tokens(encoded).detach(), theirs.global_feature.detach()
    scores = (surgery_scores(guide, tokens, metric=metric) if surgery
              else correlation_scores(guide, tokens, metric=metric))
    return _onto_units(step, modality, scores)


def surgery_scores(global_feature: Tensor, tokens: Tensor, *, metric: str = "dot") -> Tensor:
    """Correlation after feature surgery (``surgery=True``, module docstring): ``[B, N]`` float32.

    ``s(i, b) - mean_c s(i, c)`` with ``s(i, c)`` = token ``i`` of sample ``b`` against global feature
    ``c`` (``metric`` as in ``correlation_scores``), i.e. ``t_i · (g_b - mean_c g_c)`` (cosine: of the
    unit vectors). The mean runs over this batch (this process's under DDP). A batch of one has
    nothing to subtract, so it gets the plain correlation scores.

    Args:
        global_feature: ``[B, D]`` the other modality's global features.
        tokens: ``[B, N, D]`` scoring features of the masked modality.
        metric: ``"dot"`` or ``"cosine"``.
    """
    if global_feature.shape[0] < 2 or global_feature.shape != (tokens.shape[0], tokens.shape[-1]):
        return correlation_scores(global_feature, tokens, metric=metric)  # type: ignore[arg-type]  # (or its error)
    with torch.autocast(tokens.device.type, enabled=False):
        guide, tokens = global_feature.float(), tokens.float()
        if metric == "cosine":
            guide, tokens = F.normalize(guide, dim=-1), F.normalize(tokens, dim=-1)
        centred = guide - guide.mean(dim=0, keepdim=True)
        return torch.einsum("bd,bnd->bn", centred, tokens)


def _onto_units(step: Step, modality: str, scores: Tensor) -> Tensor:
    """Scores over the encoded tokens → over the units (legacy towers: onto the embedded tokens)."""
    embedded = step.embedded(modality)
    if scores.shape[1] != embedded.tokens.shape[1] and step.view(modality).units.coarse is False:
        scores = align_scores(getattr(step.model, f"{modality}_tower", None), scores, embedded)
    return scores


@register_scorer("late_interaction", needs=("tokens", "other_tokens"))
def _late_interaction(step: Step, modality: str, *, metric: str, surgery: bool) -> Tensor:
    side = other(modality)
    mine, theirs = step.encoded(modality), step.encoded(side)
    if mine is None or theirs is None or not (
        step.view(modality).tokens_declared and step.view(side).tokens_declared
    ):
        raise ValueError(
            "scorer 'late_interaction' needs the token features of both modalities in one space "
            "(towers provide them; for a hooked model declare HookSpec.image.tokens and "
            "HookSpec.text.tokens), or choose scorer='correlation', 'prediction' or 'random'"
        )
    with torch.autocast(mine.tokens.device.type, enabled=False):
        ours, others = scoring_tokens(mine).detach().float(), scoring_tokens(theirs).detach().float()
        if metric == "cosine":
            ours, others = F.normalize(ours, dim=-1), F.normalize(others, dim=-1)
        similarity = torch.einsum("bnd,bmd->bnm", ours, others)
    # the other side's real tokens: words that may be masked (no SOT/EOT/padding); every patch
    embedded = step.embedded(side)
    if side == "text" and embedded.maskable.shape[1] == others.shape[1]:
        valid = embedded.maskable
    else:
        valid = torch.ones(others.shape[:2], dtype=torch.bool, device=others.device)
    similarity = similarity.masked_fill(~valid[:, None, :], float("-inf"))
    scores = torch.where(valid.any(dim=1, keepdim=True), similarity.amax(dim=-1), similarity.new_zeros(()))
    return _onto_units(step, modality, scores)


@register_scorer("prediction", needs=("image",))
def _prediction(step: Step, modality: str, *, metric: str, surgery: bool) -> Tensor:
    units = step.view(modality).units
    if modality != "image" or units.grid is None:
        raise ValueError(
            "scorer 'prediction' pools the main prediction onto the image grid: it works for images "
            "only (use 'random' or 'correlation' for words)"
        )
    probability = torch.sigmoid(step.logits.detach().float())
    pooled = F.adaptive_avg_pool2d(probability, units.grid)
    return rearrange(pooled, "b 1 h w -> b (h w)")


@register_scorer("random")
def _random(step: Step, modality: str, *, metric: str, surgery: bool) -> Tensor:
    maskable = step.view(modality).units.maskable
    return torch.rand(maskable.shape, generator=step.generator, device=maskable.device)


def score(
    step: Step, modality: str, scorer: str | Scorer, *, metric: str = "dot", surgery: bool = False
) -> Tensor:
    """Scores ``[B, N_u]`` of ``modality``'s units under ``scorer`` (see the module docstring);
    ``surgery`` applies to ``"correlation"`` only."""
    if surgery and scorer != "correlation":
        raise ValueError(
            f"surgery=True works with scorer='correlation' only, got {getattr(scorer, '__name__', scorer)!r}"
        )
    if callable(scorer):
        scores: Any = scorer(step, modality)
    else:
        scorer_needs(scorer)  # a name registered since the config was built is fine; others are refused
        scores = _REGISTRY[scorer].fn(step, modality, metric=metric, surgery=surgery)
    expected = tuple(step.view(modality).units.maskable.shape)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != expected:
        raise ValueError(
            f"scorer {getattr(scorer, '__name__', scorer)!r} for {modality} must return scores of shape "
            f"{expected}, got {tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
        )
    return scores


SCORERS: tuple[str, ...] = tuple(_REGISTRY)  # the built-in scorers' names
