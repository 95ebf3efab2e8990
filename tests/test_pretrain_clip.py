"""examples/cris_clip/pretrain_clip.py and captions.py: the caption grammar, a few training steps, exact
resume, and the checkpoint loading through open_clip's own loader into the reference model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cris_clip"
TINY = ["--preset", "smoke", "--steps", "8", "--batch-size", "16", "--train-scenes", "16",
        "--warmup-steps", "1", "--val-scenes", "32", "--align-scenes", "16", "--refer-samples", "8",
        "--eval-interval", "4", "--log-interval", "2", "--workers", "0", "--threads", "1", "--no-progress"]


def run_script(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """``pretrain_clip.py TINY + argv`` as a program (the scripts import their siblings by plain name)."""
    done = subprocess.run([sys.executable, str(EXAMPLE / "pretrain_clip.py"), *TINY, *argv],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and done.returncode != 0:
        raise AssertionError(done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pretrain")
    run_script("--out", str(out))
    return out, json.loads((out / "metrics.json").read_text())


def test_captions_name_their_objects_and_fit_the_context() -> None:
    from examples.cris_clip import captions, synthetic
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=17)
    for i in range(150):
        s = captions.caption_sample("val", i)
        words = s.caption.text.split()
        assert len(tokenizer.encode(s.caption.text)) == len(words) <= 15  # one BPE token per word
        named: dict[int, dict[str, str]] = {}
        for m in s.caption.mentions:
            assert words[m.word] == getattr(s.objects[m.obj], m.role)
            named.setdefault(m.obj, {})[m.role] = words[m.word]
        for obj, attrs in named.items():  # every noun phrase names exactly its object
            assert [k for k, o in enumerate(s.objects) if synthetic.Phrase(**attrs).matches(o)] == [obj]
        assert (s.labels >= 0).any() and s.image.shape == (64, 64, 3)
    a, b = captions.caption_sample("train", 3, seed=1), captions.caption_sample("train", 3, seed=1)
    assert a.caption == b.caption and (a.image == b.image).all()


def test_a_few_steps_lower_the_loss_and_metrics_are_rates(tiny_run: tuple[Path, dict]) -> None:
    out, metrics = tiny_run
    history = metrics["history"]
    assert [h["step"] for h in history] == [2, 4, 6, 8] and history[-1]["loss"] < history[0]["loss"]
    assert metrics["step"] == 8
    assert [e["step"] for e in metrics["evals"]] == [0, 4, 8]
    for e in (metrics["initial"], metrics["final"]):
        rates = [*e["retrieval"]["image_to_text"].values(), *e["retrieval"]["text_to_image"].values(),
                 *(e["word_patch"]["all"][k] for k in ("top1", "topk", "chance", "top1_among_objects")),
                 *(e["sentence_patch"][k] for k in ("precision", "recall", "recall_other_objects"))]
        assert len(rates) == 11 and all(0.0 <= r <= 1.0 for r in rates)
        assert e["retrieval"]["candidates"] == 32 and e["word_patch"]["all"]["count"] > 16


def test_checkpoint_loads_through_open_clip_into_the_reference_model(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    from examples.cris_clip import model
    saved = torch.load(out / "open_clip_pytorch_model.bin", map_location="cpu", weights_only=True)
    ris = model.build_model(replace(model.MODEL_CONFIGS["demo"],
                                    pretrained=str(out / "open_clip_pytorch_model.bin")))
    towers = {k.removeprefix("image_tower.").removeprefix("text_tower."): v
              for k, v in ris.state_dict().items() if k.startswith(("image_tower.", "text_tower."))}
    assert set(towers) == set(saved) - {"logit_scale"}
    assert all(torch.equal(towers[k], saved[k]) for k in towers)
    fresh = model.build_model(model.MODEL_CONFIGS["demo"]).state_dict()  # training changed the weights
    assert not torch.equal(fresh["text_tower.text_projection"], towers["text_projection"])
    # "local-dir:" exists from open_clip 3.0 ([examples] floor)
    if int(open_clip.__version__.split(".")[0]) >= 3:
        hub = open_clip.create_model(f"local-dir:{out}")  # the hub layout: open_clip_config.json + weights
        assert all(torch.equal(v, saved[k]) for k, v in hub.state_dict().items())
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)  # a training checkpoint
    assert all(torch.equal(v, saved[k]) for k, v in last["state_dict"].items())


def test_resume_takes_the_same_steps(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny_run
    run_script("--out", str(tmp_path), "--max-steps", "3")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["state"]["step"] == 3  # stopped, not finished
    assert not (tmp_path / "metrics.json").exists()
    run_script("--out", str(tmp_path), "--resume", "auto")
    a, b = (torch.load(p / "open_clip_pytorch_model.bin", weights_only=True) for p in (out, tmp_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = run_script("--out", str(tmp_path), "--resume", "auto", "--lr", "1e-3", check=False)
    assert changed.returncode != 0 and "lr" in changed.stderr


def test_train_py_records_which_pretrained_weights_and_machine_it_ran_on(tiny_run: tuple[Path, dict],
                                                                          tmp_path: Path) -> None:
    out, _ = tiny_run
    weights = out / "open_clip_pytorch_model.bin"
    done = subprocess.run([sys.executable, str(EXAMPLE / "train.py"), "--preset", "demo",
                           "--pretrained", str(weights), "--num-train", "32", "--num-val", "16",
                           "--batch-size", "16", "--epochs", "1", "--no-progress", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pretrained_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert metrics["machine"]["torch"] == torch.__version__ and metrics["machine"]["threads"] >= 1
    assert metrics["machine"]["cpu"] and metrics["machine"]["gpu"] is None


def test_world_v2_pretraining_adds_the_dense_terms_and_train_py_runs_on_world_v2(tmp_path: Path) -> None:
    out = tmp_path / "clip"
    run_script("--world", "v2", "--model", "v2", "--dense-weight", "1", "--steps", "4",
               "--eval-interval", "4", "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["history"][-1]
    assert ({"dense_sentence", "dense_word"} <= set(last)
            and all(torch.isfinite(torch.tensor(v)) for v in last.values() if isinstance(v, float)))
    done = subprocess.run([sys.executable, str(EXAMPLE / "train.py"), "--preset", "v2", "--pretrained",
                           str(out / "open_clip_pytorch_model.bin"), "--num-train", "16", "--num-val", "8",
                           "--batch-size", "8", "--epochs", "1", "--no-progress",
                           "--out", str(tmp_path / "ris")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ris = json.loads((tmp_path / "ris" / "metrics.json").read_text())
    assert ris["config"]["data"]["world"] == "v2" and ris["config"]["model"]["image_size"] == 96
