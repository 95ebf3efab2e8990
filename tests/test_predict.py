"""predict.py and visualize.py on a tiny trained checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cris_clip"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import train

    out = tmp_path_factory.mktemp("run")
    train.main(["--preset", "demo", "--num-train", "32", "--num-val", "8", "--batch-size", "16",
                "--epochs", "1", "--max-steps", "1", "--test-split", "none", "--no-progress",
                "--out", str(out)])
    return out / "best.pt"


@pytest.fixture()
def image_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, size=(50, 80, 3), dtype=np.uint8)).save(path)  # 80 wide, 50 high
    return path


def test_predict_cli_writes_overlay_at_original_size(checkpoint: Path, image_file: Path, tmp_path: Path) -> None:
    out, mask = tmp_path / "pred.png", tmp_path / "mask.png"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "predict.py"), "--checkpoint", str(checkpoint), "--image",
         str(image_file), "--sentence", "the red circle left of the blue square", "--out", str(out),
         "--mask-out", str(mask)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mask covers" in proc.stdout
    with Image.open(out) as im:
        assert im.size == (80, 50) and im.mode == "RGB"
    with Image.open(mask) as im:
        assert im.size == (80, 50)
        assert set(np.unique(np.asarray(im)).tolist()) <= {0, 255}


def test_predict_synthetic_sample(checkpoint: Path, tmp_path: Path) -> None:
    import predict

    result = predict.main(["--checkpoint", str(checkpoint), "--synthetic-index", "2", "--out",
                           str(tmp_path / "p.png")])
    assert result["size"] == (64, 64) and result["sentence"]
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == (64, 64)


def test_overlay_marks_exactly_the_mask() -> None:
    import predict

    image = np.zeros((6, 7, 3), dtype=np.uint8)
    mask = np.zeros((6, 7), dtype=bool)
    mask[2:5, 1:4] = True
    out = np.asarray(predict.overlay(image, mask, color=(255, 0, 0), alpha=0.5))
    assert out.shape == (6, 7, 3)
    assert (out[~mask] == 0).all() and (out[mask][:, 0] > 0).all()


def test_visualize_checkpoint_and_random_init(checkpoint: Path, image_file: Path, tmp_path: Path) -> None:
    import visualize

    out = tmp_path / "vis.png"
    result = visualize.main(["--checkpoint", str(checkpoint), "--index", "1", "--out", str(out)])
    assert out.is_file()
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert result["lmvsd"]["patches"] == 64
    assert 0 < result["lmvsd"]["kept"] <= 64 and result["lmvsd"]["masked"] <= result["lmvsd"]["kept"]
    assert result["vmlsd"]["kept"]  # at least one word kept
    assert set(result["vmlsd"]["masked"]) <= set(result["vmlsd"]["kept"])

    # same seed, same draw
    again = visualize.main(["--checkpoint", str(checkpoint), "--index", "1", "--out", str(tmp_path / "v2.png")])
    assert again["lmvsd"] == result["lmvsd"] and again["vmlsd"] == result["vmlsd"]

    out2 = tmp_path / "vis_random.png"
    visualize.main(["--image", str(image_file), "--sentence", "the small green circle", "--out", str(out2)])
    assert out2.is_file()
