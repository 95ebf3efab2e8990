"""Training-only objectives that plug into ``MaskedSelfDistill``."""

from masksd.objectives.alignment import CrossModalAlignment, CrossModalAlignmentConfig
from masksd.objectives.base import DistillContext, Objective, ObjectiveOutput
from masksd.objectives.guided_masking import (
    BranchConfig,
    GuidedMaskedDistillation,
    LMVSDConfig,
    VMLSDConfig,
)
from masksd.objectives.mask_grounding import MaskGrounding, MaskGroundingConfig
from masksd.objectives.maskris import MaskRIS, MaskRISConfig
from masksd.objectives.reconstruction import LanguageReconstruction, LanguageReconstructionConfig

__all__ = [
    "BranchConfig",
    "CrossModalAlignment",
    "CrossModalAlignmentConfig",
    "DistillContext",
    "GuidedMaskedDistillation",
    "LMVSDConfig",
    "LanguageReconstruction",
    "LanguageReconstructionConfig",
    "MaskGrounding",
    "MaskGroundingConfig",
    "MaskRIS",
    "MaskRISConfig",
    "Objective",
    "ObjectiveOutput",
    "VMLSDConfig",
]
