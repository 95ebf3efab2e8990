"""``MaskedSelfDistill``: the plug-and-play CM-MaskSD training wrapper.

Training forward (``wrapper.train()``)::

    main branch:  E_I = image_tower.embed(x);  V = image_tower.encode(E_I)
                  E_T = text_tower.embed(t);   W = text_tower.encode(E_T)
                  M_seg = decoder(V, W)
    objectives:   LMVSD re-encodes a masked E_I, VMLSD a masked E_T (shared weights)
    loss        = BCE(M_seg, GT) + λ1 · BCE(M_LMVSD, σ(M_seg)) + λ2 · BCE(M_VMLSD, σ(M_seg))

Eval forward (``wrapper.eval()``) runs the bare model only: ``unwrap()(x, t)``, bit for bit.

BatchNorm layers of the shared model normalise the masked branches with those branches' own
batch statistics, but only the main branch updates their running statistics: inference sees
unmasked inputs, so its statistics must describe unmasked inputs.

State dict: the bare model's keys are prefixed ``model.`` (``model.image_tower.*``,
``model.text_tower.*``, ``model.decoder.*``); the added parameters are the mask tokens
``objectives.lmvsd.mask_token`` and ``objectives.vmlsd.mask_token`` (and private decoder copies
``objectives.<name>.decoder.*`` under ``share_decoder=False``). ``unwrap()`` returns the bare
``RISModel`` whose ``state_dict()`` has the same keys without the ``model.`` prefix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from masksd.losses import segmentation_loss
from masksd.objectives.base import DistillContext, Objective
from masksd.objectives.guided_masking import (
    BranchConfig,
    GuidedMaskedDistillation,
    LMVSDConfig,
    VMLSDConfig,
)
from masksd.towers import Decoder, RISModel

__all__ = ["MaskedSelfDistill", "DistillOutput"]


@dataclass
class DistillOutput:
    """Result of a training forward.

    Attributes:
        logits: ``[B, 1, h, w]`` main-branch logits ``M_seg``.
        loss: scalar float32 total loss (what to call ``backward()`` on).
        losses: unweighted terms by name: ``"seg"`` and one per objective (``"lmvsd"``,
            ``"vmlsd"``), each a detached scalar.
        selections: per objective, ``{"kept": [B, N] bool, "masked": [B, N] bool,
            "logits": [B, 1, h, w]}`` (detached) for visualisation and debugging.
    """

    logits: Tensor
    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    selections: dict[str, dict[str, Tensor]] = field(default_factory=dict)


@contextmanager
def _running_stats_frozen(norms: Sequence[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Let BatchNorm layers normalise with batch statistics but leave running stats untouched.

    The masked branches run the shared decoder on masked inputs; their statistics must not leak
    into the running averages that inference uses (those describe unmasked inputs only).
    """
    saved = []
    for norm in norms:
        if norm.training and norm.track_running_stats:
            saved.append((norm, norm.momentum, norm.num_batches_tracked.clone()))
            norm.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for norm, momentum, tracked in saved:
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(tracked)


def _branch_config(value: Any, default: BranchConfig, argument: str) -> BranchConfig | None:
    if value is None or value is False:
        return None
    if value is True:
        return default
    if not isinstance(value, BranchConfig):
        raise TypeError(
            f"{argument} must be a BranchConfig (e.g. {type(default).__name__}(...)), True, "
            f"False or None, got {type(value).__name__}"
        )
    return value if value.enabled else None


class MaskedSelfDistill(nn.Module):
    """Wrap an image tower, a text tower and a decoder with CM-MaskSD training objectives.

    Args:
        image_tower: ``Tower`` for images (``nn.Module`` with ``embed``/``encode``/``embed_dim``).
        text_tower: ``Tower`` for text.
        decoder: ``decoder(image: Encoded, text: Encoded) -> logits [B, 1, h, w]``.
        lmvsd: ``LMVSDConfig`` (default: paper's best), or None/False to disable the branch.
        vmlsd: ``VMLSDConfig`` (default: paper's best), or None/False to disable the branch.
        supervision: ``"distill"`` (paper) or ``"ground_truth"`` (Table VI ablation).
        share_decoder: False gives each branch its own copy of the decoder (Table VII ablation).
        hard_targets: binarise the teacher prediction at ``threshold`` (default: soft targets).
        threshold: probability threshold for hard targets.
        seg_weight: weight of the main segmentation loss.
        extra_objectives: further ``Objective`` plug-ins run after the two branches.

    Forward:
        ``forward(images, texts, target=None, *, generator=None)``. In training mode returns a
        ``DistillOutput`` (``target [B, H, W]`` required); in eval mode returns the bare
        model's logits.
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        decoder: Decoder,
        *,
        lmvsd: LMVSDConfig | BranchConfig | bool | None = True,
        vmlsd: VMLSDConfig | BranchConfig | bool | None = True,
        supervision: Literal["distill", "ground_truth"] = "distill",
        share_decoder: bool = True,
        hard_targets: bool = False,
        threshold: float = 0.5,
        seg_weight: float = 1.0,
        extra_objectives: Sequence[Objective] = (),
    ) -> None:
        super().__init__()
        self.model = RISModel(image_tower, text_tower, decoder)
        if isinstance(seg_weight, bool) or not isinstance(seg_weight, (int, float)) or seg_weight < 0:
            raise ValueError(f"seg_weight must be a float >= 0, got {seg_weight!r}")
        self.seg_weight = float(seg_weight)
        branches = [
            ("lmvsd", "image", _branch_config(lmvsd, LMVSDConfig(), "lmvsd"), image_tower),
            ("vmlsd", "text", _branch_config(vmlsd, VMLSDConfig(), "vmlsd"), text_tower),
        ]
        objectives: dict[str, Objective] = {}
        for name, modality, config, tower in branches:
            if config is None:
                continue
            kwargs: dict[str, Any] = dict(
                name=name,
                masked_modality=modality,
                embed_dim=tower.embed_dim,
                config=config,
                supervision=supervision,
                hard_targets=hard_targets,
                threshold=threshold,
            )
            if share_decoder:
                objectives[name] = GuidedMaskedDistillation(**kwargs)
            else:
                objectives[name] = GuidedMaskedDistillation.with_private_decoder(decoder, **kwargs)
        for objective in extra_objectives:
            if not isinstance(objective, Objective):
                raise TypeError(
                    f"extra_objectives must hold Objective instances, got {type(objective).__name__}"
                )
            if objective.name in objectives or objective.name == "seg":
                raise ValueError(f"objective name {objective.name!r} is used twice")
            objectives[objective.name] = objective
        self.objectives = nn.ModuleDict(objectives)
        self._shared_norms = [
            module for module in self.model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]

    def unwrap(self) -> RISModel:
        """The bare model (same modules, shared parameters): what inference runs."""
        return self.model

    def added_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that exist only for training (mask tokens, private decoders), by name."""
        return {f"objectives.{name}": p for name, p in self.objectives.named_parameters()}

    def forward(
        self,
        images: Any,
        texts: Any,
        target: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> DistillOutput | Tensor:
        """Training: ``DistillOutput``; eval: the bare model's logits (see class docstring)."""
        if not self.training:
            return self.model(images, texts)
        if target is None:
            raise ValueError("target (the ground-truth mask [B, H, W]) is required in training mode")
        model = self.model
        image_embedded = model.image_tower.embed(images)
        text_embedded = model.text_tower.embed(texts)
        image_encoded = model.image_tower.encode(image_embedded)
        text_encoded = model.text_tower.encode(text_embedded)
        logits = model.decoder(image_encoded, text_encoded)
        context = DistillContext(
            model=model,
            image_embedded=image_embedded,
            text_embedded=text_embedded,
            image_encoded=image_encoded,
            text_encoded=text_encoded,
            main_logits=logits,
            target=target,
            generator=generator,
        )
        seg = segmentation_loss(logits, target)
        total = self.seg_weight * seg
        losses = {"seg": seg.detach()}
        selections: dict[str, dict[str, Tensor]] = {}
        with _running_stats_frozen(self._shared_norms):
            for name, objective in self.objectives.items():
                result = objective(context)
                total = total + objective.weight * result.loss.float()
                losses[name] = result.loss.detach()
                selections[name] = result.info
        return DistillOutput(logits=logits, loss=total, losses=losses, selections=selections)
