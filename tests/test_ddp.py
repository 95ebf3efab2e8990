"""Two-process DDP (gloo, CPU) training of the wrapped tiny model without find_unused_parameters.

DDP raises on the next forward if any parameter received no gradient in the previous backward
(e.g. a mask token that fell out of the graph because nothing was masked), and gradients are
averaged across ranks, so after a few steps every rank must hold bit-identical parameters.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import hook_models
import pytest
import torch
import torch.distributed as dist
from spawn_ranks import replicas, run_ranks
from tiny_models import make_batch, make_model
from torch.nn.parallel import DistributedDataParallel

import masksd
from masksd import LMVSDConfig, MaskedSelfDistill, VMLSDConfig

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build(backend: str, rank: int, ratio: float) -> MaskedSelfDistill:
    branches = dict(lmvsd=LMVSDConfig(ratio=ratio), vmlsd=VMLSDConfig(ratio=ratio))
    if backend == "hooks":  # an unchanged late-fusion model, reusing the other modality per branch
        return masksd.wrap(hook_models.TinyRIS(), hook_models.tiny_spec(), **branches)
    image_tower, text_tower, decoder = make_model(seed=rank)
    return MaskedSelfDistill(image_tower, text_tower, decoder, **branches)


def _batch(backend: str, generator: torch.Generator):
    if backend == "hooks":
        images, ids, masks = hook_models.make_batch(4, int(torch.randint(0, 10**6, (1,),
                                                                         generator=generator)))
        return images, ids, masks
    return make_batch(4, generator)


def _worker(rank: int, port: int, ratio: float, result_dir: str, backend: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    # Different initialisation per rank on purpose: DDP must broadcast rank 0's state.
    torch.manual_seed(100 + rank)
    wrapper = _build(backend, rank, ratio).train()
    fusion = None
    if backend == "hooks":  # the wrap-time report, before DDP (it restores what it touches)
        images, ids, target = hook_models.make_batch(4, seed=rank)
        report = wrapper.check(images, ids, target=target)
        fusion = (report.fusion, report.passes, report.ddp_find_unused_parameters)
    model = DistributedDataParallel(wrapper)  # find_unused_parameters=False
    start = torch.cat([p.detach().flatten() for p in wrapper.parameters()]).clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data_gen = torch.Generator().manual_seed(1000 + rank)  # different data per rank
    mask_gen = torch.Generator().manual_seed(2000 + rank)
    losses = []
    masked = 0
    for _ in range(STEPS):
        images, ids, target = _batch(backend, data_gen)
        out = model(images, ids, target=target, generator=mask_gen)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        masked += sum(int(sel["masked"].sum()) for sel in out.selections.values())
    flat, same = replicas(wrapper, WORLD_SIZE)
    if rank == 0:
        result = {
            **same,
            "moved": not torch.equal(flat, start),
            "losses": losses,
            "masked": masked,
            "num_params": flat.numel(),
            "report": fusion,
        }
        Path(result_dir, "result.json").write_text(json.dumps(result))
    else:
        Path(result_dir, f"losses_{rank}.json").write_text(json.dumps(losses))


@pytest.mark.parametrize(
    "ratio, backend",
    [(0.5, "towers"), (0.0, "towers"), (0.5, "hooks")],
    ids=["masking", "nothing_masked", "hooks_late_fusion"],
)
def test_ddp_parameters_stay_identical(tmp_path, ratio, backend):
    run_ranks(_worker, (_free_port(), ratio, str(tmp_path), backend), world_size=WORLD_SIZE,
              marker_dir=tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["identical"], f"parameters differ across ranks (max diff {result['max_diff']})"
    assert result["num_params"] > 0 and result["finite"] and result["moved"]
    assert len(result["losses"]) == STEPS
    assert all(loss == loss and abs(loss) < 1e6 for loss in result["losses"])
    other = json.loads((tmp_path / "losses_1.json").read_text())
    assert other != result["losses"], "ranks should have seen different data"
    if backend == "hooks":  # the report says late fusion: each branch reuses the other modality
        fusion, passes, find_unused = result["report"]
        assert fusion == "late" and not find_unused
        assert "skips ['text_encoder']" in passes["lmvsd"] and "skips ['backbone']" in passes["vmlsd"]
    if ratio == 0.0:
        assert result["masked"] == 0
    else:
        assert result["masked"] > 0
