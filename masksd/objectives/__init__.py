"""Training-only objectives that plug into ``MaskedSelfDistill``."""

from masksd.objectives.base import DistillContext, Objective, ObjectiveOutput
from masksd.objectives.guided_masking import (
    BranchConfig,
    GuidedMaskedDistillation,
    LMVSDConfig,
    VMLSDConfig,
)

__all__ = [
    "BranchConfig",
    "DistillContext",
    "GuidedMaskedDistillation",
    "LMVSDConfig",
    "Objective",
    "ObjectiveOutput",
    "VMLSDConfig",
]
