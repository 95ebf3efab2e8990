"""Cross-modal alignment loss (MagNet's CAL, Chng et al., CVPR 2024): contrast the pixels (patches)
of the referred object against the background, towards the sentence (pixel-to-text) and towards the
object's own mean feature (pixel-to-prototype), using the ground-truth mask.

For one sample, with L2-normalised features ``f_i`` on a grid, the sentence ``u``, the GT
foreground fraction ``ŷ_i`` of each cell, positives ``P = {ŷ_i ≥ θ}`` (the argmax cell when that
is empty but the mask is not) and negatives ``Q = {ŷ_i = 0}`` (boundary cells are neither)::

    nce(a)  = mean_{i∈P} −log( e^{f_i·a/τ} / (e^{f_i·a/τ} + Σ_{k∈Q} e^{f_k·a/τ}) )
    L_p2t   = nce(u)
    L_p2p   = nce(normalise(mean_{i∈P} f_i))
    L_cal   = mean over samples with P ≠ ∅ and Q ≠ ∅ of (λ_t L_p2t + λ_p L_p2p)

The negatives' log-sum-exp is shared by all positives, so the cost is O(N) per sample. Features:
``"encoder"`` (default, no parameters) uses the image's scoring tokens and the sentence feature
of the main branch (they share one space: CLIP's joint embedding); ``"fused"`` uses the decoder's
fused features of the main branch's one decoder pass and a learned projection of the sentence
(the analogue of MagNet's training-only ``lang_proj``). Defaults and sources:
``CrossModalAlignmentConfig`` and docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masksd.objectives._common import (
    autocast_off,
    check_choice,
    check_fraction,
    check_int,
    check_width,
    grid_of,
    target_on_grid,
)
from masksd.objectives.base import Objective, ObjectiveOutput
from masksd.step import Step

if TYPE_CHECKING:
    from masksd.engine.runner import Runner

__all__ = ["CrossModalAlignment", "CrossModalAlignmentConfig", "alignment_loss"]

_EXCLUDED = -1e9  # stands in for -inf in the negatives' log-sum-exp (finite gradients)


@dataclass(frozen=True, kw_only=True)
class CrossModalAlignmentConfig:
    """Settings of ``CrossModalAlignment`` ([ours] throughout: MagNet's equations, temperature and
    weights could not be read; reasons in docs/objectives.md).

    Attributes:
        weight: loss weight λ_cal (>= 0). [ours] 0.1.
        features: ``"encoder"`` (image scoring tokens vs the sentence feature; no parameters) or
            ``"fused"`` (the decoder's fused features vs a learned projection of the sentence).
        temperature: τ >= 1e-4. [ours] 0.07 (CLIP's initial value), fixed.
        p2t_weight / p2p_weight: λ_t, λ_p (>= 0). [ours] 1 and 1.
        pos_threshold: a cell is positive when its foreground fraction is >= this, in (0, 1].
            [ours] 0.5.
    """

    weight: float = 0.1
    features: Literal["encoder", "fused"] = "encoder"
    temperature: float = 0.07
    p2t_weight: float = 1.0
    p2p_weight: float = 1.0
    pos_threshold: float = 0.5

    def __post_init__(self) -> None:
        check_fraction(self.weight, "weight", high=None)
        check_choice(self.features, ("encoder", "fused"), "features")
        check_fraction(self.temperature, "temperature", low=1e-4, high=None)
        check_fraction(self.p2t_weight, "p2t_weight", high=None)
        check_fraction(self.p2p_weight, "p2p_weight", high=None)
        check_fraction(self.pos_threshold, "pos_threshold", open_low=True)


def alignment_loss(
    features: Tensor,
    sentence: Tensor,
    fraction: Tensor,
    *,
    temperature: float = 0.07,
    pos_threshold: float = 0.5,
    p2t_weight: float = 1.0,
    p2p_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The CAL loss (module docstring) on given features, float32 with autocast off.

    Args:
        features: ``[B, N, D]`` per-cell features.
        sentence: ``[B, D]`` sentence features in the same space.
        fraction: ``[B, N]`` ground-truth foreground fraction of every cell, in [0, 1].

    Returns:
        ``(loss, info)``: the scalar loss (0, still in the graph, when no sample has both
        positives and negatives) and detached ``positives``/``negatives`` ``[B, N]``, ``valid``
        ``[B]``, ``p2t``/``p2p`` (means over valid samples).
    """
    if features.dim() != 3 or sentence.dim() != 2 or fraction.shape != features.shape[:2]:
        raise ValueError(
            f"alignment_loss needs features [B, N, D], sentence [B, D] and fraction [B, N]; got "
            f"{tuple(features.shape)}, {tuple(sentence.shape)}, {tuple(fraction.shape)}"
        )
    if sentence.shape != (features.shape[0], features.shape[2]):
        raise ValueError(
            f"the sentence features {tuple(sentence.shape)} do not match the pixel features "
            f"{tuple(features.shape)}: both must live in one space of the same width"
        )
    with autocast_off(features):
        f = F.normalize(features.float(), dim=-1)
        u = F.normalize(sentence.float(), dim=-1)
        fraction = fraction.detach().float()
        positive = fraction >= pos_threshold
        fallback = F.one_hot(fraction.argmax(dim=1), fraction.shape[1]).bool()
        fallback &= ((fraction.amax(dim=1) > 0) & ~positive.any(dim=1))[:, None]
        positive = positive | fallback
        negative = fraction <= 0
        valid = positive.any(dim=1) & negative.any(dim=1)
        pos_count = positive.sum(dim=1).clamp(min=1)

        def nce(anchor: Tensor) -> Tensor:  # anchor [B, D] → [B]
            logits = torch.einsum("bnd,bd->bn", f, anchor) / temperature
            negatives = torch.logsumexp(torch.where(negative, logits, torch.full_like(logits, _EXCLUDED)),
                                        dim=1)
            per_cell = F.softplus(negatives[:, None] - logits)  # −log(e^l / (e^l + Σ_Q e^l_k))
            return (per_cell * positive).sum(dim=1) / pos_count

        prototype = F.normalize((f * positive[..., None]).sum(dim=1) / pos_count[:, None], dim=-1)
        p2t, p2p = nce(u), nce(prototype)
        weights = valid.float()
        denominator = weights.sum().clamp(min=1)
        loss = ((p2t_weight * p2t + p2p_weight * p2p) * weights).sum() / denominator
    info = {
        "positives": positive, "negatives": negative, "valid": valid,
        "p2t": ((p2t * weights).sum() / denominator).detach(),
        "p2p": ((p2p * weights).sum() / denominator).detach(),
    }
    return loss, info


class CrossModalAlignment(Objective):
    """MagNet's cross-modal alignment loss as a masksd objective (see the module docstring).

    Args:
        config: ``CrossModalAlignmentConfig``.
        text_dim / fused_dim: with ``features="fused"`` only: the width of the sentence feature
            (``Encoded.global_feature`` of the text) and of the decoder's fused features; they
            size the learned projection (``Linear(text_dim, fused_dim)``).
        name: key of the loss term.

    Needs from the model: the GT mask; ``"encoder"``: image scoring tokens on a grid and a text
    global feature in the same space (with gradients; hooks: ``HookSpec.*.tokens``/``global_``);
    ``"fused"``: the decoder's fused features (towers: ``decoder.forward_with_fused``; hooks:
    ``HookSpec.fused``). Parameters: none (``"encoder"``) or the projection (``"fused"``).

    ``info``: ``positives``/``negatives`` ``[B, N]``, ``valid`` ``[B]``, ``p2t``, ``p2p``, ``grid``.
    """

    def __init__(
        self,
        *,
        config: CrossModalAlignmentConfig | None = None,
        text_dim: int | None = None,
        fused_dim: int | None = None,
        name: str = "cal",
    ) -> None:
        super().__init__()
        config = CrossModalAlignmentConfig() if config is None else config
        if not isinstance(config, CrossModalAlignmentConfig):
            raise TypeError(f"config must be a CrossModalAlignmentConfig, got {type(config).__name__}")
        self.name, self.config, self.weight = name, config, float(config.weight)
        if config.features == "fused":
            if text_dim is None or fused_dim is None:
                raise ValueError("features='fused' needs text_dim= and fused_dim= (the sizes of the sentence "
                                 "projection)")
            check_int(text_dim, "text_dim", minimum=1)
            check_int(fused_dim, "fused_dim", minimum=1)
            self.sentence_proj: nn.Linear | None = nn.Linear(text_dim, fused_dim)
        else:
            if text_dim is not None or fused_dim is not None:
                raise ValueError("text_dim/fused_dim size the projection of features='fused'; drop them "
                                 "for 'encoder'")
            self.sentence_proj = None

    def extra_repr(self) -> str:
        c = self.config
        return f"name={self.name!r}, features={c.features!r}, temperature={c.temperature}, weight={c.weight}"

    def forward(self, step: Step, runner: Runner) -> ObjectiveOutput:
        """Features and sentence of the main branch, the GT on their grid, then ``alignment_loss``."""
        if step.target is None:
            raise ValueError(f"{self.name} needs the ground-truth mask (pass target=...)")
        sentence = runner.encoded_with_grad(step, "text").global_feature
        if self.sentence_proj is None:
            image = runner.encoded_with_grad(step, "image")
            features, grid = image.tokens, grid_of(image, step.embedded("image").grid)
            where = "the image scoring tokens"
        else:
            fused = runner.fused(step)
            features, grid = fused.tokens, fused.grid
            check_width(sentence, self.sentence_proj.in_features, f"{self.name}: the sentence feature",
                        "text_dim")
            check_width(features, self.sentence_proj.out_features, f"{self.name}: the fused features",
                        "fused_dim")
            sentence = self.sentence_proj(sentence)
            where = "the decoder's fused features"
        if grid is None:
            raise ValueError(
                f"{self.name}: {where} {tuple(features.shape)} lie on no known 2-D grid; give them one "
                "(Encoded.grid, Fused(grid=...), or a bchw tap)"
            )
        fraction = target_on_grid(step.target.to(features.device), grid)
        c = self.config
        loss, info = alignment_loss(
            features, sentence, fraction, temperature=c.temperature, pos_threshold=c.pos_threshold,
            p2t_weight=c.p2t_weight, p2p_weight=c.p2p_weight,
        )
        info["grid"] = grid
        return ObjectiveOutput(loss=loss, info=info)
