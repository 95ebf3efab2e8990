"""Tests for masksd.metrics (hand-computed cases + 2-process gloo all_reduce)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from spawn_ranks import run_ranks

from masksd.metrics import RISMetrics, intersection_union, mask_iou


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_hand_computed_iou() -> None:
    # pred: 4x4 block at (0..4, 0..4) = 16 px; target: 4x4 block at (2..6, 2..6) = 16 px
    pred = _rect(8, 8, 0, 4, 0, 4)[None]
    target = _rect(8, 8, 2, 6, 2, 6)[None]
    inter, union = intersection_union(pred, target)
    assert inter.tolist() == [4.0]  # overlap 2x2
    assert union.tolist() == [28.0]  # 16 + 16 - 4
    iou = mask_iou(pred, target)
    assert iou.dtype == torch.float64
    assert iou.item() == pytest.approx(4 / 28)


def test_accepts_01_ints_and_numpy() -> None:
    pred = np.zeros((1, 3, 3), dtype=np.uint8)
    pred[0, 0, 0] = 1
    assert mask_iou(pred, pred.copy()).item() == 1.0
    assert mask_iou(torch.ones(2, 3, 3), torch.ones(2, 3, 3, dtype=torch.int64)).tolist() == [1, 1]


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="pred must be a binary mask"):
        mask_iou(torch.full((1, 2, 2), 0.7), torch.zeros(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="target"):
        mask_iou(torch.zeros(1, 2, 2, dtype=torch.bool), torch.full((1, 2, 2), 2))
    with pytest.raises(TypeError, match="pred"):
        mask_iou([[0, 1]], torch.zeros(1, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prec_compare"):
        RISMetrics(prec_compare="=>")
    m = RISMetrics()
    with pytest.raises(ValueError, match="differ in length"):
        m.update([torch.zeros(2, 2)], [torch.zeros(2, 2), torch.zeros(2, 2)])
    with pytest.raises(TypeError, match="both"):
        m.update([torch.zeros(2, 2)], torch.zeros(1, 2, 2))


def test_oiou_differs_from_miou() -> None:
    # sample A: large object predicted perfectly (I=U=100); sample B: small object missed
    # entirely (I=0, U=4). mIoU = (1 + 0)/2 = 0.5; oIoU = 100/104.
    big = _rect(10, 10, 0, 10, 0, 10)
    small = _rect(10, 10, 0, 2, 0, 2)
    empty = torch.zeros(10, 10, dtype=torch.bool)
    m = RISMetrics()
    m.update(torch.stack([big, empty]), torch.stack([big, small]))
    r = m.compute()
    assert r["miou"] == pytest.approx(0.5)
    assert r["oiou"] == pytest.approx(100 / 104)
    assert r["count"] == 2
    assert r["prec@0.5"] == pytest.approx(0.5)
    assert r["prec@0.9"] == pytest.approx(0.5)
    assert set(r) == {"miou", "oiou", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9", "count"}


def test_prec_compare_at_exact_threshold() -> None:
    # IoU exactly 0.5: pred 2 px, target 1 px inside pred -> I=1, U=2
    pred = torch.tensor([[True, True]])[None]
    target = torch.tensor([[True, False]])[None]
    assert mask_iou(pred, target).item() == 0.5
    ge, gt = RISMetrics(), RISMetrics(prec_compare=">")
    ge.update(pred, target)
    gt.update(pred, target)
    assert ge.compute()["prec@0.5"] == 1.0
    assert gt.compute()["prec@0.5"] == 0.0
    assert ge.compute()["prec@0.6"] == 0.0


def test_empty_union() -> None:
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    m = RISMetrics()
    m.update(empty, empty)
    r = m.compute()
    assert r["miou"] == 0.0 and r["count"] == 1 and r["prec@0.5"] == 0.0
    assert math.isnan(r["oiou"])  # sum U == 0
    m1 = RISMetrics(empty_union_iou=1.0)
    m1.update(empty, empty)
    assert m1.compute()["miou"] == 1.0
    assert mask_iou(empty, empty, empty_union_iou=1.0).item() == 1.0


def test_list_input_of_differing_sizes() -> None:
    p1, t1 = _rect(5, 7, 0, 2, 0, 2), _rect(5, 7, 0, 2, 0, 4)  # I=4, U=8
    p2, t2 = _rect(9, 3, 0, 3, 0, 3), _rect(9, 3, 0, 3, 0, 3)  # I=U=9
    m = RISMetrics()
    ious = m.update([p1, p2.numpy()], [t1, t2])
    assert ious.tolist() == [0.5, 1.0]
    r = m.compute()
    assert r["miou"] == pytest.approx(0.75)
    assert r["oiou"] == pytest.approx(13 / 17)
    assert r["prec@0.5"] == 1.0 and r["prec@0.6"] == 0.5


def test_reset_and_no_samples() -> None:
    m = RISMetrics()
    assert math.isnan(m.compute()["miou"]) and m.compute()["count"] == 0
    m.update(torch.ones(1, 2, 2, dtype=torch.bool), torch.ones(1, 2, 2, dtype=torch.bool))
    m.reset()
    assert m.count == 0 and m.cum_u == 0.0
    assert m.all_reduce() is m  # not distributed: no-op


def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    n = 3 + rank  # uneven shards
    return torch.rand(n, 6, 6, generator=g) > 0.5, torch.rand(n, 6, 6, generator=g) > 0.4


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    m = RISMetrics()
    m.update(*_rank_data(rank))
    synced = m.sync()
    assert m.count == 3 + rank  # sync() does not mutate
    m.all_reduce()
    with open(Path(out_dir) / f"rank{rank}.json", "w") as f:
        json.dump({"sync": synced, "reduced": m.compute()}, f)


@pytest.mark.slow
def test_all_reduce_two_gloo_processes(tmp_path: Path) -> None:
    world = 2
    run_ranks(_ddp_worker, (world, str(tmp_path / "init"), str(tmp_path)), world_size=world,
              marker_dir=tmp_path)
    ref = RISMetrics()
    for rank in range(world):
        ref.update(*_rank_data(rank))
    expected = ref.compute()
    assert expected["count"] == 7
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key in ("sync", "reduced"):
            assert got[key].keys() == expected.keys()
            for k, v in expected.items():
                assert got[key][k] == pytest.approx(v, abs=1e-12), (rank, key, k)
