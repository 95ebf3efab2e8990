"""The reference example (examples/cris_clip) as a user runs it: its scripts, as programs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import requires_bf16_masked_attention

pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cris_clip"
TINY = ["--preset", "demo", "--num-train", "64", "--num-val", "32", "--batch-size", "16", "--no-progress"]


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two epochs of 4 steps on 64 synthetic samples; evaluation on 32 per split."""
    out = tmp_path_factory.mktemp("run")
    proc = run(str(EXAMPLE / "train.py"), *TINY, "--epochs", "2", "--out", str(out))
    return out, proc.stdout


def test_training_writes_metrics_and_checkpoints(tiny_run: tuple[Path, str]) -> None:
    out, stdout = tiny_run
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.json"]  # no temp files
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["units"] == "percent" and metrics["global_step"] == 8
    assert set(metrics["splits"]) == {"val", "test", "compositional"}
    for split in metrics["splits"].values():
        assert split["count"] == 32 and all(0.0 <= split[k] <= 100.0 for k in ("miou", "oiou", "prec@0.5"))
    trivial = metrics["trivial"]["val"]
    assert trivial["all_background"]["miou"] == 0.0 and 0.0 < trivial["whole_image"]["miou"] < 20.0
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert set(metrics["history"][0]["train"]) == {"seg", "lmvsd", "vmlsd"}
    selection = metrics["history"][0]["lmvsd_selection"]  # kept patches on the target vs random
    assert (set(selection) == {"precision", "random", "recall"}
            and all(0 <= v <= 1 for v in selection.values()))
    words = metrics["history"][0]["vmlsd_selection"]  # VMLSD's kept rate per word role
    assert set(words) == {"target_attribute", "target_noun", "relation", "anchor", "function"}
    assert all(0 <= v <= 1 for v in words.values() if not math.isnan(v))
    assert "whole_image (val)" in stdout and "kept on target" in stdout

    last, best = load(out / "last.pt"), load(out / "best.pt")
    assert last["state"]["global_step"] == 8 and best["state"]["global_step"] == 4 * metrics["best_epoch"]
    assert {"model.decoder.head.projector.txt.weight", "objectives.lmvsd.mask_token",
            "objectives.vmlsd.mask_token"} <= set(last["model"])
    assert last["config"]["method"] == "masksd" and last["config"]["optim"]["lr"] == 4e-3
    # a new best is written once: best.pt is a link to that epoch's last.pt, which the next epoch
    # replaces by a new file
    same_file = (out / "best.pt").stat().st_ino == (out / "last.pt").stat().st_ino
    assert same_file == (metrics["best_epoch"] == 2)


def test_evaluate_reproduces_the_number_train_printed(tiny_run: tuple[Path, str], tmp_path: Path) -> None:
    out, stdout = tiny_run
    printed = float(re.search(r"best epoch \d+ \(val mIoU ([\d.]+)\)", stdout).group(1))
    js = tmp_path / "eval.json"
    run(str(EXAMPLE / "evaluate.py"), "--checkpoint", str(out / "best.pt"), "--split", "val",
        "--json", str(js))
    assert json.loads(js.read_text())["splits"]["val"]["miou"] == printed


def test_predict_and_visualize(tiny_run: tuple[Path, str], tmp_path: Path) -> None:
    checkpoint = str(tiny_run[0] / "best.pt")
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(photo)
    pred, mask = tmp_path / "pred.png", tmp_path / "mask.png"
    proc = run(str(EXAMPLE / "predict.py"), "--checkpoint", checkpoint, "--image", str(photo), "--sentence",
               "the red circle left of the blue square", "--out", str(pred), "--mask-out", str(mask))
    assert "mask covers" in proc.stdout
    with Image.open(pred) as im:
        assert im.size == (80, 50) and im.mode == "RGB"  # the original size, not the model's
    with Image.open(mask) as im:
        assert im.size == (80, 50) and set(np.unique(np.asarray(im)).tolist()) <= {0, 255}

    vis = tmp_path / "vis.png"
    proc = run(str(EXAMPLE / "visualize.py"), "--checkpoint", checkpoint, "--index", "1", "--out", str(vis))
    with Image.open(vis) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    kept, masked, patches = map(int, re.search(r"'kept': (\d+), 'masked': (\d+), 'patches': (\d+)",
                                               proc.stdout).groups())
    assert patches == 64 and kept == 32 and masked == 8  # top-K 0.5 of 8×8 patches, α = 0.25 of those


def test_resume_is_exact(tiny_run: tuple[Path, str], tmp_path: Path) -> None:
    common = [str(EXAMPLE / "train.py"), *TINY, "--epochs", "2", "--test-split", "none",
              "--out", str(tmp_path)]
    run(*common, "--max-steps", "3")  # stops mid-epoch (4 steps per epoch)
    mid = load(tmp_path / "last.pt")
    assert (mid["state"]["epoch"], mid["state"]["step_in_epoch"], mid["state"]["global_step"]) == (0, 3, 3)
    run(*common, "--resume", "auto")  # on to the end: 8 steps, as the uninterrupted tiny run
    uninterrupted, resumed = load(tiny_run[0] / "last.pt"), load(tmp_path / "last.pt")
    assert resumed["state"]["global_step"] == 8 and resumed["model"].keys() == uninterrupted["model"].keys()
    for key in resumed["model"]:
        assert torch.equal(resumed["model"][key], uninterrupted["model"][key]), key
    assert not all(torch.equal(mid["model"][k], resumed["model"][k]) for k in mid["model"])  # it trained on
    assert resumed["scheduler"]["last_epoch"] == uninterrupted["scheduler"]["last_epoch"] == 8
    for a, b in zip(resumed["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values(),
                    strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

    changed = run(*common, "--resume", "auto", "--lr", "1e-4", check=False)
    assert changed.returncode != 0 and "optim.lr" in changed.stderr  # a changed schedule is refused


@pytest.mark.parametrize("flags", [["--method", "baseline"],
                                   pytest.param(["--no-lmvsd-masking", "--no-share-decoder", "--supervision",
                                                 "ground_truth", "--hard-targets", "--no-vmlsd",
                                                 "--amp", "bf16"],
                                                marks=requires_bf16_masked_attention),
                                   ["--objectives", "vmlsd", "mask_grounding", "cal", "lang_rec"]],
                         ids=["baseline", "ablations", "objectives"])
def test_method_flags_reach_the_wrapper(tmp_path: Path, flags: list[str]) -> None:
    run(str(EXAMPLE / "train.py"), *TINY, "--num-train", "16", "--num-val", "8", "--epochs", "1",
        "--test-split", "none", "--out", str(tmp_path), *flags)
    keys = set(load(tmp_path / "last.pt")["model"])
    terms = set(json.loads((tmp_path / "metrics.json").read_text())["history"][0]["train"])
    if "baseline" in flags:  # the same wrapper with both branches off: no added parameters
        assert all(k.startswith("model.") for k in keys) and terms == {"seg"}
    elif "--objectives" in flags:  # LMVSD off, VMLSD on, three further objectives with their heads
        assert terms == {"seg", "vmlsd", "mask_grounding", "cal", "lang_rec"}
        assert any(k.startswith("objectives.mask_grounding.") for k in keys)
        assert (any(k.startswith("objectives.lang_rec.") for k in keys)
                and "objectives.lmvsd.mask_token" not in keys)
        history = json.loads((tmp_path / "metrics.json").read_text())["history"][0]
        assert history["lmvsd_selection"] == {}
    else:
        assert terms == {"seg", "lmvsd"} and not any(k.endswith("mask_token") for k in keys)
        assert any(k.startswith("objectives.lmvsd.decoder.") for k in keys)


@pytest.mark.slow
def test_torchrun_two_ranks_stay_identical(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLE / "train.py"), *TINY, "--epochs", "2", "--check-replicas", "--test-split", "none",
               "--out", str(out))
    assert "replicas identical on 2 ranks" in proc.stdout  # train.py compares every parameter bit for bit
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4  # 64 samples / 2 ranks / 16 × 2 epochs
    assert metrics["splits"]["val"]["count"] == 32  # every sample scored once over the two ranks
