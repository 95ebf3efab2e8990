"""``DistillConfig`` and the branch configs: everything ``MaskedSelfDistill`` / ``masksd.wrap`` take.

It serialises to a plain dict (``to_dict`` / ``from_dict``), so a training script can store it
in its checkpoints and compare it on resume instead of keeping a list of keys by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from masksd.scorers import scorer_needs
from masksd.spec import _callable_from_str, _callable_to_str
from masksd.step import Modality

__all__ = ["BranchConfig", "DistillConfig", "DropoutMode", "LMVSDConfig", "Modality", "VMLSDConfig"]

Supervision = Literal["distill", "ground_truth"]
DropoutMode = Literal["fresh", "replay"]
DROPOUT_MODES: tuple[str, ...] = ("fresh", "replay")


@dataclass(frozen=True, kw_only=True)
class BranchConfig:
    """Settings of one masked self-distillation branch.

    Attributes:
        enabled: run this branch at all.
        top_k: fraction of valid tokens kept by correlation filtering, in (0, 1].
        ratio: fraction α of the kept tokens replaced by the mask token, in [0, 1].
        weight: loss weight λ (>= 0).
        masking: False is the "no masking" ablation (paper Table V): the branch re-encodes the
            unmasked tokens and no mask token is created.
        metric: correlation ``"dot"`` (paper) or ``"cosine"``.
        scorer: how tokens are ranked before top-K: ``"correlation"`` (paper),
            ``"prediction"`` (main prediction pooled onto the image grid; images only),
            ``"random"`` (ablation), or a callable ``scorer(step, modality) -> [B, N_u]``
            (see ``masksd.scorers``).
        surgery: feature surgery on the correlation scores (CLIP Surgery): each token's score against
            its own sample's global feature minus its mean score against all the batch's global
            features (``masksd.scorers.surgery_scores``); ``scorer="correlation"`` only.
    """

    enabled: bool = True
    top_k: float = 0.5
    ratio: float = 0.25
    weight: float = 0.75
    masking: bool = True
    metric: Literal["dot", "cosine"] = "dot"
    scorer: str | Callable[..., Any] = "correlation"
    surgery: bool = False

    def __post_init__(self) -> None:
        for name in ("top_k", "ratio", "weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not 0.0 < self.top_k <= 1.0:
            raise ValueError(f"top_k must lie in (0, 1], got {self.top_k}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must lie in [0, 1], got {self.ratio}")
        if self.weight < 0.0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.metric not in ("dot", "cosine"):
            raise ValueError(f"metric must be 'dot' or 'cosine', got {self.metric!r}")
        if not callable(self.scorer):
            scorer_needs(self.scorer)  # a registered name (masksd.scorers.register_scorer)
        if not isinstance(self.surgery, bool):
            raise TypeError(f"surgery must be a bool, got {type(self.surgery).__name__}")
        if self.surgery and self.scorer != "correlation":
            raise ValueError(f"surgery=True works with scorer='correlation' only, got scorer={self.scorer!r}")


@dataclass(frozen=True, kw_only=True)
class LMVSDConfig(BranchConfig):
    """Language-guided masked visual branch; defaults = paper Table III best (0.5 / 0.25 / 0.75)."""

    top_k: float = 0.5
    ratio: float = 0.25
    weight: float = 0.75


@dataclass(frozen=True, kw_only=True)
class VMLSDConfig(BranchConfig):
    """Visual-guided masked language branch; defaults = paper Table IV best (0.5 / 0.1 / 0.1)."""

    top_k: float = 0.5
    ratio: float = 0.1
    weight: float = 0.1



_BRANCH_TYPES = {t.__name__: t for t in (BranchConfig, LMVSDConfig, VMLSDConfig)}


def _branch(value: Any, default: BranchConfig, argument: str) -> BranchConfig | None:
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


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """The wrapper's configuration (defaults: the paper's best settings, Tables III and IV).

    Attributes:
        lmvsd: the masked-image branch (``LMVSDConfig``), or None to disable it. ``True`` and
            ``False`` are accepted and normalised.
        vmlsd: the masked-words branch (``VMLSDConfig``), or None.
        supervision: ``"distill"`` (paper) or ``"ground_truth"`` (Table VI ablation).
        share_decoder: False gives each branch its own decoder copy (Table VII; a hooked model
            names its decoder in ``HookSpec(decoder=...)``, the tower entry does it itself).
        hard_targets: binarise the teacher at ``threshold`` instead of soft probabilities.
        threshold: probability threshold for hard targets.
        seg_weight: weight of the main segmentation loss.
        dropout: ``"fresh"`` (default): dropout and drop-path draw new masks in the masked
            branches, as a plain implementation of the paper does; ``"replay"``: the branches
            replay the main branch's draws, so the token mask is their only difference (see
            ``masksd.engine.rng``).
    """

    lmvsd: BranchConfig | None = field(default_factory=LMVSDConfig)
    vmlsd: BranchConfig | None = field(default_factory=VMLSDConfig)
    supervision: Literal["distill", "ground_truth"] = "distill"
    share_decoder: bool = True
    hard_targets: bool = False
    threshold: float = 0.5
    seg_weight: float = 1.0
    dropout: DropoutMode = "fresh"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lmvsd", _branch(self.lmvsd, LMVSDConfig(), "lmvsd"))
        object.__setattr__(self, "vmlsd", _branch(self.vmlsd, VMLSDConfig(), "vmlsd"))
        if self.supervision not in ("distill", "ground_truth"):
            raise ValueError(f"supervision must be 'distill' or 'ground_truth', got {self.supervision!r}")
        weight = self.seg_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"seg_weight must be a float >= 0, got {weight!r}")
        if self.dropout not in DROPOUT_MODES:
            raise ValueError(f"dropout must be one of {DROPOUT_MODES}, got {self.dropout!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")

    @classmethod
    def merged(cls, config: DistillConfig | None, options: Mapping[str, Any]) -> DistillConfig:
        """The configuration of ``config=`` or of keyword ``options`` (``DistillConfig`` fields),
        not both: what ``MaskedSelfDistill`` / ``masksd.wrap`` receive."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unexpected options {unknown}; see masksd.DistillConfig ({sorted(names)})")
        if config is None:
            return cls(**options)
        if not isinstance(config, DistillConfig):
            raise TypeError(f"config must be a masksd.DistillConfig, got {type(config).__name__}")
        if options:
            raise TypeError(f"give either config= or the options {sorted(options)}, not both")
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-compatible) that ``from_dict`` restores."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, BranchConfig):
                branch = {"__type__": type(value).__name__, **dataclasses.asdict(value)}
                if callable(value.scorer):
                    branch["scorer"] = {"__callable__": _callable_to_str(value.scorer, f"{f.name}.scorer")}
                value = branch
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistillConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown DistillConfig keys {sorted(unknown)}; known: {sorted(names)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, Mapping):
                value = dict(value)
                kind = _BRANCH_TYPES.get(value.pop("__type__", "BranchConfig"))
                if kind is None:
                    raise ValueError(f"{key}: unknown branch config type")
                if isinstance(value.get("scorer"), Mapping):
                    value["scorer"] = _callable_from_str(value["scorer"]["__callable__"])
                value = kind(**value)
            kwargs[key] = value
        return cls(**kwargs)
