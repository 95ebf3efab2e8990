"""Selection diagnostics: does guided masking pick what the paper says it picks?

CM-MaskSD's correlation filtering is meant to keep the image patches and the words that matter
for the referent. These functions measure it in any training loop, from a step's
``DistillOutput.selections`` and the ground truth:

* ``selection_precision``: for the masked-image branch, the share of the *kept* units that lies
  on the target (the target resampled to the unit grid by area), next to the target's share of
  all units — which is what a random selection of the same size would give on average — and the
  share of the target the kept units cover (recall).
* ``kept_by_role``: for the masked-word branch, how often words of each role (say target noun,
  attribute, relation, distractor, function word; the caller supplies role ids) were kept.

Both return device tensors of sums, so a loop can accumulate them and read them once per epoch
(``SelectionStats``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = ["SelectionStats", "kept_by_role", "selection_precision", "target_on_units"]


def target_on_units(target: Tensor, grid: tuple[int, int]) -> Tensor:
    """The share of every unit covered by the target: ``[B, H, W]`` → ``[B, h_u * w_u]`` in [0, 1]."""
    if not isinstance(target, Tensor) or target.dim() != 3:
        raise ValueError("target must be a [B, H, W] mask, "
                         f"got {getattr(target, 'shape', type(target).__name__)}")
    pooled = F.adaptive_avg_pool2d(target[:, None].float(), tuple(grid))
    return rearrange(pooled, "b 1 h w -> b (h w)")


def selection_precision(kept: Tensor, target: Tensor, grid: tuple[int, int]) -> dict[str, Tensor]:
    """Sums over a batch of how well the kept image units cover the target.

    Args:
        kept: ``[B, N_u]`` bool, e.g. ``out.selections["lmvsd"]["kept"]``.
        target: ``[B, H, W]`` binary ground truth.
        grid: the unit grid ``(h_u, w_u)`` (``out.selections["lmvsd"]["grid"]``).

    Returns:
        float32 sums (divide ``on_target`` by ``kept``, ``target_units`` by ``units``,
        ``covered`` by ``target_units`` for precision, random baseline and recall):
        ``kept`` (number of kept units), ``on_target`` (target area inside kept units, in
        units), ``units`` (all units), ``target_units`` (target area in units), ``covered``
        (same as ``on_target``: target area the kept units cover).
    """
    if kept.dtype != torch.bool or kept.dim() != 2:
        raise ValueError(f"kept must be a [B, N] bool tensor, got {tuple(kept.shape)} {kept.dtype}")
    share = target_on_units(target.to(kept.device), grid)
    if share.shape != kept.shape:
        raise ValueError(f"kept {tuple(kept.shape)} does not match the grid {grid} "
                         f"for a batch of {share.shape[0]}")
    on_target = (share * kept).sum()
    return {
        "kept": kept.sum().float(),
        "on_target": on_target,
        "units": torch.full((), float(kept.numel()), device=kept.device),  # a fill, not a host copy
        "target_units": share.sum(),
        "covered": on_target,
    }


def kept_by_role(kept: Tensor, roles: Tensor, num_roles: int) -> dict[str, Tensor]:
    """Per role, how many words were present and how many were kept.

    Args:
        kept: ``[B, L]`` bool, e.g. ``out.selections["vmlsd"]["kept"]``.
        roles: ``[B, L]`` int64 role id per position; negative ids (padding, special tokens)
            are ignored.
        num_roles: number of role ids.

    Returns:
        ``{"present": [num_roles], "kept": [num_roles]}`` float32 counts.
    """
    if roles.shape != kept.shape:
        raise ValueError(f"roles {tuple(roles.shape)} must match kept {tuple(kept.shape)}")
    if roles.device.type == "cpu" and roles.numel() and int(roles.max()) >= num_roles:  # no sync: on the host
        raise ValueError(f"roles holds id {int(roles.max())}, but num_roles is {num_roles}")
    roles = roles.to(kept.device, non_blocking=True)
    # one-hot sums instead of boolean indexing: no data-dependent shape, no host sync
    onehot = F.one_hot(roles.clamp(min=0), num_roles).float() * (roles >= 0)[..., None]
    return {"present": onehot.sum(dim=(0, 1)), "kept": (onehot * kept[..., None]).sum(dim=(0, 1))}


@dataclass
class SelectionStats:
    """Accumulates ``selection_precision`` / ``kept_by_role`` sums on the device; read once.

    ``summary()`` returns plain floats: ``precision`` (kept units on the target), ``random``
    (the target's share of all units: a random selection's expected precision), ``recall``,
    and ``kept_rate/<role>`` per role name.
    """

    role_names: tuple[str, ...] = ()
    sums: dict[str, Tensor] = field(default_factory=dict)

    def add_image(self, kept: Tensor, target: Tensor, grid: tuple[int, int]) -> None:
        for key, value in selection_precision(kept, target, grid).items():
            self.sums[key] = self.sums.get(key, 0) + value

    def add_words(self, kept: Tensor, roles: Tensor) -> None:
        for key, value in kept_by_role(kept, roles, len(self.role_names)).items():
            self.sums[f"role_{key}"] = self.sums.get(f"role_{key}", 0) + value

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        s = {k: v.detach().cpu() for k, v in self.sums.items()}
        if "kept" in s:
            out["precision"] = float(s["on_target"] / s["kept"].clamp(min=1))
            out["random"] = float(s["target_units"] / s["units"].clamp(min=1))
            out["recall"] = float(s["covered"] / s["target_units"].clamp(min=1e-12))
        if "role_present" in s:
            for i, name in enumerate(self.role_names):
                present = float(s["role_present"][i])
                out[f"kept_rate/{name}"] = float(s["role_kept"][i]) / present if present else float("nan")
        return out
