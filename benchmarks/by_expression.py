"""Where a study's differences on an evaluation split come from: mIoU per kind of expression.

World v2's expressions are of three kinds (``attribute``: "blue circle", ``location``: "left
circle", ``relation``: "circle near red square"), and a target phrase may or may not name the
referent's colour. On the compositional split (targets of held-out colour–shape pairs) only a
phrase that names the colour states the unseen pair in words. This script evaluates each run's
``best.pt`` of the chosen variants on one split of the study's own draw, per group of samples
(kind × colour named), with ``examples/cris_clip/evaluate.py``'s protocol, and reports the paired
differences per group.

    python -m benchmarks.by_expression --study-json docs/benchmarks/accuracy_v3_count.json \\
        --out docs/benchmarks/accuracy_v3_count_by_expression

Results per checkpoint are cached in ``--eval-dir`` (default ``<work-dir>/<study>/by_expression``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from benchmarks import accuracy_report as report
from benchmarks.accuracy import finished_runs
from examples.cris_clip.config import context_length
from examples.cris_clip.data import RISDataset, eval_loader, raw_dataset
from examples.cris_clip.evaluate import evaluate, load_checkpoint
from examples.cris_clip.world_v2 import generate_sample


def groups(split: str, size: int, seed: int) -> dict[str, list[int]]:
    """Sample indices of world v2's ``split`` by ``"<kind>, colour named|not named"``, and ``"all"``."""
    out: dict[str, list[int]] = {"all": list(range(size))}
    for i in range(size):
        expression = generate_sample(split, i, seed=seed).expression
        named = "colour named" if expression.target.colour else "colour not named"
        out.setdefault(f"{expression.kind}, {named}", []).append(i)
    return dict(sorted(out.items()))


def evaluate_groups(checkpoint: Path, split: str, by_group: dict[str, list[int]]) -> dict[str, float]:
    """mIoU (percent) of the checkpoint's bare model on each group of ``split``."""
    wrapper, cfg, _ = load_checkpoint(checkpoint)
    dataset = RISDataset(raw_dataset(cfg.data, split), image_size=cfg.model.image_size,
                         context_length=context_length(cfg), train=False)
    out = {}
    for name, indices in by_group.items():
        loader = eval_loader(Subset(dataset, indices), batch_size=64, rank=0, world_size=1)
        scores = evaluate(wrapper.unwrap(), loader, device=torch.device("cpu"))
        out[name] = scores["original"]["prediction"]["miou"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study-json", required=True, help="accuracy_<study>.json written by benchmarks.accuracy")
    p.add_argument("--work-dir", default="runs/accuracy",
                   help="benchmarks.accuracy's --work-dir (holds the runs)")
    p.add_argument("--split", default="compositional")
    p.add_argument("--pairs", nargs="+", default=["masksd:baseline", "random_same_count:baseline",
                                                  "masksd:random_same_count"], help="a:b, reported as a − b")
    p.add_argument("--eval-dir", default=None, help="where per-checkpoint results are cached")
    p.add_argument("--out", required=True, help="output path without suffix: writes .json and .md")
    args = p.parse_args(argv)

    study_json = json.loads(Path(args.study_json).read_text())
    name, clip = study_json["study"], study_json["minus_baseline_setting"]
    runs_dir, run_dirs = finished_runs(study_json, args.work_dir)
    eval_dir = Path(args.eval_dir) if args.eval_dir else runs_dir / "by_expression"
    if any(pair.count(":") != 1 for pair in args.pairs):
        p.error(f"--pairs {args.pairs}: write each as a:b (variant names), reported as a − b")
    pairs = [tuple(pair.split(":")) for pair in args.pairs]
    variants = list(dict.fromkeys(v for pair in pairs for v in pair))
    missing = [v for v in variants if v not in run_dirs]
    if missing:
        p.error(f"--pairs names {missing}, which {args.study_json} did not run (it has {sorted(run_dirs)})")
    by_group = groups(args.split, study_json["split_sizes"][args.split], seed=0)

    miou: dict[str, dict[int, dict[str, float]]] = {}
    for variant in variants:
        for seed, run in run_dirs[variant].items():
            cache = eval_dir / clip / args.split / f"{run.name}.json"
            if not cache.is_file():
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(evaluate_groups(run / "best.pt", args.split, by_group)) + "\n")
                print(f"  {run.name}", flush=True)
            miou.setdefault(variant, {})[seed] = json.loads(cache.read_text())

    result: dict[str, Any] = {"study": name, "split": args.split, "units": "percent",
                              "group_sizes": {g: len(i) for g, i in by_group.items()},
                              "means": {v: {g: report.mean_std([m[g] for m in by_seed.values()])
                                            for g in by_group}
                                        for v, by_seed in miou.items()},
                              "differences": {}}
    lines = [f"Study `{name}`, {args.split} split (the study's draw): mIoU per group of expressions, mean "
             "over seeds, and paired differences, mean [95 % t interval], pairs positive.", "",
             "| group | samples | " + " | ".join(variants) + " | "
             + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
             "|---|---:|" + "---:|" * (len(variants) + len(pairs))]
    for group, indices in by_group.items():
        cells = [f"{result['means'][v][group]['mean']:.2f}" for v in variants]
        for a, b in pairs:
            seeds = sorted(set(miou[a]) & set(miou[b]))
            d = report.paired_difference([miou[a][s][group] for s in seeds],
                                         [miou[b][s][group] for s in seeds])
            result["differences"].setdefault(f"{a}_minus_{b}", {})[group] = {**d, "seeds": seeds}
            cells.append(f"{report.fmt_ci(d)}, {sum(x > 0 for x in d['values'])}")
        lines.append(f"| {group} | {len(indices)} | " + " | ".join(cells) + " |")
    report.write_report(args.out, result, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
