"""Mask Grounding (MagNet, Chng et al., CVPR 2024): predict masked words from the image, the rest of
the sentence and the target mask's centre.

Per step (training only; the main branch is untouched)::

    selected  = select_words(maskable, ratio ρ, min_masked μ)       # [B, L], random, ⊆ maskable
    replaced  = selected & (u < p_mask)                              # the others stay as they are
    O, P      = encode_masked("text", replaced, e_[M])               # text re-encoded, no decoder
    C         = MLP(centre of the GT mask)   (or e_∅ for an empty mask)
    H         = Transformer([LN(O)W_t + τ_t ; LN(P)W_v + pos2d + τ_v ; C + τ_c],
                            text padding masked as keys)[:L]
    z_i       = LN(GELU(H_i W_h + b_h)) · Eᵀ       for i ∈ selected   (E: the model's own word table)
    loss      = mean_i CE(z_i, id_i)

Sources and decisions are in ``MaskGroundingConfig`` and docs/objectives.md. The output layer is
*tied*: ``E`` is fetched from the model at every step (``runner.word_embedding()``) and never
registered here, so it is trained by both the model and this head and saved once.

Padding never influences a prediction: the text's padding positions are masked as attention keys
in the predictor (``text_padding``: the text tower's ``features["pad_mask"]``, else the trailing
pad run of the token ids), so changing what sits at a padding position leaves every masked word's
logits unchanged (tests/test_objectives_mask_grounding.py).

Leak safety: the labels are the words' original ids; the selected words' embeddings are replaced
*before* the text is re-encoded, and (hooks, early fusion) image features that depend on the text
come from the same masked pass. A text tower must build its features from ``embedded.tokens``,
never by re-embedding the ids (tests/test_objectives_mask_grounding.py checks this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masksd.masking import masked_counts
from masksd.objectives._common import (
    autocast_off,
    check_choice,
    check_fraction,
    check_int,
    check_width,
    grid_of,
    sine_positions,
    text_padding,
)
from masksd.objectives.base import Objective, ObjectiveOutput
from masksd.step import Step

if TYPE_CHECKING:
    from masksd.engine.runner import Runner

__all__ = ["MaskGrounding", "MaskGroundingConfig", "MaskedWordHead", "mask_centers", "select_words"]


@dataclass(frozen=True, kw_only=True)
class MaskGroundingConfig:
    """Settings of ``MaskGrounding`` (tags: [paper] MagNet, [author] the MagNet author's answer
    pointing to ovr-cnn's masking code, [ours] our decision; reasons in docs/objectives.md).

    Attributes:
        weight: loss weight λ_mg (>= 0). [ours] 0.1: MagNet's value was not recovered; the initial
            CE is ≈ ln V (≈ 10.8 for CLIP) against a seg BCE ≈ 0.7.
        ratio: fraction ρ of a sentence's maskable words selected. [author] 0.15 (BERT/ovr-cnn).
        min_masked: at least ``min(μ, n)`` words selected per sentence with n maskable words.
            [ours] 1: referring expressions are short (≈ 3.6 words), and at 15 % most would select
            nothing; 0 is plain BERT.
        p_mask: probability that a selected word's embedding is replaced by the mask token; the
            others are kept unchanged but still predicted. [author] 0.9 (ovr-cnn: 90 % [MASK],
            0 % random, 10 % kept; random replacement is not offered).
        mask_input: ``"center"`` feeds the encoded GT-mask centre to the predictor [paper];
            ``"none"`` drops it (cross-modal masked language modelling, an ablation).
        center: ``"centroid"`` (mass centre of the mask) or ``"box"`` (bounding-box centre),
            normalised to [0, 1]². [ours] the paper says "centre coordinates" only.
        width / layers / heads / ffn / dropout: the predictor (a pre-norm Transformer encoder
            over [text; image; mask]). [ours] 256 / 2 / 8 / 1024 / 0.1: width and heads as the
            released MagNet head; its depth is unknown.
        detach_image: stop this loss's gradient into the image features. [ours] False: MagNet
            trains end to end.
        label_smoothing: of the cross-entropy. [ours] 0.
    """

    weight: float = 0.1
    ratio: float = 0.15
    min_masked: int = 1
    p_mask: float = 0.9
    mask_input: Literal["center", "none"] = "center"
    center: Literal["centroid", "box"] = "centroid"
    width: int = 256
    layers: int = 2
    heads: int = 8
    ffn: int = 1024
    dropout: float = 0.1
    detach_image: bool = False
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_fraction(self.weight, "weight", high=None)
        check_fraction(self.ratio, "ratio")
        check_int(self.min_masked, "min_masked", minimum=0)
        check_fraction(self.p_mask, "p_mask")
        check_choice(self.mask_input, ("center", "none"), "mask_input")
        check_choice(self.center, ("centroid", "box"), "center")
        for name in ("width", "layers", "heads", "ffn"):
            check_int(getattr(self, name), name, minimum=1)
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        check_fraction(self.dropout, "dropout", high=None)
        if self.dropout >= 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not isinstance(self.detach_image, bool):
            raise TypeError(f"detach_image must be a bool, got {type(self.detach_image).__name__}")
        check_fraction(self.label_smoothing, "label_smoothing")


def select_words(
    maskable: Tensor, *, ratio: float, min_masked: int, generator: torch.Generator | None = None
) -> Tensor:
    """Choose the words to predict: per sentence ``m = max(min(μ, n), SR(ρ·n))`` of its ``n``
    maskable words, uniformly at random.

    Args:
        maskable: ``[B, L]`` bool (never padding or special tokens).
        ratio: ρ in [0, 1]; ``SR`` is stochastic rounding (``masksd.masking.masked_counts``), so
            ``E[SR(ρn)] = ρn``.
        min_masked: μ >= 0.
        generator: source of randomness (on ``maskable``'s device).

    Returns:
        ``[B, L]`` bool ``selected ⊆ maskable`` with ``m`` True entries per row.
    """
    if not isinstance(maskable, Tensor) or maskable.dtype != torch.bool or maskable.dim() != 2:
        raise TypeError("maskable must be a [B, L] bool tensor, "
                        f"got {getattr(maskable, 'shape', maskable)!r}")
    check_int(min_masked, "min_masked", minimum=0)
    available = maskable.sum(dim=1)
    counts = masked_counts(available, ratio, generator=generator)
    counts = torch.maximum(counts, available.clamp(max=min_masked))
    draws = torch.rand(maskable.shape, generator=generator, device=maskable.device)
    keys = torch.where(maskable, draws, torch.full_like(draws, 2.0))
    order = torch.argsort(keys, dim=1, stable=True)
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return (ranks < counts[:, None]) & maskable


def mask_centers(target: Tensor, mode: Literal["centroid", "box"] = "centroid") -> tuple[Tensor, Tensor]:
    """Centres of the ground-truth masks in normalised image coordinates.

    Args:
        target: ``[B, H, W]`` or ``[B, 1, H, W]`` mask (bool or float in [0, 1]).
        mode: ``"centroid"``: ``Σ y·((x+½)/W, (r+½)/H) / Σ y`` over pixels (column x, row r);
            ``"box"``: the centre of the bounding box of the pixels with ``y > 0``.

    Returns:
        ``(centers [B, 2] float32 as (x, y) in [0, 1], present [B] bool)``; an empty mask gives
        ``present = False`` and centre ``(0, 0)`` (never NaN).
    """
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3:
        raise ValueError(f"target must have shape [B, H, W] or [B, 1, H, W], got {tuple(target.shape)}")
    check_choice(mode, ("centroid", "box"), "center")
    y = target.detach().float()
    height, width = y.shape[-2:]
    columns, rows = y.sum(dim=1), y.sum(dim=2)  # [B, W], [B, H]
    total = columns.sum(dim=1)
    present = total > 0
    if mode == "centroid":
        xs = (torch.arange(width, device=y.device, dtype=torch.float32) + 0.5) / width
        ys = (torch.arange(height, device=y.device, dtype=torch.float32) + 0.5) / height
        cx = (columns * xs).sum(dim=1) / total.clamp(min=1e-12)
        cy = (rows * ys).sum(dim=1) / total.clamp(min=1e-12)
    else:
        cx, cy = (_box_center(mass > 0, size) for mass, size in ((columns, width), (rows, height)))
    centers = torch.stack([cx, cy], dim=1)
    return torch.where(present[:, None], centers, torch.zeros_like(centers)), present


def _box_center(occupied: Tensor, size: int) -> Tensor:
    first = occupied.int().argmax(dim=1)
    last = size - 1 - occupied.flip(1).int().argmax(dim=1)
    return (first + last + 1).float() / (2 * size)


class MaskedWordHead(nn.Module):
    """BERT-style tied output layer: ``z = LN(GELU(h W + b)) · Eᵀ`` (float32, autocast off).

    ``E`` ``[V, C]`` is passed at every call (the model's own word table); this module holds only
    the transform ``W [d → C]``, its bias and the LayerNorm.
    """

    def __init__(self, width: int, word_dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, word_dim)
        self.norm = nn.LayerNorm(word_dim)

    def forward(self, hidden: Tensor, word_embedding: Tensor) -> Tensor:
        """``hidden [M, d]``, ``word_embedding [V, C]`` → logits ``[M, V]`` float32."""
        with autocast_off(hidden):
            x = self.norm(F.gelu(self.dense(hidden.float())))
            return F.linear(x, word_embedding.float())


class _Predictor(nn.Module):
    """Pre-norm Transformer over ``[text; image; mask centre]``; returns the text positions."""

    def __init__(self, text_dim: int, image_dim: int, config: MaskGroundingConfig) -> None:
        super().__init__()
        d = config.width
        self.text_in = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, d))
        self.image_in = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, d))
        self.types = nn.Parameter(torch.randn(3, d) * 0.02)  # text, image, mask
        self.use_center = config.mask_input == "center"
        if self.use_center:
            self.center_in = nn.Sequential(nn.Linear(2, d), nn.ReLU(), nn.Linear(d, d))
            self.no_mask = nn.Parameter(torch.randn(d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, config.heads, config.ffn, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False)

    def forward(
        self,
        words: Tensor,
        image: Tensor,
        grid: tuple[int, int] | None,
        centers: Tensor | None,
        present: Tensor | None,
        padding: Tensor | None = None,
    ) -> Tensor:
        """``words [B, L, D_t]``, ``image [B, N, D_v]``, ``centers [B, 2]``, ``present [B]``,
        ``padding [B, L]`` bool (True = text padding, masked as attention keys; the image and mask
        keys never are, so no row is all-masked) → ``[B, L, d]``."""
        text = self.text_in(words) + self.types[0]
        visual = self.image_in(image) + self.types[1]
        if grid is not None:
            visual = visual + sine_positions(grid, visual.shape[-1], visual.device).to(visual.dtype)
        parts = [text, visual]
        if self.use_center:
            assert centers is not None and present is not None
            encoded = self.center_in(centers.to(text.dtype))  # [B, d]
            mask = torch.where(present[:, None], encoded, self.no_mask.to(encoded.dtype)) + self.types[2]
            parts.append(mask[:, None])
        tokens = torch.cat(parts, dim=1)  # [B, L + N (+ 1), d]
        keys = None
        if padding is not None:
            visible = torch.zeros(tokens.shape[0], tokens.shape[1] - words.shape[1], dtype=torch.bool,
                                  device=tokens.device)
            keys = torch.cat([padding.to(device=tokens.device, dtype=torch.bool), visible], dim=1)
        return self.encoder(tokens, src_key_padding_mask=keys)[:, : words.shape[1]]


class MaskGrounding(Objective):
    """MagNet's Mask Grounding as a masksd objective (see the module docstring).

    Args:
        word_dim: width C of the text's embedded tokens (= the word table's width; the mask
            token's size). CLIP ViT-B: 512.
        text_dim: width of the text's scoring features (``Encoded.tokens``; hooks: the
            ``HookSpec.text.tokens`` tap after its projection).
        image_dim: width of the image's scoring features.
        config: ``MaskGroundingConfig`` (defaults and their sources there).
        name: key of the loss term.

    Needs from the model (first training step raises a TypeError naming what is missing): token
    ids, the input-embedding matrix, per-word text features and image features (see
    docs/objectives.md). Parameters (training only, under ``objectives.<name>.``): the mask token
    ``[C]``, the predictor and the head's transform; never the word table. The text's padding
    (``features["pad_mask"]`` of the text features, else the trailing pad run of the ids) is masked
    as keys in the predictor, so padding never influences a prediction.

    ``info``: ``masked`` ``[B, L]`` (the words predicted), ``replaced`` ``[B, L]`` (those whose
    embedding was the mask token), ``predictions`` ``[B, L]`` (argmax ids, -1 elsewhere),
    ``accuracy`` (scalar), ``centers`` ``[B, 2]`` and ``present`` ``[B]`` (all detached).
    """

    def __init__(
        self,
        *,
        word_dim: int,
        text_dim: int,
        image_dim: int,
        config: MaskGroundingConfig | None = None,
        name: str = "mask_grounding",
    ) -> None:
        super().__init__()
        config = MaskGroundingConfig() if config is None else config
        if not isinstance(config, MaskGroundingConfig):
            raise TypeError(f"config must be a MaskGroundingConfig, got {type(config).__name__}")
        for argument, value in (("word_dim", word_dim), ("text_dim", text_dim), ("image_dim", image_dim)):
            check_int(value, argument, minimum=1)
        self.name, self.config, self.weight = name, config, float(config.weight)
        self.dims = {"word_dim": word_dim, "text_dim": text_dim, "image_dim": image_dim}
        self.mask_token = nn.Parameter(torch.randn(word_dim) * 0.02)
        self.predictor = _Predictor(text_dim, image_dim, config)
        self.head = MaskedWordHead(config.width, word_dim)

    def extra_repr(self) -> str:
        c = self.config
        return (f"name={self.name!r}, ratio={c.ratio}, min_masked={c.min_masked}, p_mask={c.p_mask}, "
                f"mask_input={c.mask_input!r}, weight={c.weight}")

    def output_weight(self, runner: Runner) -> Tensor:
        """The tied output matrix: the model's own input-embedding matrix ``[V, C]`` (not a copy)."""
        weight = runner.word_embedding()
        check_width(weight, self.dims["word_dim"], f"{self.name}: the input-embedding matrix rows",
                    "word_dim")
        return weight

    def select(self, step: Step) -> tuple[Tensor, Tensor]:
        """``(selected, replaced)``, ``[B, L]`` bool, drawn from ``step.generator``."""
        maskable = step.embedded("text").maskable
        c = self.config
        with torch.no_grad():
            selected = select_words(maskable, ratio=c.ratio, min_masked=c.min_masked,
                                    generator=step.generator)
            draws = torch.rand(maskable.shape, generator=step.generator, device=maskable.device)
            replaced = selected & (draws < c.p_mask)
        return selected, replaced

    def forward(self, step: Step, runner: Runner) -> ObjectiveOutput:
        """Mask, re-encode the text, predict the selected words' ids; loss = mean CE."""
        name = self.name
        embedded = step.embedded("text")
        check_width(embedded.tokens, self.dims["word_dim"], f"{name}: the embedded words", "word_dim")
        ids = runner.token_ids(step)
        weight = self.output_weight(runner)
        centers = present = None
        if self.config.mask_input == "center":
            if step.target is None:
                raise ValueError(f"{name}: mask_input='center' needs the ground-truth mask (pass target=...)")
            centers, present = mask_centers(step.target, self.config.center)
        selected, replaced = self.select(step)
        encoded = runner.rerun(step, mask={"text": (replaced, self.mask_token)}, stop_at_features=True)
        words, image = encoded["text"], encoded["image"]
        if words is None or image is None:
            raise ValueError(f"{name} needs per-word text features and image features (HookSpec.*.tokens)")
        if words.tokens.shape[:2] != embedded.maskable.shape:
            raise ValueError(
                f"{name}: the text features {tuple(words.tokens.shape)} do not line up with the embedded "
                f"words {tuple(embedded.maskable.shape)}; it needs one feature per word (a [B, L, D] text "
                "tokens tap)"
            )
        check_width(words.tokens, self.dims["text_dim"], f"{name}: the text features", "text_dim")
        check_width(image.tokens, self.dims["image_dim"], f"{name}: the image features", "image_dim")
        visual = image.tokens.detach() if self.config.detach_image else image.tokens
        image_view = step.views.get("image")
        grid = grid_of(image, image_view.embedded.grid if image_view is not None else None)
        padding = text_padding(step, runner, words)  # [B, L], masked as keys
        hidden = self.predictor(words.tokens, visual, grid, centers, present, padding)  # [B, L, d]
        rows, cols = selected.nonzero(as_tuple=True)
        count = int(rows.numel())
        if count == 0:  # nothing to predict: one zero-weighted position keeps every parameter in the graph
            rows = cols = torch.zeros(1, dtype=torch.long, device=hidden.device)
        logits = self.head(hidden[rows, cols], weight)  # [M, V]
        labels = ids[rows, cols]
        if count and int(labels.max()) >= logits.shape[1]:
            raise ValueError(
                f"{name}: token id {int(labels.max())} is outside the input-embedding matrix "
                f"({logits.shape[1]} rows)"
            )
        with autocast_off(logits):
            ce = F.cross_entropy(logits, labels, reduction="none",
                                 label_smoothing=self.config.label_smoothing)
            loss = ce.sum() / count if count else ce.sum() * 0.0
        with torch.no_grad():
            predictions = torch.full_like(ids, -1)
            guess = logits.argmax(dim=1)
            accuracy = (guess == labels).float().mean() if count else torch.zeros((), device=logits.device)
            if count:
                predictions[rows, cols] = guess
        info = {
            "masked": selected, "replaced": replaced, "predictions": predictions, "accuracy": accuracy,
            "centers": centers if centers is not None else torch.zeros(ids.shape[0], 2, device=ids.device),
            "present": (present if present is not None
                        else torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)),
        }
        return ObjectiveOutput(loss=loss, info=info)
