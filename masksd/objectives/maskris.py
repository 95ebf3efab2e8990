"""MaskRIS (Lee et al., "MaskRIS: Semantic Distortion-aware Data Augmentation for Referring Image
Segmentation", arXiv 2411.19067; code naver-ai/maskris): one extra pass on a randomly masked
image and sentence, trained to reproduce the main pass's detached prediction.

Per training step (the main pass on the clean inputs is the wrapper's main branch)::

    image'  = image with ⌈r_I·P⌉ of its P square patches (patch_size px) set to 0   (input tensor)
    ids'    = ids with each real token chosen w.p. r_T; a chosen one becomes [MASK] (80 %),
              a random id (10 %) or stays (10 %)                                     (BERT-style)
    logits' = model(image', ids')                                  one full forward, shared weights
    loss    = BCE-with-logits(logits', σ(M_seg).detach())

``M_seg`` is the engine's one-logit map: two-class logits ``[B, 2, h, w]`` become ``x1 − x0``
(``HookSpec(two_class=True)``), and ``σ(x1 − x0) = softmax(x)[1]``, so this BCE *is* MaskRIS's
cross-entropy of the masked pass against ``softmax(logits.detach())`` (unweighted; MaskRIS's own
criterion weights the classes 0.9 / 1.1). MaskRIS's total is ``0.5·main + 0.5·masked``: the
objective's weight is 0.5, and ``seg_weight=0.5`` on the wrapper (``MaskRIS.paper_options()``)
completes the recipe.

``mode="embedding"`` masks in embedding space instead: a random ``image_ratio`` of the image units
(``masksd.step.Units``: the patch embeddings, or the coarser unit grid) and the BERT-style
chosen words (mask → a learned text mask token, random → a random row of the word table) are
replaced in one joint pass (``Backend.run_replaced``), with learned mask tokens as LMVSD/VMLSD use.

Rules and sources are in ``MaskRISConfig`` and docs/objectives.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from einops import repeat
from torch import Tensor, nn

from masksd.losses import consistency_loss
from masksd.objectives._common import check_choice, check_fraction, check_int
from masksd.objectives.base import Objective, ObjectiveOutput
from masksd.step import Step

if TYPE_CHECKING:
    from masksd.engine.runner import Runner

__all__ = ["MaskRIS", "MaskRISConfig", "corrupt_ids", "mask_image", "random_subset"]


@dataclass(frozen=True, kw_only=True)
class MaskRISConfig:
    """Settings of ``MaskRIS`` (tags: [paper] arXiv 2411.19067, [code] naver-ai/maskris
    ``scripts/script.sh``, ``util/aug_mask.py``, ``data/dataset_refer_bert.py``, [ours] our decision).

    Attributes:
        weight: loss weight of the masked pass (>= 0). [code] 0.5 (with 0.5 on the main loss:
            set ``seg_weight=0.5`` on the wrapper, see ``MaskRIS.paper_options()``).
        mode: ``"input"``: zero pixels and replace token ids, then call the model (no hook needed
            beyond knowing the arguments) [paper]; ``"embedding"``: replace embedded image units and
            word embeddings by learned mask tokens in one joint pass [ours].
        image_ratio: fraction r_I of the image patches masked, in [0, 1]. [code] 0.75. Per sample
            exactly ``P − ⌊P·(1 − r_I)⌋`` of the ``P`` patches (MaskRIS's ``len_keep`` rule), chosen
            uniformly at random.
        patch_size: side of a square patch in input pixels (``"input"`` mode). [code] 32. The image
            side need not be a multiple: the grid is ``⌈H/p⌉ × ⌈W/p⌉`` and the last row / column of
            patches is cropped at the border [ours] (MaskRIS asserts a square image and ``H % p == 0``;
            for those sizes the two rules agree). A patch larger than the image is an error.
        text_ratio: probability r_T that a real token (not padding, not a special id, not the mask id)
            is chosen, independently per token, in [0, 1]. [code] 0.15.
        text_mask / text_random / text_keep: what becomes of a chosen token: the mask id (input) /
            the text mask token (embedding), a random id, or itself; they sum to 1. [code] 0.8 / 0.1
            / 0.1 (BERT).
        mask_id: the tokenizer's mask id (BERT: 103), needed in input mode when ``text_ratio > 0``
            and ``text_mask > 0``. CLIP's tokenizer has none: pick an id (e.g. the pad id 0, our choice
            in examples/cris_clip) or use embedding mode.
        vocab_size: random ids are drawn from ``[0, vocab_size)`` without the special ids and the mask
            id [ours: MaskRIS draws from the whole vocabulary, but CLIP pools the sentence at the first
            EOT id, so a random EOT would move it]. None: the rows of the model's word table
            (``Runner.word_embedding()``) when the model can give it.
        special_ids: ids never chosen nor drawn, besides the model's non-maskable positions (the text
            ``Embedded.maskable``) and the ids the backend knows (hooks: ``Maskable.never``; towers: the
            text tower's ``special_ids`` attribute, e.g. the open_clip adapter's). [code] BERT's 0, 100-103.
    """

    weight: float = 0.5
    mode: Literal["input", "embedding"] = "input"
    image_ratio: float = 0.75
    patch_size: int = 32
    text_ratio: float = 0.15
    text_mask: float = 0.8
    text_random: float = 0.1
    text_keep: float = 0.1
    mask_id: int | None = None
    vocab_size: int | None = None
    special_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_fraction(self.weight, "weight", high=None)
        check_choice(self.mode, ("input", "embedding"), "mode")
        for name in ("image_ratio", "text_ratio", "text_mask", "text_random", "text_keep"):
            check_fraction(getattr(self, name), name)
        split = self.text_mask + self.text_random + self.text_keep
        if abs(split - 1.0) > 1e-6:
            raise ValueError(f"text_mask + text_random + text_keep must be 1, got {split} "
                             f"({self.text_mask} + {self.text_random} + {self.text_keep})")
        check_int(self.patch_size, "patch_size", minimum=1)
        for name in ("mask_id", "vocab_size"):
            value = getattr(self, name)
            if value is not None:
                check_int(value, name, minimum=0 if name == "mask_id" else 1)
        if self.mask_id is not None and self.vocab_size is not None and self.mask_id >= self.vocab_size:
            raise ValueError(f"mask_id {self.mask_id} lies outside the vocabulary [0, {self.vocab_size}); "
                             "pass the tokenizer's mask id (BERT: 103) or the right vocab_size")
        ids = tuple(self.special_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise TypeError(f"special_ids must be non-negative ints, got {self.special_ids!r}")
        object.__setattr__(self, "special_ids", ids)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``U[0, 1)`` draws made on the generator's device, then moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def random_subset(allowed: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Per row, exactly ``n − ⌊n·(1 − ratio)⌋`` of the ``n`` allowed entries, uniformly at random.

    Args:
        allowed: ``[B, N]`` bool.
        ratio: in [0, 1] (MaskRIS's ``len_keep = int(L * (1 - mask_ratio))`` rule).
        generator: source of randomness.

    Returns:
        ``[B, N]`` bool, a subset of ``allowed``.
    """
    check_fraction(ratio, "image_ratio")
    available = allowed.sum(dim=1)
    keep = torch.floor(available.double() * (1.0 - ratio)).long()
    keys = torch.where(allowed, _uniform(tuple(allowed.shape), generator, allowed.device), 2.0)
    ranks = keys.argsort(dim=1).argsort(dim=1)  # 0 = smallest key; masked: the largest n - keep
    return allowed & (ranks >= keep[:, None]) & (ranks < available[:, None])


def mask_image(
    images: Tensor, *, patch_size: int, ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Zero random square patches of the (normalised) input images.

    Args:
        images: ``[B, C, H, W]`` float.
        patch_size: p, the patch side in pixels; the grid is ``⌈H/p⌉ × ⌈W/p⌉`` (border patches cropped).
        ratio: fraction of the patches masked (``random_subset``'s rule).
        generator: source of randomness.

    Returns:
        ``(masked images [B, C, H, W], patches [B, h_p, w_p] bool, True = zeroed)``.

    Raises:
        TypeError / ValueError: not a float 4-D tensor, or a patch larger than the image.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise TypeError("images must be a float [B, C, H, W] tensor, "
                        f"got {getattr(images, 'shape', type(images))}")
    check_int(patch_size, "patch_size", minimum=1)
    batch, _, height, width = images.shape
    if patch_size > min(height, width):
        raise ValueError(f"patch_size {patch_size} is larger than the {height}x{width} image; choose a patch "
                         f"that fits (MaskRIS: 32 px at 448 px, about 1/14 of the side)")
    grid = (math.ceil(height / patch_size), math.ceil(width / patch_size))
    allowed = torch.ones(batch, grid[0] * grid[1], dtype=torch.bool, device=images.device)
    chosen = random_subset(allowed, ratio, generator).view(batch, *grid)
    pixels = repeat(chosen, "b h w -> b (h p) (w q)", p=patch_size, q=patch_size)[:, :height, :width]
    return images.masked_fill(pixels[:, None], 0.0), chosen


def corrupt_ids(
    ids: Tensor,
    eligible: Tensor,
    *,
    ratio: float,
    split: tuple[float, float, float],
    mask_id: int | None,
    vocab_size: int | None,
    excluded: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """BERT-style corruption of token ids (MaskRIS's ``random_word``).

    Args:
        ids: ``[B, L]`` integer token ids.
        eligible: ``[B, L]`` bool, the tokens that may be chosen (never padding or special ids).
        ratio: probability that an eligible token is chosen (independently per token).
        split: ``(mask, random, keep)`` probabilities of a chosen token's fate, summing to 1.
        mask_id: id written for "mask" (needed when a token can be masked).
        vocab_size: random ids are uniform in ``[0, vocab_size)`` minus ``excluded``.
        excluded: ids never drawn as random replacements.
        generator: source of randomness.

    Returns:
        ``(new ids [B, L] of ids' dtype, {"chosen", "to_mask", "to_random"}: [B, L] bool)``.
    """
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer [B, L] tensor, got {getattr(ids, 'dtype', type(ids))}")
    if eligible.shape != ids.shape or eligible.dtype != torch.bool:
        raise ValueError(f"eligible must be a [B, L] bool tensor like ids {tuple(ids.shape)}")
    shape = tuple(ids.shape)
    chosen = eligible & (_uniform(shape, generator, ids.device) < ratio)
    fate = _uniform(shape, generator, ids.device)
    to_mask = chosen & (fate < split[0])
    to_random = chosen & ~to_mask & (fate < split[0] + split[1])
    out = ids
    if split[0] > 0:
        if mask_id is None:
            raise ValueError("text masking needs the tokenizer's mask id: MaskRISConfig(mask_id=...) "
                             "(BERT: 103), or text_mask=0, text_ratio=0, or mode='embedding'")
        out = out.masked_fill(to_mask, mask_id)
    if split[1] > 0:
        if vocab_size is None:
            raise ValueError("random replacement needs the vocabulary size: MaskRISConfig(vocab_size=...), "
                             "or text_random=0")
        skip = sorted({i for i in excluded if 0 <= i < vocab_size})
        if len(skip) >= vocab_size:
            raise ValueError("every id of the vocabulary is excluded from random replacement")
        draw = torch.randint(0, vocab_size - len(skip), shape, generator=generator,
                             device=generator.device if generator is not None else ids.device).to(ids.device)
        for value in skip:  # map [0, V - k) onto [0, V) minus the sorted excluded ids
            draw = draw + (draw >= value).long()
        out = torch.where(to_random, draw.to(ids.dtype), out)
    return out, {"chosen": chosen, "to_mask": to_mask, "to_random": to_random}


class MaskRIS(Objective):
    """MaskRIS's masked pass as a masksd objective (see the module docstring).

    Args:
        config: ``MaskRISConfig`` (defaults and sources there).
        image_dim / text_dim: widths of the embedded image / text tokens, the sizes of the learned
            mask tokens; needed in embedding mode (for each modality it masks), unused in input mode.
        name: key of the loss term.

    Needs (first training step raises naming what is missing): input mode, the image tensor and
    token ids the model receives (towers: ``wrapper(images, ids, ...)``; hooks: the image argument
    and ``HookSpec.text`` ``argument`` / ``Maskable(ids=...)``); embedding mode, the embedded tokens
    (and the word table for ``text_random > 0``). Parameters: embedding mode only, ``image_token
    [C_i]`` and ``text_token [C_t]`` (``N(0, 0.02²)``).

    ``info`` (detached): ``logits [B, 1, h, w]`` of the masked pass, ``image_masked`` (``[B, h_p, w_p]``
    patches, or ``[B, N_u]`` units in embedding mode) with its ``grid``, ``text_chosen`` /
    ``text_to_mask`` / ``text_to_random`` ``[B, L]``, and ``ids`` ``[B, L]`` (input mode).
    """

    def __init__(
        self,
        config: MaskRISConfig | None = None,
        *,
        image_dim: int | None = None,
        text_dim: int | None = None,
        name: str = "maskris",
    ) -> None:
        super().__init__()
        config = MaskRISConfig() if config is None else config
        if not isinstance(config, MaskRISConfig):
            raise TypeError(f"config must be a MaskRISConfig, got {type(config).__name__}")
        self.name, self.config, self.weight = name, config, float(config.weight)
        self.image_token: nn.Parameter | None = None
        self.text_token: nn.Parameter | None = None
        if config.mode == "embedding":
            for modality, dim, ratio in (("image", image_dim, config.image_ratio),
                                         ("text", text_dim, config.text_ratio)):
                if ratio > 0 and dim is None:
                    raise ValueError(f"mode='embedding' masks {modality} tokens: pass {modality}_dim= (the "
                                     f"width of the embedded {modality} tokens, the mask token's size), "
                                     f"or {modality}_ratio=0")
                if dim is not None:
                    check_int(dim, f"{modality}_dim", minimum=1)
                    setattr(self, f"{modality}_token", nn.Parameter(torch.randn(dim) * 0.02))

    @staticmethod
    def paper_options() -> dict[str, Any]:
        """Wrapper options that make the total MaskRIS's ``0.5·main + 0.5·masked`` with MaskRIS alone:
        ``masksd.wrap(model, spec, extra_objectives=[MaskRIS(...)], **MaskRIS.paper_options())``."""
        return {"seg_weight": 0.5, "lmvsd": None, "vmlsd": None}

    def extra_repr(self) -> str:
        c = self.config
        return (f"name={self.name!r}, mode={c.mode!r}, image_ratio={c.image_ratio}, "
                f"patch_size={c.patch_size}, text_ratio={c.text_ratio}, "
                f"split=({c.text_mask}, {c.text_random}, {c.text_keep}), weight={c.weight}")

    # ------------------------------------------------------------------------------ helpers
    def _excluded(self, runner: Runner) -> tuple[int, ...]:
        c = self.config
        return tuple(sorted({*c.special_ids, *runner.special_ids(),
                             *([c.mask_id] if c.mask_id is not None else [])}))

    def _vocab_size(self, runner: Runner) -> int | None:
        """``config.vocab_size``, else the word table's rows; None when neither is known and no random
        id is drawn (ValueError when one is)."""
        c = self.config
        if c.vocab_size is not None:
            return c.vocab_size
        try:
            return int(runner.word_embedding().shape[0])
        except TypeError as error:
            if c.text_random == 0:
                return None
            raise ValueError(f"{self.name}: random replacement needs the vocabulary size; pass "
                             f"MaskRISConfig(vocab_size=...) or text_random=0 ({error})") from error

    def _eligible(self, step: Step, ids: Tensor, excluded: tuple[int, ...]) -> Tensor:
        """``[B, L]`` bool: not an excluded id, and maskable in the main branch when lined up."""
        eligible = ~torch.isin(ids, torch.tensor(excluded, dtype=ids.dtype, device=ids.device))
        view = step.views.get("text")
        embedded = view.embedded if view is not None else None
        if embedded is not None and tuple(embedded.maskable.shape) == tuple(ids.shape):
            eligible = eligible & embedded.maskable.to(ids.device)
        return eligible

    def _text_split(self) -> tuple[float, float, float]:
        c = self.config
        return (c.text_mask, c.text_random, c.text_keep)

    # ------------------------------------------------------------------------------ forward
    def forward(self, step: Step, runner: Runner) -> ObjectiveOutput:
        """One masked pass (input or embedding mode) and its consistency loss."""
        run = self._input_pass if self.config.mode == "input" else self._embedding_pass
        logits, info = run(step, runner)
        loss = consistency_loss(logits, step.logits)
        info["logits"] = logits.detach()
        return ObjectiveOutput(loss=loss, info=info)

    def _input_pass(self, step: Step, runner: Runner) -> tuple[Tensor, dict[str, Any]]:
        c = self.config
        info: dict[str, Any] = {}
        image = ids = None
        with torch.no_grad():
            if c.image_ratio > 0:
                image, patches = mask_image(runner.raw_input(step, "image"), patch_size=c.patch_size,
                                            ratio=c.image_ratio, generator=step.generator)
                info.update(image_masked=patches, grid=tuple(patches.shape[1:]))
            if c.text_ratio > 0:
                raw = runner.raw_input(step, "text")
                excluded = self._excluded(runner)
                vocab = self._vocab_size(runner)
                if c.mask_id is not None and vocab is not None and c.mask_id >= vocab:
                    raise ValueError(f"{self.name}: mask_id {c.mask_id} lies outside the vocabulary "
                                     f"[0, {vocab}); pass the tokenizer's mask id (BERT: 103)")
                ids, picked = corrupt_ids(raw, self._eligible(step, raw, excluded), ratio=c.text_ratio,
                                          split=self._text_split(), mask_id=c.mask_id, vocab_size=vocab,
                                          excluded=excluded, generator=step.generator)
                info.update({f"text_{k}": v for k, v in picked.items()}, ids=ids)
        inputs = {m: value for m, value in (("image", image), ("text", ids)) if value is not None}
        return runner.rerun(step, inputs=inputs), info

    def _embedding_pass(self, step: Step, runner: Runner) -> tuple[Tensor, dict[str, Any]]:
        c = self.config
        info: dict[str, Any] = {}
        tokens: dict[str, Tensor] = {}
        if c.image_ratio > 0 and self.image_token is not None:
            embedded, units = step.embedded("image"), step.view("image").units
            with torch.no_grad():
                chosen = random_subset(units.maskable, c.image_ratio, step.generator)
            where = units.expand(chosen, embedded.maskable)
            tokens["image"] = torch.where(where[..., None], self.image_token.to(embedded.tokens.dtype),
                                          embedded.tokens)
            info.update(image_masked=chosen, grid=units.grid)
        if c.text_ratio > 0 and self.text_token is not None:
            embedded = step.embedded("text")
            words = embedded.tokens
            with torch.no_grad():
                vocab = self._vocab_size(runner)
                stand_in = torch.zeros(words.shape[:2], dtype=torch.long, device=words.device)
                draws, picked = corrupt_ids(stand_in, embedded.maskable, ratio=c.text_ratio,
                                            split=self._text_split(), mask_id=0, vocab_size=vocab,
                                            excluded=self._excluded(runner), generator=step.generator)
            if c.text_random > 0:
                table = runner.word_embedding()
                words = torch.where(picked["to_random"][..., None], table[draws].to(words.dtype), words)
            words = torch.where(picked["to_mask"][..., None], self.text_token.to(words.dtype), words)
            tokens["text"] = words
            info.update({f"text_{k}": v for k, v in picked.items()})
        return runner.rerun(step, tokens=tokens), info
