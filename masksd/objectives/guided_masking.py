"""LMVSD and VMLSD: cross-modality guided masked self-distillation (paper Sec. III-B).

Both directions are one objective, ``GuidedMaskedDistillation``, parameterised by the masked
modality:

* ``"image"`` (LMVSD): score the image tokens against the main branch's sentence feature,
  keep the top-K fraction, mask a random α fraction of those in the *embedded* image tokens,
  re-encode the image only, decode with the main branch's text features.
* ``"text"`` (VMLSD): the mirror: score words against the image feature, mask word
  embeddings, re-encode the text only, decode with the main branch's image features.

The branch's logits are trained to reproduce the main branch's detached prediction
(``supervision="distill"``, the paper) or the ground truth (``"ground_truth"``, Table VI).
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from masksd.config import BranchConfig, Modality, Supervision
from masksd.losses import consistency_loss, segmentation_loss
from masksd.masking import sample_mask, select_top_k
from masksd.objectives.base import Objective, ObjectiveOutput
from masksd.scorer_health import MasksdWarning, score_problem
from masksd.scorers import score
from masksd.step import Step
from masksd.towers import Decoder

if TYPE_CHECKING:
    from masksd.engine.runner import Runner

__all__ = ["GuidedMaskedDistillation"]


class GuidedMaskedDistillation(Objective):
    """One masked self-distillation branch (LMVSD for ``"image"``, VMLSD for ``"text"``).

    Args:
        name: key of this loss term (``"lmvsd"`` / ``"vmlsd"``).
        masked_modality: ``"image"`` or ``"text"``.
        embed_dim: width C of the masked tower's embedded tokens (size of the mask token).
        config: the branch settings.
        supervision: ``"distill"`` (target = detached main prediction) or ``"ground_truth"``.
        hard_targets: binarise the teacher at ``threshold`` instead of soft probabilities.
        threshold: probability threshold for hard targets.
        decoder: a private decoder copy (unshared-weights ablation, Table VII); None shares the
            model's decoder.

    Parameters: ``mask_token [C]`` (initialised ``N(0, 0.02²)``) when masking is on, plus the
    private decoder when given.
    """

    def __init__(
        self,
        *,
        name: str,
        masked_modality: Modality,
        embed_dim: int,
        config: BranchConfig,
        supervision: Supervision = "distill",
        hard_targets: bool = False,
        threshold: float = 0.5,
        decoder: Decoder | None = None,
    ) -> None:
        super().__init__()
        if masked_modality not in ("image", "text"):
            raise ValueError(f"masked_modality must be 'image' or 'text', got {masked_modality!r}")
        if supervision not in ("distill", "ground_truth"):
            raise ValueError(f"supervision must be 'distill' or 'ground_truth', got {supervision!r}")
        if not isinstance(config, BranchConfig):
            raise TypeError(f"config must be a BranchConfig, got {type(config).__name__}")
        self.name = name
        self.masked_modality: Modality = masked_modality
        self.config = config
        self.weight = float(config.weight)
        self.supervision: Supervision = supervision
        self.hard_targets = hard_targets
        self.threshold = threshold
        self.decoder = decoder
        if config.masking:
            self.mask_token = nn.Parameter(torch.randn(embed_dim) * 0.02)
        else:
            self.register_parameter("mask_token", None)
        self.score_warning: str | None = None  # what the last check of the scores found
        self._check_scores = True  # check on the first training step (and on wrapper.check)

    def recheck_scores(self) -> None:
        """Check the scores again at the next step (``wrapper.check`` does), warning once per object."""
        self._check_scores = True

    @classmethod
    def with_private_decoder(
        cls, decoder: Decoder, *, engine: object = None, **kwargs: object
    ) -> GuidedMaskedDistillation:
        """Build a branch with an independent copy of ``decoder`` (unshared weights). Hooks the
        ``engine`` registered inside the decoder stay the engine's (not copies of it)."""
        if not isinstance(decoder, nn.Module):
            raise TypeError("share_decoder=False needs the decoder to be an nn.Module to copy it")
        memo = {id(engine): engine} if engine is not None else {}
        return cls(decoder=copy.deepcopy(decoder, memo), **kwargs)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"name={self.name!r}, masked={self.masked_modality}, top_k={c.top_k}, "
            f"ratio={c.ratio}, weight={c.weight}, masking={c.masking}, "
            f"supervision={self.supervision!r}"
        )

    def select(self, step: Step) -> tuple[Tensor, Tensor]:
        """Filtering and guided masking on the modality's units: ``(kept, masked)``, ``[B, N_u]`` bool.

        Units are the embedded tokens, or the coarser scoring grid of a CNN-like tower (see
        ``masksd.scorers``).
        """
        modality = self.masked_modality
        with torch.no_grad():
            scores = score(step, modality, self.config.scorer, metric=self.config.metric,
                           surgery=self.config.surgery)
            maskable = step.view(modality).units.maskable
            if self._check_scores:
                self._check_scores_now(step, scores, maskable)
            kept = select_top_k(scores, maskable, top_k=self.config.top_k)
            if self.config.masking:
                masked = sample_mask(kept, ratio=self.config.ratio, generator=step.generator)
            else:
                masked = torch.zeros_like(kept)
        return kept, masked

    @torch.compiler.disable
    def _check_scores_now(self, step: Step, scores: Tensor, maskable: Tensor) -> None:
        warned = self.score_warning is not None
        self.score_warning = score_problem(step, self.masked_modality, scores, maskable, self.config.scorer)
        self._check_scores = False
        if self.score_warning is not None and not warned:
            warnings.warn(f"{self.name}: {self.score_warning}", MasksdWarning, stacklevel=2)

    def forward(self, step: Step, runner: Runner) -> ObjectiveOutput:
        """Run the masked branch and return its loss, the ``kept``/``masked`` units and logits."""
        kept, masked = self.select(step)
        view = step.view(self.masked_modality)
        embedded_mask = view.units.expand(masked, view.embedded.maskable)
        logits = runner.rerun(
            step, mask={self.masked_modality: (embedded_mask, self.mask_token)}, decoder=self.decoder
        )
        if self.supervision == "distill":
            loss = consistency_loss(logits, step.logits, hard=self.hard_targets, threshold=self.threshold)
        else:
            if step.target is None:
                raise ValueError(f"{self.name}: supervision='ground_truth' needs a target mask")
            loss = segmentation_loss(logits, step.target, checked=True)  # the engine checked it
        info = {"kept": kept, "masked": masked, "logits": logits.detach(), "grid": view.units.grid}
        return ObjectiveOutput(loss=loss, info=info)
