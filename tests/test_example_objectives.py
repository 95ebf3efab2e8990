"""The reference example's ``--objectives`` flag (examples/cris_clip/config.py), checked where the
scripts read it: ``parse_args`` in a subprocess run from the example folder (the scripts import
their siblings by plain name) and ``train.py`` itself for a bad value, which must exit before any
data or model is built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cris_clip"
VALID = "lmvsd vmlsd mask_grounding cal cal_fused lang_rec maskris"

# parse_args on each argv: the resolved objectives, branches and further objectives, or the error
PROBE = """
import contextlib, io, json, sys
import config
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfg = config.parse_args(argv)
    except SystemExit as stop:
        out.append({"exit": stop.code, "stderr": err.getvalue()})
        continue
    out.append({"objectives": cfg.objectives, "method": cfg.method, "lmvsd": cfg.distill.lmvsd is not None,
                "vmlsd": cfg.distill.vmlsd is not None, "extra": config.extra_objectives(cfg)})
print(json.dumps({"cases": out, "help": config.build_parser().format_help()}))
"""

CASES = {
    "comma": (["--objectives", "lmvsd,vmlsd,mask_grounding"],
              dict(objectives=["lmvsd", "vmlsd", "mask_grounding"], lmvsd=True, vmlsd=True,
                   extra=["mask_grounding"])),
    "mixed": (["--objectives", "vmlsd,cal", "lang_rec", "cal"],  # each name once, in order
              dict(objectives=["vmlsd", "cal", "lang_rec"], lmvsd=False, vmlsd=True,
                   extra=["cal", "lang_rec"])),
    "spaces": (["--objectives", "lmvsd", "cal_fused"],
               dict(objectives=["lmvsd", "cal_fused"], lmvsd=True, vmlsd=False, extra=["cal_fused"])),
    "none": (["--objectives", "none"], dict(objectives=None, lmvsd=True, vmlsd=True, extra=[])),
    "none_keeps_flags": (["--objectives", "none", "--no-vmlsd"],
                         dict(objectives=None, lmvsd=True, vmlsd=False, extra=[])),
    "default": ([], dict(objectives=None, lmvsd=True, vmlsd=True, extra=[])),
    "baseline": (["--method", "baseline"], dict(objectives=[], lmvsd=False, vmlsd=False, extra=[])),
    "baseline_plus": (["--method", "baseline", "--objectives", "mask_grounding,lang_rec"],
                      dict(method="baseline", objectives=["mask_grounding", "lang_rec"], lmvsd=False,
                           vmlsd=False, extra=["mask_grounding", "lang_rec"])),
    "maskris_paper": (["--method", "baseline", "--objectives", "maskris", "--seg-weight", "0.5"],
                      dict(method="baseline", objectives=["maskris"], lmvsd=False, vmlsd=False,
                           extra=["maskris"])),
    "unknown": (["--objectives", "lmvsd,mask_grunding"], "unknown 'mask_grunding'"),
    "empty": (["--objectives", ","], "no name given"),
    "none_with_others": (["--objectives", "none,cal"], "none stands alone"),
    "baseline_with_branch": (["--method", "baseline", "--objectives", "vmlsd,cal"],
                             "--method baseline turns LMVSD and VMLSD off, but --objectives names vmlsd"),
}


@pytest.fixture(scope="module")
def probe() -> dict:
    """``{"cases": [one result per CASES entry], "help": the scripts' --help text}``."""
    argvs = [argv for argv, _ in CASES.values()]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], cwd=EXAMPLE, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def parsed(probe: dict) -> dict[str, dict]:
    return dict(zip(CASES, probe["cases"], strict=True))


@pytest.mark.parametrize("case", CASES)
def test_objectives_flag_resolves_or_refuses(parsed: dict[str, dict], case: str) -> None:
    expected, got = CASES[case][1], parsed[case]
    if isinstance(expected, str):  # argparse's error: status 2, the reason, and the valid names
        assert got["exit"] == 2 and expected in got["stderr"], got
        if case in ("unknown", "empty"):
            assert VALID in got["stderr"] and "or none" in got["stderr"]
    else:
        assert {k: got[k] for k in expected} == expected


def test_train_refuses_an_unknown_objective_before_building_anything(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(EXAMPLE / "train.py"), "--objectives", "lmvsd,bogus",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"--objectives: unknown 'bogus'; choose from {VALID}" in proc.stderr
    assert not out.exists()


def test_help_documents_the_forms_none_and_baseline(probe: dict) -> None:
    text = " ".join(probe["help"].split())  # argparse wraps lines
    assert "comma- or space-separated (e.g. lmvsd,vmlsd,mask_grounding)" in text
    assert "none: LMVSD + VMLSD as set by --lmvsd/--vmlsd" in text
    assert "With --method baseline: the baseline plus only the named further objectives" in text


def test_train_runs_the_maskris_accuracy_variant(tmp_path: Path) -> None:
    """benchmarks/accuracy.py's ``maskris`` variant (MaskRIS alone, seg_weight 0.5) trains the demo:
    one extra corrupted pass per step, no added parameters (input mode)."""
    import torch

    from benchmarks.accuracy import VARIANTS

    flags = VARIANTS["maskris"]
    tiny = ["--preset", "demo", "--num-train", "16", "--num-val", "8", "--batch-size", "8", "--no-progress",
            "--epochs", "1", "--test-split", "none"]
    proc = subprocess.run([sys.executable, str(EXAMPLE / "train.py"), *tiny, "--out", str(tmp_path), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "metrics.json").read_text())["history"][0]
    assert set(history["train"]) == {"seg", "maskris"}
    keys = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(k.startswith("model.") for k in keys)
