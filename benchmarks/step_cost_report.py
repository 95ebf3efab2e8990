"""Ratios and tables of ``benchmarks.step_cost``'s result: ``ratio_*`` from the medians, their
paired spread, the console table and the markdown report."""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks import _common as cm

__all__ = ["markdown", "paired_spread", "ratios", "table"]


def ratios(stats: dict, keys: Sequence[str]) -> dict:
    """``ratio_<k> = median_k / median_baseline`` for each timed ``k`` in ``keys``, the floor's
    ratios (baseline + the parts timed alone) and ``ratio_hooks_vs_towers = hooks / both``."""
    med = {k: v["median"] for k, v in stats.items()}
    base, img, txt, dec = med["baseline"], med["floor_image"], med["floor_text"], med["floor_decoder"]
    out = {f"ratio_{k}": med[k] / base for k in keys if k in med}
    out["ratio_floor"] = (base + img + txt + 2 * dec) / base
    if "hooks" in med and "both" in med:
        out["ratio_hooks_vs_towers"] = med["hooks"] / med["both"]
    out["ratio_floor_visual"] = (base + img + dec) / base
    out["ratio_floor_textual"] = (base + txt + dec) / base
    return out


def paired_spread(times: dict, keys: Sequence[str]) -> dict:
    """Per-round ratios X_r / baseline_r (rounds are interleaved, so pairs share conditions)."""
    out = {}
    for k in keys:
        if k in times:
            r = cm.summarize([a / b for a, b in zip(times[k], times["baseline"])])
            out[k] = {key: r[key] for key in ("median", "q1", "q3", "min", "max")}
    return out


def goals(r: dict) -> dict[str, bool]:
    """The cost goals of a step_cost result, each met or not."""
    return {
        "ratio_both <= 1.05 * ratio_floor": r["ratio_both"] <= 1.05 * r["ratio_floor"],
        "ratio_both < ratio_naive": r["ratio_both"] < r["ratio_naive"],
        "ratio_hooks_vs_towers <= 1.05": r["ratio_hooks_vs_towers"] <= 1.05,
        "ratio_maskris <= 1.05 * ratio_floor_maskris": r["ratio_maskris"] <= 1.05 * r["ratio_floor_maskris"],
        "eval_ratio <= 1.05": r["eval_ratio"] <= 1.05,
        "masking_share <= 0.01": r["masking_share"] <= 0.01,
    }


def table(r: dict) -> str:
    peaks = r["peak_mem_mib"] or {}
    lines = [f"Step cost, config `{r['config']}`, {r['device']}, torch {r['torch']}, batch {r['batch']}, "
             f"{r['image_tokens']} image tokens, {r['repeats']} interleaved rounds",
             "", "| variant | median ms | IQR ms | min-max ms | / baseline | peak MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    base = r["medians_s"]["baseline"]
    for k, med in r["medians_s"].items():
        s = r["spread_s"][k]
        peak = f"{peaks[k]:.0f}" if peaks.get(k) is not None else "-"
        lines.append(f"| {k} | {1e3 * med:.1f} | {1e3 * s['q1']:.1f}-{1e3 * s['q3']:.1f} | "
                     f"{1e3 * s['min']:.1f}-{1e3 * s['max']:.1f} | {med / base:.3f} | {peak} |")
    lines += ["", "| quantity | value |", "|---|---:|"]
    for k in ("ratio_both", "ratio_floor", "ratio_visual", "ratio_floor_visual", "ratio_textual",
              "ratio_floor_textual", "ratio_naive", "ratio_off", "ratio_both_unmasked",
              "ratio_hooks_vs_towers", "ratio_mask_grounding", "ratio_cal", "ratio_cal_fused",
              "ratio_lang_rec", "ratio_maskris", "ratio_floor_maskris", "activation_ratio_both",
              "activation_ratio_hooks", "activation_ratio_naive", "activation_ratio_floor", "eval_ratio",
              "masking_share", "masking_share_insitu"):
        lines.append(f"| {k} | {r[k]:.4f} |")
    shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["part_share"].items())
    lines += ["", f"Share of the parts (fwd+bwd, timed alone): {shares}"]
    return "\n".join(lines)


def markdown(r: dict) -> str:
    text = table(r)
    text += "\n\n| image tokens | image px | ratio_both | ratio_floor | ratio_naive | baseline ms |\n"
    text += "|---:|---:|---:|---:|---:|---:|\n"
    for row in r["sweep"]:
        text += (f"| {row['tokens']} | {row['image_size']} | {row['ratio_both']:.3f} | "
                 f"{row['ratio_floor']:.3f} | {row['ratio_naive']:.3f} | "
                 f"{1e3 * row['medians_s']['baseline']:.0f} |\n")
    text += "\n" + "\n".join(f"- {k}: {'yes' if ok else 'NO'}" for k, ok in r["goals"].items())
    return text + (f"\n\nWall time {r['wall_s']:.0f} s; load average (1/5/15 min) at start "
                   f"{r['loadavg_start']}, at end {r['loadavg_end']} (other processes share the machine).\n")
