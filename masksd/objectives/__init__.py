"""Training-only objectives that plug into ``MaskedSelfDistill``."""

from masksd.config import BranchConfig, LMVSDConfig, VMLSDConfig
from masksd.objectives.alignment import CrossModalAlignment, CrossModalAlignmentConfig
from masksd.objectives.base import Objective, ObjectiveOutput
from masksd.objectives.guided_masking import GuidedMaskedDistillation
from masksd.objectives.mask_grounding import MaskGrounding, MaskGroundingConfig
from masksd.objectives.maskris import MaskRIS, MaskRISConfig
from masksd.objectives.reconstruction import LanguageReconstruction, LanguageReconstructionConfig

__all__ = [
    "BranchConfig",
    "CrossModalAlignment",
    "CrossModalAlignmentConfig",
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
