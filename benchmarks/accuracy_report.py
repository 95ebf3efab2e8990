"""Aggregation, paired statistics, tables and plots of ``benchmarks/accuracy.py``.

Every function takes the ``metrics.json`` dictionaries that ``examples/cris_clip/train.py`` writes
(``splits`` → split → metric, ``history`` → one entry per epoch) and returns plain data; nothing
here runs a model.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

SPLITS = ("val", "test", "compositional")
KEYS = ("miou", "oiou", "prec@0.5", "prec@0.7", "prec@0.9")

# two-sided 95 % quantiles of Student's t, by degrees of freedom (scipy.stats.t.ppf(0.975, df))
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table, conservative between rows)."""
    if df < 1:
        raise ValueError(f"a confidence interval needs at least 2 pairs (df >= 1), got df={df}")
    rows = [d for d in T975 if d <= df]
    return T975[max(rows)] if df <= 30 else 1.960


def mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def paired_difference(treated: list[float], control: list[float]) -> dict[str, Any]:
    """Mean of ``treated[i] - control[i]`` over seeds with a 95 % t interval (nan bounds for one pair)."""
    if len(treated) != len(control):
        raise ValueError(f"paired runs differ in number: {len(treated)} vs {len(control)}")
    diffs = [a - b for a, b in zip(treated, control, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95_low": math.nan, "ci95_high": math.nan, "values": diffs, "n": len(diffs)}
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "values": diffs, "n": len(diffs)}


Runs = dict[str, dict[int, dict[str, Any]]]  # variant -> seed -> metrics.json

Z80 = 0.8416  # the 0.8 quantile of the standard normal


def pairs_needed(sd: float, effect: float = 1.0, *, minimum: int = 8, limit: int = 200) -> int:
    """Seed pairs for a paired two-sided 95 % t test to detect ``effect`` with 80 % power, given the
    per-pair standard deviation ``sd`` of the difference: the smallest ``n >= minimum`` with
    ``n >= ((t_0.975(n-1) + z_0.8) · sd / effect)²`` (the usual approximation of the noncentral t)."""
    if sd < 0 or effect <= 0:
        raise ValueError(f"need sd >= 0 and effect > 0, got sd={sd}, effect={effect}")
    for n in range(max(2, minimum), limit + 1):
        if n >= ((t975(n - 1) + Z80) * sd / effect) ** 2:
            return n
    return limit


def power(test_difference: dict[str, Any] | None, effect: float = 1.0, minimum: int = 8) -> dict[str, Any]:
    """The power analysis of a study from its paired ``masksd - baseline`` test differences (the
    pilot pairs): their standard deviation and the pairs needed to detect ``effect`` mIoU."""
    if not test_difference or len(test_difference["values"]) < 2:
        return {"effect": effect, "sd": None, "pairs_needed": minimum,
                "pilot_pairs": 0 if not test_difference else 1,
                "note": "fewer than 2 pairs: the minimum is used until a standard deviation can be "
                        "estimated"}
    sd = statistics.stdev(test_difference["values"])
    return {"effect": effect, "alpha": 0.05, "power": 0.8, "sd": sd,
            "pilot_pairs": len(test_difference["values"]),
            "pairs_needed": pairs_needed(sd, effect, minimum=minimum), "minimum": minimum}


def probe_summary(probe: dict[str, Any], clip_sha256: str | None) -> dict[str, Any]:
    """The selection probe's figures for a study's CLIP (``benchmarks/selection_probe.py`` JSON):
    per scorer, kept-on-referent precision against the referent's area fraction (the chance rate)
    and their ratio, and the kept rates of target nouns vs function words."""
    scorers = {
        scorer: {"kept_on_referent": r["precision"], "area_fraction": r["random"],
                 "ratio": r["precision"] / r["random"] if r["random"] else None,
                 "kept_target_noun": r.get("kept_rate/target_noun"),
                 "kept_function_word": r.get("kept_rate/function")}
        for scorer, r in probe["settings"].get("pretrained", {}).items()}
    return {"preset": probe.get("preset"), "samples": probe.get("samples"),
            "pretrained_sha256": probe.get("pretrained_sha256"),
            "same_clip_as_study": clip_sha256 is not None and probe.get("pretrained_sha256") == clip_sha256,
            "scorers": scorers}


def split_sizes(runs: Runs) -> dict[str, int]:
    """Samples evaluated per split (from any run's ``metrics.json``)."""
    for by_seed in runs.values():
        for metrics in by_seed.values():
            return {split: int(metrics["splits"][split].get("count", 0)) for split in SPLITS}
    return {}


def aggregate(runs: Runs) -> dict[str, Any]:
    """Mean and sample std over seeds of every split/metric, per variant."""
    table: dict[str, Any] = {}
    for name, by_seed in runs.items():
        results = list(by_seed.values())
        table[name] = {split: {key: mean_std([r["splits"][split][key] for r in results]) for key in KEYS}
                       for split in SPLITS}
        table[name]["wall_time_s"] = statistics.fmean(r["wall_time_s"] for r in results)
        table[name]["seeds"] = sorted(by_seed)
    return table


def finite(value: Any) -> Any:
    """``value`` with every NaN / infinity replaced by None (strict JSON: an interval of one pair)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_report(stem: str | Path, result: dict[str, Any], markdown_text: str) -> None:
    """Print ``markdown_text`` and write ``<stem>.json`` (strict JSON, :func:`finite`) and ``<stem>.md``."""
    print(markdown_text)
    stem = Path(stem)
    stem.with_name(stem.name + ".json").write_text(json.dumps(finite(result), indent=2, allow_nan=False)
                                                   + "\n")
    stem.with_name(stem.name + ".md").write_text(markdown_text)
    print(f"wrote {stem}.json, .md")


def same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' ``metrics.json`` name the same CPU model and pretrained file (where both
    record them): float results differ across CPU models, so only such runs make a pair."""
    for key in ("cpu", "sha"):
        x = a.get("machine", {}).get("cpu") if key == "cpu" else a.get("pretrained_sha256")
        y = b.get("machine", {}).get("cpu") if key == "cpu" else b.get("pretrained_sha256")
        if x is not None and y is not None and x != y:
            return False
    return True


def differences(runs: Runs, control: str = "baseline") -> dict[str, Any]:
    """Per variant (other than ``control``) and split: the paired mIoU difference to ``control``
    over the seeds both have run on one machine (:func:`same_machine`)."""
    if control not in runs:
        return {}
    out = {}
    for name, by_seed in runs.items():
        seeds = sorted(s for s in set(by_seed) & set(runs[control])
                       if same_machine(by_seed[s], runs[control][s]))
        if name == control or not seeds:
            continue
        out[name] = {}
        for split in SPLITS:
            treated = [by_seed[s]["splits"][split]["miou"] for s in seeds]
            untreated = [runs[control][s]["splits"][split]["miou"] for s in seeds]
            out[name][split] = {**paired_difference(treated, untreated), "seeds": seeds,
                                "treated_mean": statistics.fmean(treated),
                                "control_mean": statistics.fmean(untreated)}
    return out


def head_to_head(runs: Runs, comparisons: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """``"<a>_minus_<b>"`` -> per split the paired mIoU difference ``a − b`` over the seeds both
    ran on one machine, for each ``(a, b)`` in ``comparisons`` whose runs exist (e.g. does guided
    selection beat random selection, does CM-MaskSD beat MaskRIS)."""
    out = {}
    for a, b in comparisons:
        if a in runs and b in runs:
            by_split = differences({a: runs[a], b: runs[b]}, control=b).get(a)
            if by_split:
                out[f"{a}_minus_{b}"] = by_split
    return out


def head_to_head_markdown(setting: str, result: dict[str, Any]) -> str:
    """The head-to-head differences as a table (empty when there are none)."""
    if not result:
        return ""
    lines = [f"**{setting}**: head to head, paired mIoU difference, mean [95 % t interval] (b → a)", "",
             "| a − b | pairs (seeds) | " + " | ".join(SPLITS) + " |", "|---|---|" + "---|" * len(SPLITS)]
    for name, by_split in result.items():
        seeds = by_split[SPLITS[0]]["seeds"]
        lines.append(f"| {name.replace('_minus_', ' − ')} | {len(seeds)} ({','.join(map(str, seeds))}) | "
                     + " | ".join(fmt_ci(by_split[s]) for s in SPLITS) + " |")
    return "\n".join(lines) + "\n"


def curves(runs: Runs, split: str = "val") -> dict[str, Any]:
    """Per variant: val mIoU and LMVSD selection precision per epoch, one list per seed; VMLSD's
    kept rate per word role per epoch, one dict per seed."""
    out: dict[str, Any] = {}
    for name, by_seed in runs.items():
        results = list(by_seed.values())
        miou, precision, chance = [], [], []
        for r in results:
            miou.append([h["eval"][split][r["protocol"]["resolution"]]["miou"] for h in r["history"]])
            sel = [h.get("lmvsd_selection", {}) for h in r["history"]]
            if all("precision" in s for s in sel):
                precision.append([s["precision"] for s in sel])
                chance.append([s["random"] for s in sel])
        out[name] = {"epochs": [h["epoch"] for h in results[0]["history"]], "miou": miou,
                     "lmvsd_precision": precision, "lmvsd_random": chance,
                     "vmlsd_kept_rate": [[h.get("vmlsd_selection", {}) for h in r["history"]]
                                         for r in results]}
    return out


def _fmt(cell: dict[str, Any]) -> str:
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def fmt_ci(d: dict[str, Any]) -> str:
    """A paired difference as ``+m [+lo, +hi]`` (and ``(control → treated)`` means where known)."""
    means = f" ({d['control_mean']:.2f} → {d['treated_mean']:.2f})" if "control_mean" in d else ""
    if math.isnan(d["ci95_low"]):
        return f"{d['mean']:+.2f} (1 pair){means}"
    return f"{d['mean']:+.2f} [{d['ci95_low']:+.2f}, {d['ci95_high']:+.2f}]{means}"


def markdown(setting: str, table: dict[str, Any], diffs: dict[str, Any], header: str) -> str:
    """One setting's comparison: mIoU and P@0.5 per split, then the paired differences."""
    lines = [f"**{setting}** — {header}", "", "| variant | " + " | ".join(
        f"{s} mIoU | {s} P@0.5" for s in SPLITS) + " | seeds | run time (s) |",
             "|---|" + "---|" * (2 * len(SPLITS) + 2)]
    for name, row in table.items():
        cells = [f"{_fmt(row[s]['miou'])} | {_fmt(row[s]['prec@0.5'])}" for s in SPLITS]
        seeds = ",".join(map(str, row["seeds"]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seeds} | {row['wall_time_s']:.0f} |")
    if diffs:
        lines += ["", "Paired mIoU difference to the baseline (same seed: same init, data order, machine), "
                  "mean [95 % t interval] (baseline → variant, means over the paired seeds):", "",
                  "| variant | pairs (seeds) | " + " | ".join(SPLITS) + " |",
                  "|---|---|" + "---|" * len(SPLITS)]
        for name, by_split in diffs.items():
            seeds = ",".join(map(str, by_split[SPLITS[0]]["seeds"]))
            lines.append(f"| {name} − baseline | {len(by_split[SPLITS[0]]['seeds'])} ({seeds}) | "
                         + " | ".join(fmt_ci(by_split[s]) for s in SPLITS) + " |")
    return "\n".join(lines) + "\n"


def selection_markdown(setting: str, by_variant: dict[str, Any]) -> str:
    """What the branches kept in the last epoch, mean over seeds: LMVSD's kept patches on the
    target against the target's area share (random), VMLSD's kept rate per word role."""
    lines = [f"**{setting}**: what the branches keep (last epoch, mean over seeds)", "",
             "| variant | LMVSD kept on target | random (target area) | VMLSD kept rate by word role |",
             "|---|---:|---:|---|"]
    for name, c in by_variant.items():
        prec = [s[-1] for s in c["lmvsd_precision"]]
        rand = [s[-1] for s in c["lmvsd_random"]]
        roles: dict[str, list[float]] = {}
        for seed in c["vmlsd_kept_rate"]:
            for role, rate in (seed[-1] if seed else {}).items():
                if not math.isnan(rate):
                    roles.setdefault(role, []).append(rate)
        if not prec and not roles:
            continue
        words = ", ".join(f"{r} {statistics.fmean(v):.2f}" for r, v in roles.items()) or "—"
        lines.append(f"| {name} | {statistics.fmean(prec):.3f} | {statistics.fmean(rand):.3f} | {words} |"
                     if prec else f"| {name} | — | — | {words} |")
    return "\n".join(lines) + "\n"


def grid(runs: Runs, variants: dict[str, tuple[str, str, float]], split: str = "val") -> dict[str, Any]:
    """The hyper-parameter grids: ``variants`` maps a grid variant to ``(branch, key, value)``; its
    centre is the run ``<branch>_only`` (the default value, read from its config). Per branch and key:
    ``split`` mIoU by value on the first seed the grid ran, next to the baseline on that seed."""
    out: dict[str, Any] = {}
    for name, (branch, key, value) in variants.items():
        seed = min(runs[name])
        centre = runs.get(f"{branch}_only", {}).get(seed)
        row = out.setdefault(branch, {}).setdefault(key, {"seed": seed, "miou": {}, "default": None,
                                                         "baseline": None, "branch_only": f"{branch}_only"})
        row["miou"][f"{value:g}"] = runs[name][seed]["splits"][split]["miou"]
        if centre is not None:
            default = centre["config"]["distill"][branch][key]
            row["default"] = f"{default:g}"
            row["miou"][row["default"]] = centre["splits"][split]["miou"]
        if seed in runs.get("baseline", {}):
            row["baseline"] = runs["baseline"][seed]["splits"][split]["miou"]
    for by_key in out.values():
        for row in by_key.values():
            row["miou"] = dict(sorted(row["miou"].items(), key=lambda kv: float(kv[0])))
    return out


def grid_markdown(setting: str, grids: dict[str, Any]) -> str:
    """One line per branch and hyper-parameter: val mIoU by value, the default in bold."""
    lines = [f"**{setting}**: the paper's grids (Tables III, IV), one branch alone, val mIoU, one seed", "",
             "| branch | hyper-parameter | val mIoU by value (**default**) | baseline, same seed |",
             "|---|---|---|---:|"]
    label = {"weight": "λ (loss weight)", "ratio": "α (mask ratio)", "top_k": "TopK"}
    for branch, by_key in grids.items():
        for key, row in by_key.items():
            cells = ", ".join(f"**{v}: {m:.2f}**" if v == row["default"] else f"{v}: {m:.2f}"
                              for v, m in row["miou"].items())
            base = "—" if row["baseline"] is None else f"{row['baseline']:.2f}"
            lines.append(f"| {branch.upper()} (seed {row['seed']}) | {label.get(key, key)} | {cells} | "
                         f"{base} |")
    return "\n".join(lines) + "\n"


def plot_curves(by_setting: dict[str, dict[str, Any]], path: Path) -> None:
    """Val mIoU over epochs (mean, seed range shaded) and LMVSD selection precision vs random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    settings = list(by_setting)
    fig, axes = plt.subplots(2, len(settings), figsize=(5.5 * len(settings), 7.5), squeeze=False)
    for col, setting in enumerate(settings):
        top, bottom = axes[0][col], axes[1][col]
        for name, c in by_setting[setting].items():
            seeds = c["miou"]
            epochs = c["epochs"][:min(map(len, seeds))]
            cols = [[s[i] for s in seeds] for i in range(len(epochs))]
            (line,) = top.plot(epochs, [statistics.fmean(v) for v in cols], marker="o", label=name)
            top.fill_between(epochs, [min(v) for v in cols], [max(v) for v in cols], alpha=0.15,
                             color=line.get_color())
            if c["lmvsd_precision"]:
                prec = [[s[i] for s in c["lmvsd_precision"]] for i in range(len(epochs))]
                bottom.plot(epochs, [statistics.fmean(v) for v in prec], marker="o",
                            label=f"{name}: kept on target", color=line.get_color())
                bottom.fill_between(epochs, [min(v) for v in prec], [max(v) for v in prec], alpha=0.15,
                                    color=line.get_color())
                rand = [statistics.fmean(s[i] for s in c["lmvsd_random"]) for i in range(len(epochs))]
                bottom.plot(epochs, rand, linestyle="--", color="grey", label="random (target area share)")
        top.set_title(f"{setting}: val mIoU per epoch (seed range shaded)")
        top.set_xlabel("epoch")
        top.set_ylabel("mIoU (%)")
        top.legend(fontsize=8)
        bottom.set_title(f"{setting}: LMVSD kept patches on the target")
        bottom.set_xlabel("epoch")
        bottom.set_ylabel("precision")
        for ax in (top, bottom):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.2, 1.4, ...
        handles, labels = bottom.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        bottom.legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
