"""Held-out figures of ``pretrain_clip.py``: retrieval recall and word/sentence–patch hit rates."""

from __future__ import annotations

import math

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

__all__ = ["coverage", "hits", "mean_of", "recall"]


def recall(sim: Tensor, same: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k of ``sim [Q, C]`` whose positives are ``same [Q, C]`` (identical caption texts
    count as the same caption): the rank of a query is the number of negatives above its best positive."""
    best = sim.masked_fill(~same, -math.inf).amax(1, keepdim=True)
    rank = (sim.masked_fill(same, -math.inf) > best).sum(1)
    return {f"r@{k}": (rank < k).float().mean().item() for k in ks}


def coverage(labels: np.ndarray, grid: int, num: int) -> Tensor:
    """int ``[S, S]`` labels → ``[num, grid²]``: row ``l`` = the share of each patch's pixels
    labelled ``l``."""
    cells = rearrange(torch.from_numpy(labels.astype(np.int64)), "(h a) (w b) -> (h w) (a b)", h=grid, w=grid)
    return (cells[None] == torch.arange(num)[:, None, None]).float().mean(-1)


def hits(scores: Tensor, cover: Tensor, objects: Tensor | None = None) -> dict[str, float]:
    """``scores [P]`` of the patches, ``cover [P]`` their share on the named object → top-1 hit,
    top-k precision (k = the object's area in patches) and chance (the object's area share). With
    ``objects [P]`` (their share on any object) also the same among object pixels only (bright
    patches score high even at random init; this chance is the named object's share of the objects)."""
    k, top = max(1, round(cover.sum().item())), scores.argmax()
    out = {"top1": cover[top].item(), "topk": cover[scores.topk(k).indices].mean().item(),
           "chance": cover.mean().item()}
    if objects is not None:
        out.update(top1_on_objects=objects[top].item(),
                   top1_among_objects=(cover[top] / objects[top]).nan_to_num().item(),
                   chance_among_objects=(cover.sum() / objects.sum()).item())
    return out


def mean_of(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} if rows else {}
    return {**out, "lift_top1": out["top1"] / out["chance"], "count": len(rows)} if "top1" in out else out
