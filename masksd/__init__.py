"""masksd: cross-modality masked self-distillation (CM-MaskSD) for referring image segmentation.

Wrap the RIS model you already have with ``masksd.wrap(model, spec)`` (forward hooks, the model
unchanged), or a model built from towers with ``MaskedSelfDistill(image_tower, text_tower,
decoder)``, to train with the LMVSD and VMLSD objectives; at inference the bare model runs alone.
"""

from masksd.check import WrapReport
from masksd.checkpoints import bare_state_dict, load_bare_state_dict, open_clip_state_dict
from masksd.config import DistillConfig
from masksd.losses import check_binary_target, consistency_loss, segmentation_loss
from masksd.objectives import (
    BranchConfig,
    CrossModalAlignment,
    CrossModalAlignmentConfig,
    DistillContext,
    GuidedMaskedDistillation,
    LanguageReconstruction,
    LanguageReconstructionConfig,
    LMVSDConfig,
    MaskGrounding,
    MaskGroundingConfig,
    MaskRIS,
    MaskRISConfig,
    Objective,
    ObjectiveOutput,
    VMLSDConfig,
)
from masksd.spec import HookSpec, Maskable, ModalitySpec, Output, Tap
from masksd.towers import Decoder, Embedded, Encoded, Fused, RISModel, Tower
from masksd.wrapper import DistillOutput, MaskedSelfDistill, wrap

__version__ = "0.2.0"

__all__ = [
    "BranchConfig",
    "CrossModalAlignment",
    "CrossModalAlignmentConfig",
    "Decoder",
    "DistillConfig",
    "DistillContext",
    "DistillOutput",
    "Embedded",
    "Encoded",
    "Fused",
    "GuidedMaskedDistillation",
    "HookSpec",
    "LMVSDConfig",
    "LanguageReconstruction",
    "LanguageReconstructionConfig",
    "MaskGrounding",
    "MaskGroundingConfig",
    "MaskRIS",
    "MaskRISConfig",
    "Maskable",
    "MaskedSelfDistill",
    "ModalitySpec",
    "Objective",
    "ObjectiveOutput",
    "Output",
    "RISModel",
    "Tap",
    "Tower",
    "VMLSDConfig",
    "WrapReport",
    "__version__",
    "bare_state_dict",
    "check_binary_target",
    "load_bare_state_dict",
    "open_clip_state_dict",
    "consistency_loss",
    "segmentation_loss",
    "wrap",
]
