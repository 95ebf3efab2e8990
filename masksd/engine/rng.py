"""State the branches must not disturb: dropout draws (fresh, or the main branch's replayed) and
BatchNorm running statistics (``running_stats_frozen``).

A masked branch re-runs (part of) the model in training mode, so dropout and drop-path draw new
masks there: with masking off, a branch's logits still differ from the main branch's (by up to
2.0 on a LAVT-style model), an R-Drop-like consistency term the paper never describes.

``DistillConfig(dropout="replay")`` removes it: the engine records the random generators'
states at named points of the main branch (before it starts; after each call of a module the
branches reuse; before a tower's encoder or the decoder) and every branch restores them at the
same points, so each dropout layer draws exactly the mask it drew in the main branch and the
only difference between the branches is the token mask. Modules a branch skips (reused from the
main branch) would otherwise shift every later draw; restoring the state recorded after their
main-branch call keeps the sequence aligned. The branch runs inside ``torch.random.fork_rng``,
so the global generators continue afterwards as if the branch had not run (the masks of the next
objective are not correlated with this one's). Replay needs the branch to consume the generator
in the same order and with the same shapes as the main branch (true for masking, which changes
values, not shapes). ``"fresh"`` (the default) is what a plain PyTorch implementation of the
paper does, and what MaskRIS's public code does.

Cost: one ``torch.get_rng_state`` copy (about 5 kB on the CPU, 16 bytes per CUDA device) per
recorded point; none with ``"fresh"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["RngTape", "rng_devices", "running_stats_frozen"]


class RngTape:
    """Generator states recorded at named points of one main branch, restored in its branches.

    Args:
        model: the bare model; the CUDA devices holding its parameters are recorded besides the CPU.
    """

    def __init__(self, model: nn.Module) -> None:
        self.devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        self._states: dict[str, tuple[Tensor, list[Tensor]]] = {}

    def clear(self) -> None:
        """Forget the recorded states (a new main branch starts)."""
        self._states.clear()

    def record(self, point: str) -> None:
        """Remember the generators' states at ``point`` of the main branch."""
        cuda = [torch.cuda.get_rng_state(d) for d in self.devices]
        self._states[point] = (torch.get_rng_state(), cuda)

    def restore(self, point: str) -> None:
        """Set the generators to their states at ``point`` of the main branch (if recorded)."""
        state = self._states.get(point)
        if state is None:
            return
        torch.set_rng_state(state[0])
        for device, cuda in zip(self.devices, state[1]):
            torch.cuda.set_rng_state(cuda, device)

    @contextmanager
    def branch(self, start: str) -> Iterator[None]:
        """Run a branch from the main branch's state at ``start``; the generators are restored
        to their current states afterwards."""
        with torch.random.fork_rng(devices=self.devices):
            self.restore(start)
            yield


def rng_devices(model: nn.Module) -> list[int]:
    """CUDA device indices holding ``model``'s parameters (for ``torch.random.fork_rng``)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Let ``module``'s BatchNorm layers normalise with batch statistics, but keep their running
    statistics (found now, so SyncBatchNorm conversions after wrapping are covered)."""
    saved = []
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.training and norm.track_running_stats:
            saved.append((norm, norm.momentum, norm.num_batches_tracked.clone()))
            norm.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for norm, momentum, tracked in saved:
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(tracked)
