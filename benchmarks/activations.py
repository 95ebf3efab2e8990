"""Activation memory of one training step: bytes the autograd graph saves for backward.

Counted with ``torch.autograd.graph.saved_tensors_hooks`` while the step's forward runs: every
tensor saved for backward is counted once by its storage (views of one storage count once),
and parameters (and buffers) are not activations, so their storages are left out. Works on any
device, CPU included, and does not depend on the allocator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["saved_activation_bytes"]


def saved_activation_bytes(step: Callable[[], object], modules: Sequence[nn.Module]) -> int:
    """Run one training ``step()`` (forward and backward) and count what its forward saves for
    backward (the pack hook fires in the forward only).

    Args:
        step: the step to run.
        modules: modules whose parameters and buffers are excluded from the count.

    Returns:
        bytes of distinct storages saved for backward.
    """
    excluded = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
    seen: set[int] = set()
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in excluded and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return total
