"""Two-process DDP (gloo, CPU) with LMVSD, VMLSD and all the auxiliary objectives (Mask Grounding,
CAL on the encoders' and on the fused features, language reconstruction), without
``find_unused_parameters`` (the pattern of ``test_ddp.py``).

DDP raises on the next forward if a parameter got no gradient in the previous backward (a head
that fell out of the graph because nothing was masked or no sample had a foreground: the middle
step has neither), and averages gradients, so after a few steps both ranks must hold
bit-identical parameters.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from objective_models import (
    ALL_OBJECTIVES,
    all_objectives,
    hooks_batch,
    hooks_wrapper,
    towers_batch,
    towers_wrapper,
)
from spawn_ranks import replicas, run_ranks
from tiny_models import EOT, SOT
from torch.nn.parallel import DistributedDataParallel

from masksd import LMVSDConfig, VMLSDConfig

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, result_dir: str, backend: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    objectives = all_objectives(seed=100 + rank)  # different per rank: DDP broadcasts rank 0's
    build, batch = (towers_wrapper, towers_batch) if backend == "towers" else (hooks_wrapper, hooks_batch)
    wrapper = build(objectives, seed=rank, lmvsd=LMVSDConfig(ratio=0.5), vmlsd=VMLSDConfig(ratio=0.5)).train()
    model = DistributedDataParallel(wrapper)  # find_unused_parameters=False
    start = torch.cat([p.detach().flatten() for p in wrapper.parameters()]).clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask_gen = torch.Generator().manual_seed(2000 + rank)
    losses, predicted = [], []
    for step in range(STEPS):
        images, ids, target = batch(4, seed=1000 * rank + step)  # different data per rank
        if step == 1:  # nothing to supervise: no foreground (alignment), no word (towers: SOT, EOT only)
            target = torch.zeros_like(target)
            if backend == "towers":
                ids = torch.zeros_like(ids)
                ids[:, :2] = torch.tensor([SOT, EOT])
        out = model(images, ids, target=target, generator=mask_gen)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        predicted.append(int(out.selections["mask_grounding"]["masked"].sum()))
    flat, same = replicas(wrapper, WORLD_SIZE)
    if rank == 0:
        result = {
            **same,
            "moved": not torch.equal(flat, start),
            "losses": losses,
            "predicted": predicted,
            "added": sum(p.numel() for p in wrapper.added_parameters().values()),
            "objectives": list(wrapper.objectives),
            "cal_fused_params": sum(p.numel() for k, p in wrapper.added_parameters().items()
                                    if k.startswith("objectives.cal_fused.")),
        }
        Path(result_dir, "result.json").write_text(json.dumps(result))


@pytest.mark.parametrize("backend", ["towers", "hooks"])
def test_ddp_with_all_objectives(tmp_path, backend):
    run_ranks(_worker, (_free_port(), str(tmp_path), backend), world_size=WORLD_SIZE, marker_dir=tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["identical"], "parameters differ across ranks"
    assert result["finite"] and result["moved"] and result["added"] > 0
    assert result["objectives"] == ["lmvsd", "vmlsd", *ALL_OBJECTIVES] and result["cal_fused_params"] > 0
    assert len(result["losses"]) == STEPS and all(abs(v) < 1e6 for v in result["losses"])
    assert result["predicted"][0] > 0 and result["predicted"][2] > 0
    if backend == "towers":
        assert result["predicted"][1] == 0
