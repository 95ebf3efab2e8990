"""Kept-on-target against chance, per scorer: a plot of one or more selection-probe JSONs.

    python -m benchmarks.probe_plot docs/benchmarks/selection_probe_dense.json \\
        docs/benchmarks/selection_probe_v2.json --out docs/benchmarks/selection_probe.png

For every probe file (``benchmarks/selection_probe.py --json``) and every CLIP in it (random init,
pretrained), one group of bars: the share of LMVSD's kept patches that lies on the referent,
divided by the referent's share of all patches (1 = a random pick; with TopK 0.5 the ceiling is 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

WORLD_NAMES = {"demo": "demo CLIP, world v1", "v2": "CLIP v2, world v2"}


def ratios(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{clip label: {setting: kept-on-target ÷ area}}`` of one probe report."""
    world = WORLD_NAMES.get(report.get("preset", "demo"), str(report.get("preset")))
    out: dict[str, dict[str, float]] = {}
    for clip, by_setting in report["settings"].items():
        label = f"{world} ({clip})"
        out[label] = {name: row["precision"] / row["random"] for name, row in by_setting.items()
                      if row.get("random", 0) > 0 and "precision" in row}
    return out


def plot(groups: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({s for g in groups.values() for s in g}, key=lambda s: (s.split("/")[0], s))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(settings) * len(groups) / 2), 4.2))
    width = 0.8 / max(1, len(groups))
    for k, (label, values) in enumerate(groups.items()):
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(settings))]
        ax.bar(xs, [values.get(s, float("nan")) for s in settings], width=width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="random pick")
    ax.axhline(2.0, color="grey", linewidth=0.8, linestyle=":", label="ceiling at TopK 0.5")
    ax.set_xticks(range(len(settings)), settings, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("LMVSD kept on referent ÷ referent area")
    ax.set_title("Which patches each scorer keeps, before any RIS training")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probes", nargs="+", help="JSON files written by benchmarks.selection_probe --json")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    groups: dict[str, dict[str, float]] = {}
    for name in args.probes:
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"probe file {name!r} does not exist "
                             "(write it with benchmarks.selection_probe --json)")
        groups.update(ratios(json.loads(path.read_text())))
    plot(groups, Path(args.out))
    for label, values in groups.items():
        print(label + ": " + ", ".join(f"{s} {v:.2f}" for s, v in values.items()))
    print(f"wrote {args.out}")
    return groups


if __name__ == "__main__":
    main()
