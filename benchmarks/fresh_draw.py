"""A study's trained checkpoints on a fresh draw of its evaluation splits.

A study evaluates every run on the same fixed samples (``--synthetic-seed 0``), so its paired
intervals cover training noise but not the draw of the evaluation split: an effect that comes
from the particular 2000 samples would be shared by every pair. This script re-evaluates each
run's ``best.pt`` (the epoch chosen on val) on splits drawn with another generator seed, and
reports the same paired differences beside the study's own.

    python -m benchmarks.fresh_draw --study-json docs/benchmarks/accuracy_v3_count.json \\
        --synthetic-seed 1 --splits test compositional --out docs/benchmarks/accuracy_v3_count_fresh_draw

Runs ``examples/cris_clip/evaluate.py`` ``--jobs`` at a time on ``--threads`` threads each; finished
evaluations are reused from ``--eval-dir`` (default ``<work-dir>/<study>/fresh_draw-seed<N>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import accuracy_report as report
from benchmarks.accuracy import ROOT, finished_runs, run

EVALUATE = ROOT / "examples" / "cris_clip" / "evaluate.py"


def evaluate_run(
    checkpoint: Path, out: Path, *, seed: int, splits: list[str], threads: int
) -> dict[str, Any]:
    """``evaluate.py`` on ``checkpoint`` with the data drawn from ``seed`` (cached in ``out``):
    ``{split: {"miou", "oiou", ..., "count"}}``."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, str(EVALUATE), "--checkpoint", str(checkpoint), "--split", *splits,
             "--synthetic-seed", str(seed), "--json", str(out)], threads=threads,
            label=f"evaluate {checkpoint.parent.name}")
    return json.loads(out.read_text())["splits"]


def comparisons(study_json: dict[str, Any], clip: str) -> list[tuple[str, str]]:
    """Every variant − baseline, then the study's head-to-head pairs, as ``(a, b)``."""
    pairs = [(v, "baseline") for v in study_json["seeds_run"][clip] if v != "baseline"]
    for key in study_json.get("head_to_head", {}).get(clip, {}):
        a, b = key.split("_minus_")
        pairs.append((a, b))
    return pairs


def paired(fresh: dict[str, dict[int, dict]], a: str, b: str, split: str) -> dict[str, Any]:
    seeds = sorted(set(fresh[a]) & set(fresh[b]))
    treated = [fresh[a][s][split]["miou"] for s in seeds]
    control = [fresh[b][s][split]["miou"] for s in seeds]
    return {**report.paired_difference(treated, control), "seeds": seeds}


def study_difference(
    study_json: dict[str, Any], clip: str, a: str, b: str, split: str
) -> dict[str, Any] | None:
    """The study's own a − b on ``split`` (its fixed draw), where it reported it."""
    if b == "baseline":
        return study_json["differences"][clip].get(a, {}).get(split)
    return study_json.get("head_to_head", {}).get(clip, {}).get(f"{a}_minus_{b}", {}).get(split)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study-json", required=True, help="accuracy_<study>.json written by benchmarks.accuracy")
    p.add_argument("--work-dir", default="runs/accuracy",
                   help="benchmarks.accuracy's --work-dir (holds the runs)")
    p.add_argument("--synthetic-seed", type=int, default=1,
                   help="generator seed of the fresh draw (the study's: 0)")
    p.add_argument("--splits", nargs="+", default=["test", "compositional"])
    p.add_argument("--eval-dir", default=None, help="where evaluations are cached")
    p.add_argument("--out", required=True, help="output path without suffix: writes .json and .md")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.synthetic_seed == 0:
        p.error("--synthetic-seed 0 is the study's own draw; choose another seed for a fresh one")

    study_json = json.loads(Path(args.study_json).read_text())
    name, clip = study_json["study"], study_json["minus_baseline_setting"]
    runs_dir, run_dirs = finished_runs(study_json, args.work_dir)
    eval_dir = Path(args.eval_dir) if args.eval_dir else runs_dir / f"fresh_draw-seed{args.synthetic_seed}"
    jobs = [(v, s) for v, by_seed in run_dirs.items() for s in by_seed]

    def one(job: tuple[str, int]) -> dict[str, Any]:
        run = run_dirs[job[0]][job[1]]
        return evaluate_run(run / "best.pt", eval_dir / clip / f"{run.name}.json",
                            seed=args.synthetic_seed, splits=args.splits, threads=args.threads)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        evaluated = list(pool.map(one, jobs))
    fresh: dict[str, dict[int, dict]] = {}
    for (variant, seed), splits in zip(jobs, evaluated, strict=True):
        fresh.setdefault(variant, {})[seed] = splits

    result: dict[str, Any] = {
        "study": name, "study_json": args.study_json, "setting": clip, "units": "percent",
        "synthetic_seed": args.synthetic_seed, "study_synthetic_seed": 0,
        "split_sizes": {s: int(next(iter(next(iter(fresh.values())).values()))[s]["count"])
                        for s in args.splits},
        "means": {v: {s: report.mean_std([m[s]["miou"] for m in by_seed.values()]) for s in args.splits}
                  for v, by_seed in fresh.items()},
        "differences": {},
    }
    lines = [f"Study `{name}`'s best checkpoints on a fresh draw of the evaluation splits (generator seed "
             f"{args.synthetic_seed}; the study's: 0), {result['split_sizes']} samples. Paired mIoU "
             "difference, mean [95 % t interval], pairs positive; the study's own draw beside it.", "",
             "| a − b | pairs | "
             + " | ".join(f"{s}: fresh draw | {s}: study's draw" for s in args.splits) + " |",
             "|---|---:|" + "---:|---:|" * len(args.splits)]
    for a, b in comparisons(study_json, clip):
        key = f"{a}_minus_{b}"
        result["differences"][key] = {}
        cells = []
        for split in args.splits:
            new, old = paired(fresh, a, b, split), study_difference(study_json, clip, a, b, split)
            result["differences"][key][split] = {"fresh_draw": new, "study_draw": old}
            positive = sum(v > 0 for v in new["values"])
            cells += [f"{report.fmt_ci(new)}, {positive}", report.fmt_ci(old) if old else "—"]
        lines.append(f"| {a} − {b} | {len(new['seeds'])} | " + " | ".join(cells) + " |")
    report.write_report(args.out, result, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
