"""Full extra passes of the tower backend (``TowerPasses``, a mixin of ``TowerBackend``).

For objectives that re-run the whole model rather than one tower (MaskRIS,
``masksd.objectives.maskris``):

* ``raw_input(m)``: the images / token ids the wrapper received (``wrapper(images, texts, ...)``);
* ``special_ids()``: the text tower's ``special_ids`` attribute (the open_clip adapter has one);
* ``run_corrupted(image, ids)``: embed the replaced inputs, encode both towers, decode;
* ``run_replaced(tokens)``: encode both towers from replaced embedded tokens, decode.

Neither pass reuses a main-branch feature: both towers and the decoder run (a full pass minus the
embedding of an input that was not replaced). With ``DistillConfig(dropout="replay")`` each tower
and the decoder start from the generator state of their main-branch call.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from masksd.backends.base import MainBranch, Modality
from masksd.backends.rng import RngTape
from masksd.towers import Embedded, Encoded

__all__ = ["TowerPasses"]


class TowerPasses:
    """``raw_input`` / ``run_corrupted`` / ``run_replaced`` of ``TowerBackend``."""

    rng_tape: RngTape | None
    model: Any
    _inputs: tuple[Any, Any] | None = None  # the main branch's (images, texts)
    # also used from TowerBackend: _main_branch, _embed, _encode, _decode

    def raw_input(self, modality: Modality) -> Tensor:
        """The main branch's images ``[B, C, H, W]`` or token ids ``[B, L]`` (the ``texts`` the
        wrapper received, when they are an integer tensor)."""
        self._main_branch()  # type: ignore[attr-defined]
        assert self._inputs is not None
        value = self._inputs[0 if modality == "image" else 1]
        if modality == "image" and not (isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 4):
            raise TypeError(
                f"the images given to the wrapper are {_describe(value)}, not a float [B, C, H, W] tensor; "
                "input-space corruption needs the image tensor (or use MaskRISConfig(mode='embedding'))"
            )
        integer = isinstance(value, Tensor) and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        if modality == "text" and not (integer and value.dim() == 2):
            raise TypeError(
                f"the texts given to the wrapper are {_describe(value)}, not integer token ids [B, L]; "
                "input-space corruption replaces ids, so pass the ids as texts, or use "
                "MaskRISConfig(mode='embedding') or text_ratio=0"
            )
        return value

    def special_ids(self) -> tuple[int, ...]:
        """The text tower's ``special_ids`` attribute when it has one (the open_clip adapter's SOT,
        EOT and pad ids), else none."""
        ids = getattr(self.model.text_tower, "special_ids", ())
        return tuple(int(i) for i in ids) if isinstance(ids, (tuple, list)) else ()

    def run_corrupted(self, image: Tensor | None = None, ids: Tensor | None = None) -> Tensor:
        """Logits ``[B, 1, h, w]`` of embed → encode → decode on the replaced inputs."""
        main: MainBranch = self._main_branch()  # type: ignore[attr-defined]
        embedded = dict(main.embedded)
        if image is not None:
            embedded["image"] = self._embed("image", image)  # type: ignore[attr-defined]
        if ids is not None:
            embedded["text"] = self._embed("text", ids)  # type: ignore[attr-defined]
        return self._full_pass(embedded)

    def run_replaced(self, tokens: Mapping[Modality, Tensor]) -> Tensor:
        """Logits ``[B, 1, h, w]`` of encode → decode with the given ``[B, N, C]`` embedded tokens."""
        main: MainBranch = self._main_branch()  # type: ignore[attr-defined]
        embedded = dict(main.embedded)
        for modality, value in tokens.items():
            expected = tuple(embedded[modality].tokens.shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"replacement {modality} tokens {tuple(value.shape)} must have the embedded shape {expected}")
            embedded[modality] = embedded[modality].with_tokens(value)
        return self._full_pass(embedded)

    def _full_pass(self, embedded: dict[str, Embedded]) -> Tensor:
        tape = self.rng_tape
        encoded: dict[str, Encoded] = {}
        with tape.branch("encode image") if tape is not None else nullcontext():
            for modality in ("image", "text"):
                if tape is not None:
                    tape.restore(f"encode {modality}")
                encoded[modality] = self._encode(modality, embedded[modality])  # type: ignore[attr-defined]
            if tape is not None:
                tape.restore("decode")
            return self._decode(self.model.decoder, encoded["image"], encoded["text"])  # type: ignore[attr-defined]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
