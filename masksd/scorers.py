"""Scorers: which tokens a masked branch keeps before masking a random share of them.

A scorer maps one step's ``DistillContext`` and the masked modality to scores over that
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
* any callable ``scorer(context, modality) -> [B, N_u]``.

A tower (or tap) may give scoring features other than the tokens the decoder consumes,
``Encoded.scoring`` (CLIP ViT dense-alignment features: ``masksd.adapters.clip_dense``); the
token scorers read those (``masksd.towers.scoring_tokens``).

Units are the grid the scores live on. When a tower's (or a tap's) scoring tokens lie on a
coarser grid than the embedded tokens (a CNN's last stage over its stem), selection happens on
that grid and the boolean mask is expanded onto the embedded grid (``masksd.masking.expand_mask``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from masksd.masking import correlation_scores, expand_mask, shrink_mask
from masksd.towers import Encoded, align_scores, scoring_tokens

if TYPE_CHECKING:
    from masksd.objectives.base import DistillContext

__all__ = ["SCORERS", "Needs", "Units", "register_scorer", "score", "scorer_needs", "surgery_scores", "units_of"]

Scorer = Callable[["DistillContext", str], Tensor]
Needs = Literal["tokens", "other_global", "other_tokens", "image"]
NEEDS: tuple[str, ...] = ("tokens", "other_global", "other_tokens", "image")


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., Tensor]
    needs: tuple[Needs, ...]


_REGISTRY: dict[str, _Entry] = {}


def register_scorer(name: str, *, needs: tuple[Needs, ...] = ()) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a scorer under ``name`` (``BranchConfig(scorer=name)``), with what it needs from the
    model, checked when the wrapper is built: ``"tokens"`` (the masked modality's scoring tokens),
    ``"other_global"`` (the other modality's global feature, or its tokens to pool),
    ``"other_tokens"`` (the other modality's tokens), ``"image"`` (images only).

    The function is ``fn(context, modality, *, metric, surgery) -> [B, N_u]`` scores (see the module
    docstring); a decorator::

        @register_scorer("saliency", needs=("image",))
        def saliency(context, modality, *, metric, surgery): ...
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


@dataclass
class Units:
    """Where selection happens for one modality.

    Attributes:
        maskable: ``[B, N_u]`` bool, units that may be kept and masked.
        grid: ``(h_u, w_u)`` of the units, or None for sequences.
        embedded_grid: ``(h, w)`` of the embedded tokens (None for sequences).
        coarse: True when units are coarser than the embedded tokens (masks get expanded).
    """

    maskable: Tensor
    grid: tuple[int, int] | None
    embedded_grid: tuple[int, int] | None
    coarse: bool

    def expand(self, unit_mask: Tensor, embedded_maskable: Tensor) -> Tensor:
        """``[B, N_u]`` unit mask → ``[B, N]`` mask over the embedded tokens."""
        if not self.coarse:
            return unit_mask
        assert self.grid is not None and self.embedded_grid is not None
        return expand_mask(unit_mask, self.grid, self.embedded_grid) & embedded_maskable


def units_of(context: DistillContext, modality: str) -> Units:
    """The units of ``modality`` this step (see the module docstring)."""
    embedded = context.embedded(modality)
    encoded = context.encoded(modality)
    count = embedded.tokens.shape[1]
    declared = embedded.extras.get("units") if isinstance(embedded.extras, dict) else None
    if declared is not None and embedded.grid is not None and tuple(declared) != tuple(embedded.grid):
        if encoded is not None and _declared(encoded) and encoded.grid is not None and encoded.grid != tuple(declared):
            raise ValueError(
                f"ModalitySpec.units is {tuple(declared)} but the {modality} scoring tokens lie on a "
                f"{encoded.grid} grid; drop units= (the tokens' grid is used) or tap tokens on that grid"
            )
        grid = tuple(declared)
        return Units(shrink_mask(embedded.maskable, embedded.grid, grid), grid, embedded.grid, coarse=True)  # type: ignore[arg-type]
    if encoded is not None and encoded.grid is not None and embedded.grid is not None:
        if encoded.grid != embedded.grid and encoded.tokens.shape[1] != count:
            maskable = shrink_mask(embedded.maskable, embedded.grid, encoded.grid)
            return Units(maskable, encoded.grid, embedded.grid, coarse=True)
    return Units(embedded.maskable, embedded.grid, embedded.grid, coarse=False)


@register_scorer("correlation", needs=("tokens", "other_global"))
def _correlation(context: DistillContext, modality: str, *, metric: str, surgery: bool) -> Tensor:
    encoded, other = context.encoded(modality), context.encoded("text" if modality == "image" else "image")
    if encoded is None or other is None or not _declared(encoded):
        raise ValueError(
            f"scorer 'correlation' needs scoring features: {modality} tokens and the other modality's "
            "global feature in one space (towers provide them; for a hooked model declare "
            f"HookSpec.{modality}.tokens and the other modality's global_/tokens), or choose "
            "scorer='prediction' or 'random'"
        )
    tokens, guide = scoring_tokens(encoded).detach(), other.global_feature.detach()
    scores = surgery_scores(guide, tokens, metric=metric) if surgery else correlation_scores(guide, tokens, metric=metric)
    return _onto_units(context, modality, scores)


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


def _declared(encoded: Any) -> bool:
    """False when a hooked model's encoded tokens are a stand-in (no ``tokens`` tap declared)."""
    return not (isinstance(encoded, Encoded) and isinstance(encoded.features, dict)
                and encoded.features.get("declared_tokens") is False)


def _onto_units(context: DistillContext, modality: str, scores: Tensor) -> Tensor:
    """Scores over the encoded tokens → over the units (legacy towers: onto the embedded tokens)."""
    embedded = context.embedded(modality)
    if scores.shape[1] != embedded.tokens.shape[1] and units_of(context, modality).coarse is False:
        scores = align_scores(getattr(context.model, f"{modality}_tower", None), scores, embedded)
    return scores


@register_scorer("late_interaction", needs=("tokens", "other_tokens"))
def _late_interaction(context: DistillContext, modality: str, *, metric: str, surgery: bool) -> Tensor:
    other = "text" if modality == "image" else "image"
    mine, theirs = context.encoded(modality), context.encoded(other)
    if mine is None or theirs is None or not (_declared(mine) and _declared(theirs)):
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
    embedded = context.embedded(other)
    if other == "text" and embedded.maskable.shape[1] == others.shape[1]:
        valid = embedded.maskable
    else:
        valid = torch.ones(others.shape[:2], dtype=torch.bool, device=others.device)
    similarity = similarity.masked_fill(~valid[:, None, :], float("-inf"))
    scores = torch.where(valid.any(dim=1, keepdim=True), similarity.amax(dim=-1), similarity.new_zeros(()))
    return _onto_units(context, modality, scores)


@register_scorer("prediction", needs=("image",))
def _prediction(context: DistillContext, modality: str, *, metric: str, surgery: bool) -> Tensor:
    units = units_of(context, modality)
    if modality != "image" or units.grid is None:
        raise ValueError(
            "scorer 'prediction' pools the main prediction onto the image grid: it works for images "
            "only (use 'random' or 'correlation' for words)"
        )
    probability = torch.sigmoid(context.main_logits.detach().float())
    pooled = F.adaptive_avg_pool2d(probability, units.grid)
    return rearrange(pooled, "b 1 h w -> b (h w)")


@register_scorer("random")
def _random(context: DistillContext, modality: str, *, metric: str, surgery: bool) -> Tensor:
    maskable = units_of(context, modality).maskable
    return torch.rand(maskable.shape, generator=context.generator, device=maskable.device)


def score(
    context: DistillContext, modality: str, scorer: str | Scorer, *, metric: str = "dot", surgery: bool = False
) -> Tensor:
    """Scores ``[B, N_u]`` of ``modality``'s units under ``scorer`` (see the module docstring);
    ``surgery`` applies to ``"correlation"`` only."""
    if surgery and scorer != "correlation":
        raise ValueError(f"surgery=True works with scorer='correlation' only, got {getattr(scorer, '__name__', scorer)!r}")
    if callable(scorer):
        scores: Any = scorer(context, modality)
    else:
        scorer_needs(scorer)  # a name registered since the config was built is fine; others are refused
        scores = _REGISTRY[scorer].fn(context, modality, metric=metric, surgery=surgery)
    expected = tuple(units_of(context, modality).maskable.shape)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != expected:
        raise ValueError(
            f"scorer {getattr(scorer, '__name__', scorer)!r} for {modality} must return scores of shape "
            f"{expected}, got {tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
        )
    return scores


SCORERS: tuple[str, ...] = tuple(_REGISTRY)  # the built-in scorers' names
