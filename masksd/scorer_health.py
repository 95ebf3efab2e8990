"""Degenerate scores: when a scorer's "ranking" carries no information, say so.

A correlation scorer ranks tokens by ``global · token``. If the global feature is (nearly) zero
— LAVT's PWAM ``f_query`` ends in ``InstanceNorm1d(affine=False)``, so the mean of its pixel
tokens is 0 up to float noise (norm 6e-7 against a token norm of 27.7) — every score is float
noise and top-K keeps an arbitrary subset while looking like guided selection. The same happens
when all scores of a sample are equal, or when most of them tie (a ReLU'd tap with many zeros).

``score_problem(step, modality, scores)`` returns a message naming the problem and the fix,
or None. The guided-masking objectives call it on their first training step (a warning) and on
every ``wrapper.check(...)`` (listed in the report's ``warnings``). Cost: one sort of the
``[B, N_u]`` scores, once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from masksd.step import Step
from masksd.towers import scoring_tokens

__all__ = ["MasksdWarning", "score_problem"]

#: relative size below which a global feature counts as zero (against its tokens' norm)
GLOBAL_NORM_RATIO = 1e-4
#: relative spread below which a sample's scores count as all equal
FLAT_SPREAD = 1e-6
#: share of tied units (over the maskable ones, averaged over samples) that counts as "most"
TIED_SHARE = 0.5


class MasksdWarning(UserWarning):
    """A warning from masksd about how a model is wrapped (filter it with ``warnings``)."""


def _global_problem(step: Step, modality: str) -> str | None:
    other = "text" if modality == "image" else "image"
    theirs, mine = step.encoded(other), step.encoded(modality)
    if theirs is None or mine is None:
        return None
    global_norm = theirs.global_feature.detach().float().norm(dim=-1).median()
    token_norm = scoring_tokens(mine).detach().float().norm(dim=-1).median()
    if token_norm > 0 and global_norm < GLOBAL_NORM_RATIO * token_norm:
        return (
            f"the {other} global feature is nearly zero (median norm {float(global_norm):.3g} against "
            f"{float(token_norm):.3g} for the {modality} tokens), so every {modality} score is float noise. "
            f"Is the {other} tap after a zero-mean normalisation (InstanceNorm1d(affine=False), as LAVT's "
            f"PWAM f_query)? Fix: tap the module before the normalisation (e.g. Tap('...f_query.0')), "
            f"declare HookSpec.{other}.global_ from a feature that is not zero-mean, or choose "
            "scorer='late_interaction', 'prediction' or 'random'"
        )
    return None


def _flat_or_tied(scores: Tensor, maskable: Tensor) -> str | None:
    scores = scores.detach().float()
    counts = maskable.sum(1)
    rows = counts >= 2
    if not rows.any():
        return None
    high = scores.masked_fill(~maskable, float("-inf")).amax(1)
    low = scores.masked_fill(~maskable, float("inf")).amin(1)
    scale = scores.abs().masked_fill(~maskable, 0).amax(1)
    flat = ((high - low) <= FLAT_SPREAD * scale) | ~torch.isfinite(high - low)
    if flat[rows].all():
        return "all scores of every sample are equal (the scoring features do not vary over the tokens)"
    ordered = scores.masked_fill(~maskable, float("nan")).sort(dim=1).values
    equal_next = (ordered[:, 1:] == ordered[:, :-1]).float().sum(1)  # NaN never compares equal
    tied = (equal_next / (counts - 1).clamp(min=1))[rows].mean()
    if tied > TIED_SHARE:
        return (
            f"{float(tied):.0%} of the scores tie with a neighbour (many tokens score exactly the same, "
            "e.g. a ReLU'd tap full of zeros), so top-K picks among them arbitrarily"
        )
    return None


def score_problem(step: Step, modality: str, scores: Tensor, maskable: Tensor, scorer: object) -> str | None:
    """A message when ``scores [B, N_u]`` of ``modality`` (over ``maskable [B, N_u]`` units) carry
    no ranking, else None (see the module docstring). ``random`` scorers are never checked."""
    if scorer == "random":
        return None
    name = getattr(scorer, "__name__", scorer)
    problem = _global_problem(step, modality) if scorer == "correlation" else None
    if problem is None:
        flat = _flat_or_tied(scores, maskable)
        if flat is not None:
            others = ", ".join(repr(o) for o in ("late_interaction", "prediction", "random") if o != scorer)
            source = ("the main prediction is coarser than the units or saturated" if scorer == "prediction"
                      else f"tap a feature that varies over the {modality} tokens")
            problem = f"{flat}. Fix: {source}, or choose another scorer ({others})"
    return None if problem is None else f"scorer {name!r} for {modality} tokens is degenerate: {problem}"
