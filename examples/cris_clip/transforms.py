"""Input transforms for the CRIS-style CLIP example: letterboxing, tokenisation, batching.

* :func:`letterbox` resizes an image keeping its aspect ratio and pads it (centred) to a
  square; the padding is the CLIP mean, i.e. exactly 0 after normalisation.
* :func:`unletterbox` maps a map predicted in letterboxed coordinates (at any resolution,
  e.g. the model's logits size) back to the original image size, for evaluation at the
  original size (CRIS convention).
* :class:`Tokenizer` wraps the offline open_clip BPE tokenizer with a short context.
* :class:`PreparedDataset` + :func:`collate` turn raw ``{image, mask, sentence, id}`` items
  into model-ready batches. No horizontal-flip augmentation: it would break "left"/"right".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
MAX_LEN: dict[str, int] = {"refcoco": 17, "refcoco+": 17, "refcocog": 22, "synthetic": 17}

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MAX_LEN",
    "LetterboxInfo",
    "PreparedDataset",
    "Tokenizer",
    "collate",
    "letterbox",
    "letterbox_mask",
    "prepare_sample",
    "unletterbox",
]


@dataclass(frozen=True)
class LetterboxInfo:
    """Geometry of one letterbox: the original ``orig_h x orig_w`` image was resized to
    ``new_h x new_w`` (factor ``scale``) and placed at ``(top, left)`` in a ``size x size``
    canvas."""

    orig_h: int
    orig_w: int
    size: int
    scale: float
    new_h: int
    new_w: int
    top: int
    left: int


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


def letterbox_info(orig_h: int, orig_w: int, size: int) -> LetterboxInfo:
    """Letterbox geometry for an ``orig_h x orig_w`` image into a ``size x size`` square."""
    _check_size(size)
    if orig_h < 1 or orig_w < 1:
        raise ValueError(f"image must be non-empty, got {orig_h}x{orig_w}")
    scale = size / max(orig_h, orig_w)
    new_h = min(size, max(1, round(orig_h * scale)))
    new_w = min(size, max(1, round(orig_w * scale)))
    return LetterboxInfo(
        int(orig_h),
        int(orig_w),
        int(size),
        float(scale),
        new_h,
        new_w,
        (size - new_h) // 2,
        (size - new_w) // 2,
    )


def letterbox(image: np.ndarray, size: int) -> tuple[torch.Tensor, LetterboxInfo]:
    """Resize (bicubic, aspect kept) and centre-pad an image, then CLIP-normalise it.

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        size: output side ``S``.

    Returns:
        ``(x, info)``: float32 ``[3, S, S]`` normalised image (padding == 0) and its
        :class:`LetterboxInfo`.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a np.ndarray, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    info = letterbox_info(image.shape[0], image.shape[1], size)
    resized = Image.fromarray(image).resize((info.new_w, info.new_h), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    out = torch.zeros(3, info.size, info.size, dtype=torch.float32)
    out[:, info.top : info.top + info.new_h, info.left : info.left + info.new_w] = (arr - mean) / std
    return out, info


def letterbox_mask(mask: np.ndarray | torch.Tensor, info: LetterboxInfo) -> torch.Tensor:
    """Letterbox a binary mask like its image (nearest resize, zero padding).

    Args:
        mask: bool (or 0/1) ``[H, W]`` with ``H, W == info.orig_h, info.orig_w``.
        info: from :func:`letterbox` of the matching image.

    Returns:
        float32 ``[S, S]`` with values in {0, 1}.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a np.ndarray or torch.Tensor, got {type(mask).__name__}")
    if mask.ndim != 2 or mask.shape != (info.orig_h, info.orig_w):
        raise ValueError(f"mask must have shape [{info.orig_h}, {info.orig_w}] (from info), got {mask.shape}")
    small = Image.fromarray((mask != 0).astype(np.uint8) * 255)
    small = small.resize((info.new_w, info.new_h), Image.NEAREST)
    out = torch.zeros(info.size, info.size, dtype=torch.float32)
    out[info.top : info.top + info.new_h, info.left : info.left + info.new_w] = torch.from_numpy(
        np.asarray(small) > 127
    ).float()
    return out


def unletterbox(prob: torch.Tensor, info: LetterboxInfo) -> torch.Tensor:
    """Map a letterboxed map back to the original image (crop padding, bilinear resize).

    Args:
        prob: ``[..., h, w]`` map covering the whole ``S x S`` letterbox at any resolution
            (probabilities or logits; e.g. the model's ``[B, 1, h, w]`` logits for one image).
        info: the :class:`LetterboxInfo` of the image.

    Returns:
        ``[..., orig_h, orig_w]`` in ``prob``'s floating dtype (float32 for integer input).
    """
    if not isinstance(prob, torch.Tensor):
        raise TypeError(f"prob must be a torch.Tensor, got {type(prob).__name__}")
    if prob.ndim < 2:
        raise ValueError(f"prob must have shape [..., h, w], got {tuple(prob.shape)}")
    if not isinstance(info, LetterboxInfo):
        raise TypeError(f"info must be a LetterboxInfo, got {type(info).__name__}")
    out_dtype = prob.dtype if prob.is_floating_point() else torch.float32
    work = torch.float64 if prob.dtype == torch.float64 else torch.float32
    lead, (h, w) = prob.shape[:-2], prob.shape[-2:]
    x = prob.reshape(-1, 1, h, w).to(work)
    dev = prob.device
    # centres of original pixels -> letterbox coordinates -> grid_sample's [-1, 1]
    u = (torch.arange(info.orig_w, device=dev, dtype=work) + 0.5) * (info.new_w / info.orig_w)
    v = (torch.arange(info.orig_h, device=dev, dtype=work) + 0.5) * (info.new_h / info.orig_h)
    gx = 2.0 * (info.left + u) / info.size - 1.0
    gy = 2.0 * (info.top + v) / info.size - 1.0
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # [H, W, 2] (x, y)
    grid = grid.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(*lead, info.orig_h, info.orig_w).to(out_dtype)


class Tokenizer:
    """open_clip BPE tokenizer with a fixed (short) context.

    ``tok(["the red circle"])`` -> LongTensor ``[B, context_length]``: SOT, tokens, EOT, zero
    padding. Longer sentences are truncated and the last position is forced to EOT.
    Works offline for the OpenAI-CLIP models (the BPE vocabulary ships with open_clip).
    """

    def __init__(self, model_name: str = "ViT-B-16", context_length: int = 17) -> None:
        import open_clip

        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2, got {context_length!r}")
        self.model_name = model_name
        self.context_length = context_length
        self._tok = open_clip.get_tokenizer(model_name)
        self.sot_token_id: int | None = getattr(self._tok, "sot_token_id", None)
        self.eot_token_id: int | None = getattr(self._tok, "eot_token_id", None)
        self.pad_token_id = 0

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a str or a sequence of str")
        ids = self._tok(list(texts), context_length=self.context_length).long()
        if self.eot_token_id is not None and ids.numel():
            full = ids[:, -1] != self.pad_token_id
            ids[full, -1] = self.eot_token_id  # truncated rows keep their EOT
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_name!r}, context_length={self.context_length})"


def prepare_sample(item: dict[str, Any], *, image_size: int, tokenizer: Tokenizer) -> dict[str, Any]:
    """Turn a raw ``{image, mask, sentence, id}`` item into model inputs.

    Returns a dict: ``image`` float32 ``[3, S, S]``, ``mask`` float32 ``[S, S]`` (letterboxed),
    ``text`` long ``[L]``, ``info`` (:class:`LetterboxInfo`), ``orig_mask`` bool ``[H, W]``
    numpy, ``sentence`` str, ``id``. A missing ``mask`` (inference) gives ``mask=None``.
    """
    for key in ("image", "sentence"):
        if key not in item:
            raise ValueError(f"item is missing key {key!r}; got keys {sorted(item)}")
    image, info = letterbox(np.asarray(item["image"]), image_size)
    orig = item.get("mask")
    mask = None
    if orig is not None:
        orig = np.asarray(orig).astype(bool)
        mask = letterbox_mask(orig, info)
    return {
        "image": image,
        "mask": mask,
        "text": tokenizer([item["sentence"]])[0],
        "info": info,
        "orig_mask": orig,
        "sentence": item["sentence"],
        "id": item.get("id"),
    }


class PreparedDataset(Dataset):
    """Wraps a raw dataset (synthetic or refer) and applies :func:`prepare_sample`."""

    def __init__(self, base: Dataset, *, image_size: int, tokenizer: Tokenizer) -> None:
        _check_size(image_size)
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable, got {type(tokenizer).__name__}")
        self.base, self.image_size, self.tokenizer = base, int(image_size), tokenizer

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return prepare_sample(self.base[index], image_size=self.image_size, tokenizer=self.tokenizer)


_STACK_KEYS = ("image", "mask", "text")


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``image`` [B,3,S,S], ``mask`` [B,S,S], ``text`` [B,L]; keep the rest as lists."""
    if len(batch) == 0:
        raise ValueError("batch must be non-empty")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if key in _STACK_KEYS and all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
