"""masksd: cross-modality masked self-distillation (CM-MaskSD) for referring image segmentation.

Wrap any image tower, text tower and decoder with ``MaskedSelfDistill`` to train with the
LMVSD and VMLSD objectives; at inference the wrapper runs the bare model only.
"""

from masksd.losses import consistency_loss, segmentation_loss
from masksd.objectives import (
    BranchConfig,
    DistillContext,
    GuidedMaskedDistillation,
    LMVSDConfig,
    Objective,
    ObjectiveOutput,
    VMLSDConfig,
)
from masksd.towers import Decoder, Embedded, Encoded, RISModel, Tower
from masksd.wrapper import DistillOutput, MaskedSelfDistill

__version__ = "0.1.0"

__all__ = [
    "BranchConfig",
    "Decoder",
    "DistillContext",
    "DistillOutput",
    "Embedded",
    "Encoded",
    "GuidedMaskedDistillation",
    "LMVSDConfig",
    "MaskedSelfDistill",
    "Objective",
    "ObjectiveOutput",
    "RISModel",
    "Tower",
    "VMLSDConfig",
    "__version__",
    "consistency_loss",
    "segmentation_loss",
]
