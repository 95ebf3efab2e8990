"""Statistics of synthetic world v2 (``world_v2.py``), beside the demo world's and RefCOCO's.

    python examples/cris_clip/world_v2_stats.py --samples 2000 \\
        --json docs/benchmarks/world_v2_stats.json --plot docs/benchmarks/world_v2_area.png

Per split: the referent's area (share of the image's pixels: median, quantiles, histogram), the
share of images with at least two objects of the referent's category (shape), words per
expression, the expression kinds, objects per image, the vocabulary and the generation time;
``--compare-demo`` adds the same figures for the demo world (``synthetic.py``, 64 px).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:  # a script run of this folder imports siblings by plain name
    import synthetic
    import world_v2
except ModuleNotFoundError:  # imported as examples.cris_clip.world_v2_stats (tests)
    from . import synthetic, world_v2

SPLITS = ("train", "val", "test", "compositional")
REFCOCO = {"expressions": 142_209, "objects": 50_000, "images": 19_994, "words_per_expression": 3.61,
           "same_category_rate": "≥ 2 same-category objects per image by construction",
           "source": "Yu et al. 2016 (RefCOCO, UNC split), as quoted in issue 16"}


def split_stats(generate: Callable[..., Any], split: str, samples: int, seed: int) -> dict[str, Any]:
    """Figures of the first ``samples`` samples of ``split``; ``areas`` lists every referent's area."""
    started = time.perf_counter()
    rows = [generate(split, i, seed=seed) for i in range(samples)]
    seconds = time.perf_counter() - started
    areas = np.array([r.mask.mean() for r in rows])
    words = [r.sentence.split() for r in rows]
    same = [sum(o.shape == r.objects[r.target_index].shape for o in r.objects) for r in rows]
    held = [(r.objects[r.target_index].colour, r.objects[r.target_index].shape) in synthetic.HELD_OUT_COMBOS
            for r in rows]
    q = np.quantile(areas, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "samples": samples, "image_size": int(rows[0].image.shape[0]),
        "area": {"mean": float(areas.mean()),
                 **{f"q{int(p * 100)}": float(v)
                    for p, v in zip((0.1, 0.25, 0.5, 0.75, 0.9), q, strict=True)}},
        "same_category_rate": float(np.mean([s >= 2 for s in same])),
        "same_category_mean": float(np.mean(same)),
        "words_per_expression": float(np.mean([len(w) for w in words])),
        "words_histogram": dict(sorted(Counter(len(w) for w in words).items())),
        "kinds": dict(Counter(r.expression.kind for r in rows)),
        "objects_per_image": float(np.mean([len(r.objects) for r in rows])),
        "held_out_target_rate": float(np.mean(held)),
        "vocabulary": sorted({w for ws in words for w in ws}),
        "ms_per_sample": round(1000 * seconds / samples, 3),
        "areas": [round(float(a), 5) for a in areas],
    }


def world_stats(generate: Callable[..., Any], samples: int, seed: int) -> dict[str, Any]:
    return {split: split_stats(generate, split, samples, seed) for split in SPLITS}


def plot(worlds: dict[str, dict[str, Any]], path: str) -> None:
    """Histogram of the referent's area per world (every split pooled), medians marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bins = np.linspace(0, 0.3, 61)
    for name, stats in worlds.items():
        areas = np.concatenate([s["areas"] for s in stats.values()])
        line = ax.hist(areas, bins=bins, alpha=0.55, label=f"{name} (median {np.median(areas):.3f})")[2][0]
        ax.axvline(float(np.median(areas)), color=line.get_facecolor(), linestyle="--", alpha=1.0)
    ax.set_xlabel("referent area (share of the image)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(name: str, stats: dict[str, Any]) -> str:
    lines = [f"**{name}**", "",
             "| split | area q10 / q25 / median / q75 / q90 | ≥ 2 of the referent's category | "
             "words / expression | objects / image | kinds | ms / sample |",
             "|---|---|---:|---:|---:|---|---:|"]
    for split, s in stats.items():
        a = s["area"]
        kinds = ", ".join(f"{k} {v / s['samples']:.2f}" for k, v in sorted(s["kinds"].items()))
        lines.append(f"| {split} | {a['q10']:.3f} / {a['q25']:.3f} / **{a['q50']:.3f}** / {a['q75']:.3f} / "
                     f"{a['q90']:.3f} | {s['same_category_rate']:.2f} | {s['words_per_expression']:.2f} | "
                     f"{s['objects_per_image']:.2f} | {kinds} | {s['ms_per_sample']:.2f} |")
    vocab = sorted({w for s in stats.values() for w in s["vocabulary"]})
    return "\n".join(lines) + f"\n\nvocabulary ({len(vocab)} words): {' '.join(vocab)}\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="samples per split")
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed (--synthetic-seed)")
    parser.add_argument("--compare-demo", action=argparse.BooleanOptionalAction, default=True,
                        help="also the demo world's figures")
    parser.add_argument("--json", default=None, help="write the figures (without the per-sample areas)")
    parser.add_argument("--plot", default=None, help="write the area histogram (PNG)")
    args = parser.parse_args(argv)
    worlds = {"world v2": world_stats(world_v2.generate_sample, args.samples, args.seed)}
    if args.compare_demo:
        worlds["demo world"] = world_stats(synthetic.generate_sample, args.samples, args.seed)
    print("\n".join(summary(name, stats) for name, stats in worlds.items()))
    if args.plot:
        plot(worlds, args.plot)
    report = {"samples_per_split": args.samples, "seed": args.seed, "refcoco": REFCOCO,
              "worlds": {n: {sp: {k: v for k, v in s.items() if k != "areas"} for sp, s in w.items()}
                         for n, w in worlds.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
