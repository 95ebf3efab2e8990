"""The training example: tiny runs, exact resume, torchrun/DDP, schedule and optimizer groups."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cris_clip"
TINY = ["--preset", "demo", "--num-train", "64", "--num-val", "32", "--batch-size", "16", "--no-progress"]
PERCENT_KEYS = ("miou", "oiou", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9")


def run_script(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_tiny_run_writes_metrics_and_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_script(str(EXAMPLE / "train.py"), *TINY, "--epochs", "2", "--out", str(out))
    assert "wall time" in proc.stdout and "whole_image" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["units"] == "percent"
    assert metrics["best_epoch"] in (1, 2)
    assert set(metrics["splits"]) == {"val", "test", "compositional"}
    for split in metrics["splits"].values():
        for key in PERCENT_KEYS:
            assert 0.0 <= split[key] <= 100.0
        assert split["count"] == 32
    trivial = metrics["trivial"]["val"]
    assert trivial["all_background"]["miou"] == 0.0
    assert 0.0 < trivial["whole_image"]["miou"] < 20.0
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert {"seg", "lmvsd", "vmlsd"} <= set(metrics["history"][0]["train"])
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.json"]  # no temp files
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "rng", "args",
                "best_metric", "sampler_epoch"):
        assert key in ckpt
    assert ckpt["global_step"] == 8 and ckpt["epoch"] == 2
    assert {"objectives.lmvsd.mask_token", "objectives.vmlsd.mask_token"} <= set(ckpt["model"])
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}

    js = tmp_path / "eval.json"
    proc = run_script(str(EXAMPLE / "evaluate.py"), "--checkpoint", str(out / "best.pt"), "--split", "val",
                      "--json", str(js))
    result = json.loads(js.read_text())
    # evaluate.py reproduces the training script's numbers for the same checkpoint and split
    assert result["splits"]["val"]["miou"] == pytest.approx(metrics["splits"]["val"]["miou"], abs=1e-6)


def _final_state(out: Path) -> dict:
    return torch.load(out / "last.pt", map_location="cpu", weights_only=True)


def test_resume_is_exact(tmp_path: Path) -> None:
    import train

    common = [*TINY, "--epochs", "2", "--test-split", "none"]
    a, b = tmp_path / "a", tmp_path / "b"
    train.main([*common, "--out", str(a), "--max-steps", "6"])  # crosses the epoch boundary (4/epoch)
    train.main([*common, "--out", str(b), "--max-steps", "3"])  # stops mid-epoch
    mid = _final_state(b)
    assert (mid["global_step"], mid["state"]["epoch"], mid["state"]["step_in_epoch"]) == (3, 0, 3)
    train.main([*common, "--out", str(b), "--max-steps", "6", "--resume", "auto"])
    sa, sb = _final_state(a), _final_state(b)
    assert sa["global_step"] == sb["global_step"] == 6
    assert sa["model"].keys() == sb["model"].keys()
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"] == 6
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    # a differently seeded run differs (the comparison above is not vacuous)
    c = tmp_path / "c"
    train.main([*common, "--out", str(c), "--max-steps", "6", "--seed", "1"])
    sc = _final_state(c)
    assert not all(torch.equal(sa["model"][k], sc["model"][k]) for k in sa["model"])


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    import train

    common = [*TINY, "--epochs", "1", "--test-split", "none", "--out", str(tmp_path)]
    train.main([*common, "--max-steps", "1"])
    with pytest.raises(SystemExit, match="lr"):
        train.main([*common, "--max-steps", "2", "--resume", "auto", "--lr", "1e-4"])


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "baseline"],
        ["--no-vmlsd", "--lmvsd-top-k", "0.3", "--lmvsd-ratio", "0.5", "--lmvsd-weight", "1.0"],
        ["--no-masking", "--supervision", "ground_truth", "--unshared-decoder", "--hard-targets"],
        ["--amp", "bf16"],
    ],
    ids=["baseline", "lmvsd-only", "ablations", "bf16"],
)
def test_methods_and_ablations_train(tmp_path: Path, flags: list[str]) -> None:
    import train

    metrics = train.main([*TINY, "--epochs", "1", "--max-steps", "2", "--test-split", "none",
                          "--out", str(tmp_path), *flags])
    ckpt = _final_state(tmp_path)
    if "baseline" in flags:
        assert ckpt["method"] == "baseline" and not any(k.startswith("objectives.") for k in ckpt["model"])
        assert set(metrics["history"][0]["train"]) == {"seg", "steps", "seconds"}
    elif "--no-vmlsd" in flags:
        assert "objectives.vmlsd.mask_token" not in ckpt["model"]
        assert set(metrics["history"][0]["train"]) == {"seg", "lmvsd", "steps", "seconds"}
    elif "--no-masking" in flags:
        assert not any(k.endswith("mask_token") for k in ckpt["model"])
        assert any(k.startswith("objectives.lmvsd.decoder.") for k in ckpt["model"])
    assert math.isfinite(metrics["splits"]["val"]["miou"])


@pytest.mark.slow
def test_torchrun_two_ranks_stay_identical(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLE / "train.py"), *TINY, "--epochs", "2", "--check-replicas",
               "--test-split", "none", "--out", str(out))
    r0 = json.loads((out / "replicas" / "rank0.json").read_text())
    r1 = json.loads((out / "replicas" / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == 4  # 64 samples / 2 ranks / 16 per batch × 2 epochs
    assert r0["sha256"] == r1["sha256"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["splits"]["val"]["count"] == 32  # no double counting


def test_schedule_and_optimizer_groups() -> None:
    import engine
    from model import build_model

    f = engine.warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))

    bare = build_model("demo")
    wrapper = engine.wrap_model(bare)
    opt = engine.build_optimizer(wrapper, bare, lr=1e-3, weight_decay=5e-4, backbone_lr_mult=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["head"]["lr"] == pytest.approx(1e-3)
    backbone = {id(p) for t in (bare.image_tower, bare.text_tower) for p in t.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone
    head = {id(p) for p in groups["head"]["params"]}
    assert id(wrapper.objectives["lmvsd"].mask_token) in head
    assert len(backbone) + len(head) == len(list(wrapper.parameters()))


def test_atomic_save_leaves_no_partial_file(tmp_path: Path) -> None:
    import engine

    path = tmp_path / "x.pt"
    engine.atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        engine.atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_every_flag_has_help() -> None:
    import evaluate
    import predict
    import train
    import visualize

    for module in (train, evaluate, predict, visualize):
        parser = module.build_parser()
        for action in parser._actions:
            assert action.help, f"{module.__name__}: {action.option_strings} has no help"
