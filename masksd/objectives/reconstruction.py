"""Language reconstruction (CRFormer, Yan et al., arXiv 2404.08281, 2024): rebuild the sentence's word
features from the decoder's fused output, so that the fused features keep the whole sentence.

Per step (training only)::

    S     = fused features of the main branch's one decoder pass, [B, N, D_f] → Linear → [B, N, d]
    R     = TransformerDecoder(queries Q₀[:L], memory = S)        # Q₀: learned, one per position
    Ŵ     = Linear(LN(R))                                           # [B, L, D_t]
    W*    = stopgrad(text scoring features of the main branch)      # [B, L, D_t]
    loss  = mean over supervised positions of (1 − cos(Ŵ_l, W*_l))

The queries carry no sample information, so everything sample-specific must come through ``S``:
the gradient pushes the decoder (and through it both towers) to keep the words in its fused
features. The target is detached so that the text tower cannot make the task trivial.
CRFormer reconstructs from its calibration decoder's final *queries*; a CRIS-like decoder has none,
so its fused map stands in (docs/objectives.md). Defaults and sources:
``LanguageReconstructionConfig``.
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
    text_padding,
)
from masksd.objectives.base import Objective, ObjectiveOutput
from masksd.step import Step

if TYPE_CHECKING:
    from masksd.engine.runner import Runner

__all__ = ["LanguageReconstruction", "LanguageReconstructionConfig", "reconstruction_loss"]


@dataclass(frozen=True, kw_only=True)
class LanguageReconstructionConfig:
    """Settings of ``LanguageReconstruction`` ([ours] throughout: CRFormer's loss form, weight and
    module sizes could not be read; reasons in docs/objectives.md).

    Attributes:
        weight: loss weight λ_rec (>= 0). [ours] 0.1.
        width / layers / heads / ffn / dropout: the reconstructor (a pre-norm Transformer
            decoder). [ours] 256 / 2 / 8 / 1024 / 0.1.
        max_len: number of learned position queries (the longest sentence, in tokens). [ours] 77
            (CLIP's context).
        positions: which word positions are supervised: ``"words"`` (``Embedded.maskable``: no
            padding or special tokens) or ``"all"`` (every non-pad position, SOT/EOT included, as
            the research note's "non-pad positions"; the padding comes from the text features'
            ``features["pad_mask"]``, else from the token ids). [ours] ``"words"``.
    """

    weight: float = 0.1
    width: int = 256
    layers: int = 2
    heads: int = 8
    ffn: int = 1024
    dropout: float = 0.1
    max_len: int = 77
    positions: Literal["words", "all"] = "words"

    def __post_init__(self) -> None:
        check_fraction(self.weight, "weight", high=None)
        for name in ("width", "layers", "heads", "ffn", "max_len"):
            check_int(getattr(self, name), name, minimum=1)
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        check_fraction(self.dropout, "dropout", high=None)
        if self.dropout >= 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        check_choice(self.positions, ("words", "all"), "positions")


def reconstruction_loss(prediction: Tensor, target: Tensor, supervised: Tensor) -> Tensor:
    """Mean ``1 − cos(prediction, target)`` over ``supervised`` positions (float32, autocast off).

    Args:
        prediction: ``[B, L, D]``.
        target: ``[B, L, D]``; detached here (no gradient ever reaches it).
        supervised: ``[B, L]`` bool.

    Returns:
        scalar loss; 0 (still in the graph of ``prediction``) when nothing is supervised.
    """
    if prediction.shape != target.shape or supervised.shape != prediction.shape[:2]:
        raise ValueError(
            f"reconstruction_loss needs prediction and target [B, L, D] and supervised [B, L]; got "
            f"{tuple(prediction.shape)}, {tuple(target.shape)}, {tuple(supervised.shape)}"
        )
    with autocast_off(prediction):
        cosine = F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1, eps=1e-6)
        weights = supervised.float()
        return ((1.0 - cosine) * weights).sum() / weights.sum().clamp(min=1)


class LanguageReconstruction(Objective):
    """CRFormer's language reconstruction as a masksd objective (see the module docstring).

    Args:
        fused_dim: width of the decoder's fused features.
        text_dim: width of the text's scoring features (the reconstruction target).
        config: ``LanguageReconstructionConfig``.
        name: key of the loss term.

    Needs from the model: the decoder's fused features (towers: ``decoder.forward_with_fused``;
    hooks: ``HookSpec.fused``) and per-word text features (``Encoded.tokens``; hooks: a ``[B, L,
    D]`` ``HookSpec.text.tokens`` tap). Parameters: the source projection, the queries, the
    decoder layers and the output projection.

    ``info``: ``cosine`` (mean over supervised positions; NaN when the batch supervises nothing, as
    there is nothing to average) and ``supervised`` ``[B, L]`` (detached).
    """

    def __init__(
        self, *, fused_dim: int, text_dim: int, config: LanguageReconstructionConfig | None = None,
        name: str = "lang_rec",
    ) -> None:
        super().__init__()
        config = LanguageReconstructionConfig() if config is None else config
        if not isinstance(config, LanguageReconstructionConfig):
            raise TypeError(f"config must be a LanguageReconstructionConfig, got {type(config).__name__}")
        check_int(fused_dim, "fused_dim", minimum=1)
        check_int(text_dim, "text_dim", minimum=1)
        self.name, self.config, self.weight = name, config, float(config.weight)
        d = config.width
        self.source = nn.Sequential(nn.LayerNorm(fused_dim), nn.Linear(fused_dim, d))
        self.queries = nn.Parameter(torch.randn(config.max_len, d) * 0.02)
        layer = nn.TransformerDecoderLayer(
            d, config.heads, config.ffn, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, config.layers, norm=nn.LayerNorm(d))
        self.out = nn.Linear(d, text_dim)

    def extra_repr(self) -> str:
        c = self.config
        return (f"name={self.name!r}, width={c.width}, layers={c.layers}, positions={c.positions!r}, "
                f"weight={c.weight}")

    def reconstruct(self, fused: Tensor, length: int) -> Tensor:
        """``fused [B, N, D_f]`` → reconstructed word features ``[B, length, D_t]``."""
        if length > self.config.max_len:
            raise ValueError(
                f"{self.name}: sentences of {length} tokens exceed max_len={self.config.max_len}; raise "
                "LanguageReconstructionConfig(max_len=...)"
            )
        memory = self.source(fused)
        queries = self.queries[:length].to(memory.dtype).expand(fused.shape[0], -1, -1)
        return self.out(self.decoder(queries, memory))

    def forward(self, step: Step, runner: Runner) -> ObjectiveOutput:
        """Reconstruct the main branch's word features from its fused features; cosine loss."""
        fused = runner.fused(step)
        check_width(fused.tokens, self.source[1].in_features, f"{self.name}: the fused features", "fused_dim")
        words = step.encoded("text")
        embedded = step.embedded("text")
        if words is None or words.tokens.shape[:2] != embedded.maskable.shape:
            found = "none" if words is None else tuple(words.tokens.shape)
            raise ValueError(
                f"{self.name} needs one text feature per embedded word [B, L, D] (Encoded.tokens; hooks: a "
                f"HookSpec.text.tokens tap), found {found} for words {tuple(embedded.maskable.shape)}"
            )
        check_width(words.tokens, self.out.out_features, f"{self.name}: the text features", "text_dim")
        prediction = self.reconstruct(fused.tokens, int(words.tokens.shape[1]))
        if self.config.positions == "words":
            supervised = embedded.maskable
        else:  # every non-pad position
            supervised = ~text_padding(step, runner, words)
        loss = reconstruction_loss(prediction, words.tokens, supervised)
        # no device sync: NaN rather than a perfect-looking 1 when nothing is supervised
        with torch.no_grad():
            cosine = torch.where(supervised.any(), 1.0 - loss, torch.full_like(loss, float("nan")))
        return ObjectiveOutput(loss=loss, info={"cosine": cosine, "supervised": supervised})
