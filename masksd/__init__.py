"""masksd: cross-modality masked self-distillation (CM-MaskSD) for referring image segmentation.

Wrap the RIS model you already have with ``masksd.wrap(model, spec)`` (forward hooks, the model
unchanged), or a model built from towers with ``MaskedSelfDistill(image_tower, text_tower,
decoder)``, to train with the LMVSD and VMLSD objectives; at inference the bare model runs alone.

The top level holds what a training script uses; the rest lives in its submodules:
``masksd.objectives`` (MaskRIS, Mask Grounding, cross-modal alignment, language reconstruction,
the ``Objective`` contract), ``masksd.towers`` (the tower contract: ``Embedded``, ``Encoded``,
``RISModel``), ``masksd.checkpoints``, ``masksd.losses``, ``masksd.metrics``, ``masksd.adapters``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from masksd.check import WrapReport
from masksd.config import DistillConfig
from masksd.losses import check_pending_targets
from masksd.objectives import BranchConfig, LMVSDConfig, Objective, VMLSDConfig
from masksd.scorer_health import MasksdWarning
from masksd.spec import HookSpec, Maskable, ModalitySpec, Output, Tap
from masksd.wrapper import DistillOutput, MaskedSelfDistill, wrap

__version__ = "0.2.0"

__all__ = [
    "BranchConfig",
    "DistillConfig",
    "DistillOutput",
    "HookSpec",
    "LMVSDConfig",
    "Maskable",
    "MaskedSelfDistill",
    "MasksdWarning",
    "ModalitySpec",
    "Objective",
    "Output",
    "Tap",
    "VMLSDConfig",
    "WrapReport",
    "check_pending_targets",
    "wrap",
]

# Names the top level exported up to 0.2.0, now read from their submodule (with a warning).
_MOVED = {
    **dict.fromkeys(
        ("CrossModalAlignment", "CrossModalAlignmentConfig", "GuidedMaskedDistillation",
         "LanguageReconstruction", "LanguageReconstructionConfig", "MaskGrounding", "MaskGroundingConfig",
         "MaskRIS", "MaskRISConfig", "ObjectiveOutput"), "masksd.objectives"),
    **dict.fromkeys(("Decoder", "Embedded", "Encoded", "Fused", "RISModel", "Tower"), "masksd.towers"),
    **dict.fromkeys(
        ("bare_state_dict", "load_bare_state_dict", "open_clip_state_dict"), "masksd.checkpoints"),
    **dict.fromkeys(("check_binary_target", "consistency_loss", "segmentation_loss"), "masksd.losses"),
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'masksd' has no attribute {name!r}")
    warnings.warn(f"masksd.{name} moved: import it from {module} (the top level keeps the training API)",
                  FutureWarning, stacklevel=2)
    return getattr(importlib.import_module(module), name)
