"""What distillation buys: baseline vs. masksd on the synthetic dataset, paired by seed.

Every run is the reference training script (``examples/cris_clip/train.py``, demo preset) with one
schedule per study and several seeds; the script selects the best epoch on ``val`` and evaluates
that checkpoint on ``val``, ``test`` and ``compositional`` (target colour/shape combinations never
seen as training targets). This benchmark runs the script and aggregates its ``metrics.json``.

Studies:

* ``v2`` (default, issue 8): the demo's full schedule (8000 samples × 4 epochs = 2000 steps), from
  the CLIP pretrained on the synthetic caption world (``examples/cris_clip/pretrain_clip.py
  --preset demo``, run once and cached in the work dir) and from random init. The learning rate
  of each setting is **tuned for the baseline** on val first (seed 0: ``lr_grid``, and for the
  pretrained CLIP also the towers' lr multiplier, 0.1 as CRIS or 1) and then used by every
  variant: any bias runs against masksd. Reports mean ± std and the paired difference
  to the baseline with a 95 % t interval; plots val mIoU and LMVSD's selection precision per epoch.
* ``v1``: the first table (random init, one epoch, lr 3e-3, the paper's ablations).

Usage::

    python -m benchmarks.accuracy --out-dir docs/benchmarks             # study v2 (hours on 2 cores)
    python -m benchmarks.accuracy --quick                               # v2, pretrained, 1 seed pair
    python -m benchmarks.accuracy --study v1 --out-dir docs/benchmarks  # the first table

Finished runs are reused from ``--work-dir``, so an interrupted study continues where it stopped.
``--first-seed 3`` adds seed pairs 3, 4, ... to a study (the lr tuned at seed 0 is reused): the way
to grow a study on another machine, since float results differ across CPU models and a pair must
be trained on one machine (each run's ``metrics.json`` names its CPU; the JSON's ``provenance``
lists them per seed). The grid variants (``lmvsd_only-top_k1``, ...; ``GRIDS``) are the paper's
Tables III/IV, run on one seed and reported on val next to the branch-alone run.
``--jobs 2 --threads 1`` (default) trains two runs at once with one torch thread each, which on a
2-core machine finishes sooner than one run on two threads; every run of a study uses the same
thread count, so paired runs stay comparable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import accuracy_report as report

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "cris_clip" / "train.py"
PRETRAIN = ROOT / "examples" / "cris_clip" / "pretrain_clip.py"

# variant name -> extra flags of train.py (paper Tables V-VII, further objectives)
VARIANTS: dict[str, list[str]] = {
    "baseline": ["--method", "baseline"],
    "masksd": [],
    "lmvsd_only": ["--no-vmlsd"],
    "vmlsd_only": ["--no-lmvsd"],
    "no_masking": ["--no-lmvsd-masking", "--no-vmlsd-masking"],
    "ground_truth": ["--supervision", "ground_truth"],
    "unshared": ["--no-share-decoder"],
    "prediction_scorer": ["--lmvsd-scorer", "prediction"],  # LMVSD keeps the main prediction's patches
    "random_scorer": ["--lmvsd-scorer", "random", "--vmlsd-scorer", "random"],  # top-K = a random subset
    # the branches replay the main branch's dropout draws (issue 18 item 5); the demo and v2 models
    # have no dropout, so this variant differs from masksd only on a model with dropout
    "dropout_replay": ["--dropout", "replay"],
    # no filtering (TopK 1, the paper's Table III(c) row) at the same α: masking among all tokens
    "random_selection": ["--lmvsd-top-k", "1", "--vmlsd-top-k", "1"],
    # TopK 1 at half the α (α·TopK as masksd's defaults): on average as many tokens masked as the
    # guided variants mask (0.125 · 144 = 0.25 · 72 = 18 patches), chosen at random
    "random_same_count": ["--lmvsd-top-k", "1", "--lmvsd-ratio", "0.125", "--vmlsd-top-k", "1",
                          "--vmlsd-ratio", "0.05"],
    # each token against the other modality's tokens (MaxSim) instead of its global feature
    "late_interaction_scorer": ["--lmvsd-scorer", "late_interaction", "--vmlsd-scorer", "late_interaction"],
    # the scorers that pick the referent in benchmarks/selection_probe.py: patches under the main
    # prediction, words by cosine MaxSim against the patches
    "guided_scorers": ["--lmvsd-scorer", "prediction", "--vmlsd-scorer", "late_interaction",
                       "--vmlsd-metric", "cosine"],
    # dense-alignment patch features for the paper's correlation (masksd.adapters.clip_dense; words unchanged)
    "value_scorer": ["--dense-scoring", "value"],  # MaskCLIP's value path of the last ViT block
    "clearclip_scorer": ["--dense-scoring", "clearclip"],  # ClearCLIP: q-q attention, no residual, no FFN
    "surgery_scorer": ["--lmvsd-surgery", "--vmlsd-surgery"],  # CLIP Surgery: minus the batch's mean score
    # study v3's pre-registered pick on the CLIP v2 probe (docs/benchmarks.md §2): LMVSD keeps the
    # paper's correlation/dot (first, 0.251 on the referent vs 0.127 area); VMLSD takes cosine late
    # interaction (target nouns kept 0.73 vs 0.55 for correlation/dot)
    "recommended_scorer": ["--vmlsd-scorer", "late_interaction", "--vmlsd-metric", "cosine"],
    "hard_targets": ["--hard-targets"],
    # the other seed papers' objectives, alone and with LMVSD/VMLSD (issue 9)
    "mask_grounding": ["--objectives", "mask_grounding"],
    "cal": ["--objectives", "cal"],
    "lang_rec": ["--objectives", "lang_rec"],
    # MaskRIS alone (random pixel patches + BERT-style ids, one extra full pass), 0.5/0.5 as the paper
    "maskris": ["--method", "baseline", "--objectives", "maskris", "--seg-weight", "0.5"],
    "masksd_all": ["--objectives", "lmvsd", "vmlsd", "mask_grounding", "cal", "lang_rec"],
}

# The paper's hyper-parameter grids (Tables III and IV: α = ratio, TopK = top_k, λ = weight), each
# on its branch alone as in the paper, the other two settings at the paper's best (the defaults).
# Variant ``<branch>_only-<key><value>``, e.g. ``lmvsd_only-top_k1`` (no correlation filtering).
# Run on one seed and read on val only: they are for finding out why, not for the comparison.
GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "lmvsd": {"weight": (0.1, 0.25, 0.5, 1.0), "ratio": (0.1, 0.5, 0.75), "top_k": (0.25, 0.75, 1.0)},
    "vmlsd": {"weight": (0.05, 0.25, 0.5, 0.75, 1.0), "ratio": (0.05, 0.25, 0.5, 0.75),
              "top_k": (0.25, 0.75, 1.0)},
}
GRID_VARIANTS: dict[str, tuple[str, str, float]] = {}  # variant -> (branch, key, value)
for _branch, _grid in GRIDS.items():
    for _key, _values in _grid.items():
        for _value in _values:
            _name = f"{_branch}_only-{_key}{_value:g}"
            GRID_VARIANTS[_name] = (_branch, _key, _value)
            VARIANTS[_name] = [*VARIANTS[f"{_branch}_only"], f"--{_branch}-{_key.replace('_', '-')}",
                               str(_value)]


@dataclass(frozen=True)
class Study:
    """One fixed protocol: schedule flags, seeds, CLIP initialisations, variants, lr grid."""

    schedule: tuple[str, ...]
    epochs: int
    seeds: tuple[int, ...]
    clips: tuple[str, ...]  # "pretrained" and/or "random"
    variants: tuple[str, ...]
    lr_grid: tuple[float, ...]  # the baseline's lr is chosen on val (seed 0) from these; one value: fixed
    # lr multipliers of the CLIP towers tried with the pretrained CLIP (None: train.py's default,
    # 0.1 as CRIS); the random-init CLIP always trains at the full lr (train.py's default, 1)
    pretrained_backbone_grid: tuple[float | None, ...] = (None,)
    pretrain_steps: int | None = None  # None: pretrain_clip.py's preset as it is
    preset: str = "demo"  # train.py --preset: "demo" (world v1, 64 px) or "v2" (world v2, 96 px)
    # variants that run on the first ``secondary_pairs`` seeds only (the budget's second priority)
    secondary: tuple[str, ...] = ()
    secondary_pairs: int = 0
    pretrain_preset: str = "demo"  # pretrain_clip.py --preset of the pretrained CLIP
    probe: str | None = None  # benchmarks/selection_probe.py's JSON on this study's CLIP (reported beside it)
    head_to_head: tuple[tuple[str, str], ...] = ()  # (a, b): also report the paired a − b
    runs_of: str | None = None  # train into (and reuse the finished runs of) this study's work dir


# Pinned here so that later changes of the demo defaults do not change a study.
STUDIES: dict[str, Study] = {
    # the demo's full schedule; weight decay 0 and warm-up 0.25 epoch as the demo preset
    "v2": Study(schedule=("--num-train", "8000", "--num-val", "500", "--batch-size", "16",
                          "--warmup-epochs", "0.25"),
                epochs=4, seeds=(0, 1, 2), clips=("pretrained", "random"),
                variants=("baseline", "masksd", "lmvsd_only", "vmlsd_only"), lr_grid=(2e-3, 4e-3, 8e-3),
                pretrained_backbone_grid=(None, 1.0)),
    # issue 16, pre-registered in docs/benchmarks.md §2 before any run: world v2, its dense CLIP,
    # 2000 samples per evaluation split; the seeds come from the power analysis (at least 8 pairs):
    # after 4 pilot pairs sd 1.62 asks for 23, the ~8 h budget allows 16 (docs/benchmarks.md §2)
    "v3": Study(schedule=("--num-train", "8000", "--num-val", "2000", "--batch-size", "16",
                          "--warmup-epochs", "0.25"),
                epochs=2, seeds=tuple(range(16)), clips=("pretrained",),
                variants=("baseline", "masksd", "recommended_scorer", "random_selection", "maskris",
                          "lmvsd_only", "vmlsd_only"),
                lr_grid=(2e-3, 4e-3, 8e-3), pretrained_backbone_grid=(None, 1.0), preset="v2",
                pretrain_preset="v2",
                secondary=("lmvsd_only", "vmlsd_only"), secondary_pairs=4,
                probe="docs/benchmarks/selection_probe_v2.json",
                # does guided selection beat random selection (Table III(c)), does CM-MaskSD beat MaskRIS
                head_to_head=(("masksd", "random_selection"), ("recommended_scorer", "random_selection"),
                              ("masksd", "maskris"), ("recommended_scorer", "maskris"),
                              ("recommended_scorer", "masksd"))),
    # follow-up to v3, registered in docs/benchmarks.md §2 before its first run: random selection of
    # as many patches as the guided variants mask; v3's settings, lr and finished runs, 16 new runs
    "v3_count": Study(schedule=("--num-train", "8000", "--num-val", "2000", "--batch-size", "16",
                                "--warmup-epochs", "0.25"),
                      epochs=2, seeds=tuple(range(16)), clips=("pretrained",),
                      variants=("baseline", "masksd", "random_selection", "random_same_count"),
                      lr_grid=(2e-3, 4e-3, 8e-3), pretrained_backbone_grid=(None, 1.0), preset="v2",
                      pretrain_preset="v2", probe="docs/benchmarks/selection_probe_v2.json", runs_of="v3",
                      head_to_head=(("masksd", "random_same_count"),
                                    ("random_selection", "random_same_count"),
                                    ("masksd", "random_selection"))),
    # v3's path in minutes: one seed pair from a shorter pretraining, one short epoch, smaller splits
    "quick": Study(schedule=("--num-train", "4000", "--num-val", "500", "--batch-size", "16",
                             "--warmup-epochs", "0.25"),
                   epochs=1, seeds=(0,), clips=("pretrained",), variants=("baseline", "masksd"),
                   lr_grid=(4e-3,), pretrain_steps=200, preset="v2", pretrain_preset="v2"),
    # the first table: random init, one epoch (500 steps), lr 3e-3 (the demo's val tuning with masksd)
    "v1": Study(schedule=("--num-train", "8000", "--num-val", "500", "--batch-size", "16",
                          "--warmup-epochs", "0.25"),
                epochs=1, seeds=(0, 1, 2), clips=("random",),
                variants=("baseline", "masksd", "lmvsd_only", "vmlsd_only", "no_masking", "ground_truth",
                          "unshared"), lr_grid=(3e-3,)),
}


def run(command: list[str], *, threads: int, label: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"  {label}: {time.perf_counter() - started:6.1f} s", flush=True)


def pretrained_clip(work_dir: Path, steps: int | None, threads: int, preset: str = "demo") -> dict[str, Any]:
    """The pretrained CLIP of the study (pretrain_clip.py --preset ``preset``, cached): its file and
    sha256."""
    out = work_dir / ("pretrain-clip" if steps is None else f"pretrain-clip-{steps}")
    path = out / "open_clip_pytorch_model.bin"
    if not path.is_file():
        extra = [] if steps is None else ["--steps", str(steps), "--eval-interval", str(steps)]
        run([sys.executable, str(PRETRAIN), "--preset", preset, "--no-progress", "--threads", str(threads),
             "--out", str(out), *extra], threads=threads, label=f"pretrain CLIP -> {out}")
    figures = json.loads((out / "metrics.json").read_text())
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "preset": preset,
            "steps": steps, "final_eval": figures.get("final", figures.get("eval"))}


LR = tuple[float, float | None]  # (peak lr, CLIP towers' lr multiplier or None for train.py's default)


def lr_name(lr: LR) -> str:
    return f"lr{lr[0]:g}" + ("" if lr[1] is None else f"-bb{lr[1]:g}")


def train_command(study: Study, name: str, seed: int, lr: LR, clip: str | None, out: Path) -> list[str]:
    return [sys.executable, str(TRAIN), "--preset", study.preset, "--epochs", str(study.epochs),
            "--seed", str(seed), "--lr", str(lr[0]),
            *([] if lr[1] is None else ["--backbone-lr-mult", str(lr[1])]),
            "--eval-split", "val", "--test-split", "test", "compositional", "--no-progress",
            "--out", str(out), "--resume", "auto",  # an interrupted run continues from its last epoch
            *(["--pretrained", clip] if clip else []), *study.schedule, *VARIANTS[name]]


def finished_runs(
    study_json: dict[str, Any], work_dir: str | Path
) -> tuple[Path, dict[str, dict[int, Path]]]:
    """A finished study's runs in its headline setting, from its ``accuracy_<study>.json``:
    ``(the study's work dir, {variant: {seed: run dir}})``; SystemExit if the study is partial."""
    if study_json.get("partial"):
        raise SystemExit(f"study {study_json['study']} is partial "
                         f"({study_json['runs_missing']} runs missing): finish it first")
    name, setting = study_json["study"], study_json["minus_baseline_setting"]
    runs_dir = Path(work_dir) / (STUDIES[name].runs_of or name)
    chosen = study_json["lr_tuning"][setting]["chosen"]
    return runs_dir, {v: {s: runs_dir / setting / f"{v}-{chosen}-seed{s}" for s in seeds}
                      for v, seeds in study_json["seeds_run"][setting].items()}


class Runner:
    """Runs (or reuses) train.py runs, ``jobs`` at a time."""

    def __init__(self, study: Study, work_dir: Path, *, jobs: int, threads: int, train: bool = True) -> None:
        self.study, self.work_dir, self.jobs, self.threads, self.train = study, work_dir, jobs, threads, train

    def out(self, setting: str, name: str, seed: int, lr: LR) -> Path:
        return self.work_dir / setting / f"{name}-{lr_name(lr)}-seed{seed}"

    def many(self, jobs: list[tuple[str, str | None, str, int, LR]]) -> list[dict[str, Any] | None]:
        """``(setting, clip file or None, variant, seed, lr)`` each → its metrics.json (None: not
        run, with ``train=False``)."""
        def one(job: tuple[str, str | None, str, int, LR]) -> dict[str, Any] | None:
            setting, clip, name, seed, lr = job
            out = self.out(setting, name, seed, lr)
            if not (out / "metrics.json").is_file():
                if not self.train:
                    return None
                run(train_command(self.study, name, seed, lr, clip, out), threads=self.threads,
                    label=f"{setting:10s} {name:13s} {lr_name(lr)} seed {seed}")
            return json.loads((out / "metrics.json").read_text())

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            return list(pool.map(one, jobs))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), default="v2")
    parser.add_argument("--quick", action="store_true",
                        help="the 'quick' study (pretrained, 1 seed pair, 1 epoch)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                        help="variants to run (default: the study's)")
    parser.add_argument("--clips", nargs="+", choices=("pretrained", "random"), default=None,
                        help="CLIP initialisations to run (default: the study's)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the study's)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are first-seed .. first-seed + seeds - 1: more pairs for a study, e.g. "
                             "on another machine (float results differ across CPU models, so a pair must "
                             "share one)")
    parser.add_argument("--work-dir", default="runs/accuracy", help="run outputs; finished runs are reused")
    parser.add_argument("--out-dir", default=None, help="write accuracy_<study>.{json,md} and plots here "
                                                        "(default: the work dir)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="train nothing: report the finished runs of the work dir (a partial study)")
    args = parser.parse_args(argv)

    name = "quick" if args.quick else args.study
    study = STUDIES[name]
    count = len(study.seeds) if args.seeds is None else args.seeds
    seeds = tuple(range(args.first_seed, args.first_seed + count))
    variants = tuple(args.variants or study.variants)
    clips = tuple(args.clips or study.clips)
    work_dir = Path(args.work_dir) / (study.runs_of or name)
    out_dir = Path(args.out_dir) if args.out_dir else work_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(study, work_dir, jobs=args.jobs, threads=args.threads, train=not args.aggregate_only)
    started = time.perf_counter()

    pretrain = (pretrained_clip(work_dir, study.pretrain_steps, args.threads, study.pretrain_preset)
                if "pretrained" in clips else None)
    clip_file = {"pretrained": pretrain["path"] if pretrain else None, "random": None}

    # 1. the baseline's learning rate per setting, on val, seed 0 (before any comparison)
    tuning: dict[str, Any] = {}
    for clip in clips:
        backbone = study.pretrained_backbone_grid if clip == "pretrained" else (None,)
        lrs = [(lr, bb) for bb in backbone for lr in study.lr_grid]
        grid = runner.many([(clip, clip_file[clip], "baseline", study.seeds[0], lr) for lr in lrs])
        if any(m is None for m in grid):
            raise SystemExit(f"--aggregate-only: the {clip} lr tuning runs are not all finished "
                             f"in {work_dir}")
        val = {lr_name(lr): m["splits"]["val"]["miou"] for lr, m in zip(lrs, grid, strict=True)}
        best = max(lrs, key=lambda lr: val[lr_name(lr)])
        tuning[clip] = {"val_miou": val, "lr": best[0], "backbone_lr_mult": best[1], "chosen": lr_name(best)}
        print(f"{clip}: baseline val mIoU by lr {val} -> {lr_name(best)}", flush=True)

    # 2. every variant at that lr: baseline and masksd for every seed first, then the other
    #    variants, then the secondary ones (a partial study still has the headline pairs)
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {clip: {v: {} for v in variants}
                                                             for clip in clips}
    first = [v for v in variants if v in ("baseline", "masksd")]
    rest = [v for v in variants if v not in first]
    groups = (first, [v for v in rest if v not in study.secondary], [v for v in rest if v in study.secondary])
    def wanted(variant: str, seed: int) -> bool:  # secondary variants: the first pairs only
        return variant not in study.secondary or seed < study.seeds[0] + study.secondary_pairs

    jobs = [(clip, clip_file[clip], v, seed, (tuning[clip]["lr"], tuning[clip]["backbone_lr_mult"]))
            for group in groups for seed in seeds for clip in clips for v in group if wanted(v, seed)]
    missing = 0
    for job, metrics in zip(jobs, runner.many(jobs), strict=True):
        if metrics is not None:
            runs[job[0]][job[2]][job[3]] = metrics
        missing += metrics is None
    runs = {clip: {v: by_seed for v, by_seed in by_v.items() if by_seed} for clip, by_v in runs.items()}

    result: dict[str, Any] = {
        "study": name, "units": "percent",
        "partial": missing > 0,  # a planned run has not finished (only --aggregate-only gets here then)
        "runs_missing": missing,
        "seeds_run": {c: {v: sorted(s) for v, s in by_v.items()} for c, by_v in runs.items()},
        "settings": {"epochs": study.epochs, "seeds": list(seeds), "variants": list(variants),
                     "clips": list(clips),
                     "schedule": list(study.schedule), "lr_grid": list(study.lr_grid),
                     "pretrained_backbone_grid": list(study.pretrained_backbone_grid),
                     "flags": {v: VARIANTS[v] for v in variants}, "threads_per_run": args.threads},
        "pretrained_clip": pretrain, "lr_tuning": tuning, "tables": {}, "differences": {}, "curves": {},
    }
    text = [f"Study `{name}`: {study.preset} preset, {study.epochs} epoch(s), seeds {list(seeds)}, "
            "best epoch chosen on val; percent, mean ± std over seeds. Learning rate tuned for the "
            "baseline on val (seed 0): "
            + "; ".join(f"{c} {t['val_miou']} → {t['chosen']}" for c, t in tuning.items())
            + " (bb: lr multiplier of the CLIP towers; none: 0.1 pretrained, 1 random init).", ""]
    for clip in clips:
        table, diffs = report.aggregate(runs[clip]), report.differences(runs[clip])
        result["tables"][clip], result["differences"][clip] = table, diffs
        result["curves"][clip] = report.curves(runs[clip])
        text.append(report.markdown(f"{clip} CLIP", table, diffs, tuning[clip]["chosen"]))
        text.append(report.selection_markdown(f"{clip} CLIP", result["curves"][clip]))
        if study.head_to_head:
            versus = report.head_to_head(runs[clip], study.head_to_head)
            result.setdefault("head_to_head", {})[clip] = versus
            text.append(report.head_to_head_markdown(f"{clip} CLIP", versus))
        grid = {v: GRID_VARIANTS[v] for v in runs[clip] if v in GRID_VARIANTS}
        if grid:
            result.setdefault("grids", {})[clip] = report.grid(runs[clip], grid)
            text.append(report.grid_markdown(f"{clip} CLIP", result["grids"][clip]))
    headline = clips[0]
    for variant, by_split in result["differences"][headline].items():  # masksd_minus_baseline, maskris_...
        result[f"{variant}_minus_baseline"] = {
            s: {**{k: d[k] for k in ("mean", "ci95_low", "ci95_high", "values")}, "pairs": len(d["values"])}
            for s, d in by_split.items()}
    result["minus_baseline_setting"] = headline
    result["split_sizes"] = report.split_sizes(runs[headline])
    result["power"] = report.power(result["differences"][headline].get("masksd", {}).get("test"))
    # where each pair ran: a pair shares one machine and one pretrained file, pairs may differ
    if study.probe and Path(study.probe).is_file():  # the scorers' kept-on-referent before any RIS training
        sha = pretrain.get("sha256") if pretrain else None
        result["probe"] = {"file": study.probe,
                           **report.probe_summary(json.loads(Path(study.probe).read_text()), sha)}
    result["provenance"] = {
        clip: {str(seed): {"machine": m.get("machine", {}).get("cpu", "not recorded"),
                           "pretrained_sha256": m.get("pretrained_sha256", "not recorded")}
               for seed, m in sorted(runs[clip].get("baseline", {}).items())}
        for clip in clips}
    result["benchmark_wall_time_s"] = round(time.perf_counter() - started, 1)
    md = "\n".join(text)
    print("\n" + md)
    stem = f"accuracy_{name}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report.finite(result), indent=2, allow_nan=False) + "\n")
    (out_dir / f"{stem}.md").write_text(md)
    plotted = {c: {v: x for v, x in by_v.items() if v not in GRID_VARIANTS}
               for c, by_v in result["curves"].items()}
    report.plot_curves(plotted, out_dir / f"{stem}_curves.png")  # the grids are tabulated only
    print(f"wrote {out_dir / stem}.json, .md, _curves.png ({result['benchmark_wall_time_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
