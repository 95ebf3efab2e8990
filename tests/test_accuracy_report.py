"""The accuracy benchmark's statistics on hand-computed cases (benchmarks/accuracy_report.py)."""

from __future__ import annotations

import json
import math

import pytest

import masksd
from benchmarks.accuracy import GRID_VARIANTS, STUDIES, VARIANTS
from benchmarks.accuracy_report import (
    aggregate,
    differences,
    grid,
    grid_markdown,
    head_to_head,
    head_to_head_markdown,
    paired_difference,
    pairs_needed,
    power,
    probe_summary,
    t975,
)


def _metrics(miou: float) -> dict:
    split = {"miou": miou, "oiou": miou, "prec@0.5": 0.0, "prec@0.7": 0.0, "prec@0.9": 0.0}
    return {"splits": {s: split for s in ("val", "test", "compositional")}, "wall_time_s": 1.0}


def test_paired_difference_hand_computed() -> None:
    d = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])  # differences 1, 2, 3: mean 2, sd 1
    half = 4.303 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert d["mean"] == pytest.approx(2.0) and d["values"] == [1.0, 2.0, 3.0] and d["n"] == 3
    assert d["ci95_low"] == pytest.approx(2.0 - half) and d["ci95_high"] == pytest.approx(2.0 + half)


def test_one_pair_has_no_interval_and_mismatched_pairs_are_refused() -> None:
    d = paired_difference([1.5], [1.0])
    assert d["mean"] == 0.5 and math.isnan(d["ci95_low"]) and math.isnan(d["ci95_high"])
    with pytest.raises(ValueError, match="paired runs differ"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        t975(0)


def test_t_table_is_conservative_between_rows_and_normal_beyond() -> None:
    assert t975(2) == 4.303 and t975(11) == t975(10) and t975(100) == 1.960


def test_differences_pair_by_seed_over_the_seeds_both_ran() -> None:
    runs = {"baseline": {0: _metrics(10.0), 1: _metrics(20.0), 2: _metrics(30.0)},
            "masksd": {2: _metrics(33.0), 0: _metrics(11.0)}}  # seed 1 not run yet
    d = differences(runs)["masksd"]["test"]
    assert d["seeds"] == [0, 2] and d["values"] == [1.0, 3.0] and d["mean"] == pytest.approx(2.0)
    # seeds 0, 2 only
    assert d["control_mean"] == pytest.approx(20.0) and d["treated_mean"] == pytest.approx(22.0)
    table = aggregate(runs)
    assert table["masksd"]["val"]["miou"]["mean"] == pytest.approx(22.0)
    assert table["baseline"]["val"]["miou"]["std"] == pytest.approx(10.0)


def test_head_to_head_pairs_two_variants_without_the_baseline() -> None:
    runs = {"baseline": {0: _metrics(10.0)},
            "masksd": {0: _metrics(12.0), 1: _metrics(15.0), 2: _metrics(14.0)},
            "maskris": {0: _metrics(11.0), 1: _metrics(16.0)}}  # maskris seed 2 not run yet
    versus = head_to_head(runs, (("masksd", "maskris"), ("masksd", "random_selection")))
    assert list(versus) == ["masksd_minus_maskris"]  # no random_selection runs: left out
    d = versus["masksd_minus_maskris"]["test"]
    assert d["seeds"] == [0, 1] and d["values"] == [1.0, -1.0] and d["mean"] == pytest.approx(0.0)
    assert "| masksd − maskris | 2 (0,1) | +0.00 [" in head_to_head_markdown("pretrained CLIP", versus)
    assert head_to_head_markdown("pretrained CLIP", {}) == ""


def test_grid_reads_values_around_the_branch_alone_run_and_names_the_default() -> None:
    def run(miou: float, top_k: float) -> dict:
        return {**_metrics(miou), "config": {"distill": {"lmvsd": {"top_k": top_k}}}}

    runs = {"baseline": {0: _metrics(30.0)}, "lmvsd_only": {0: run(31.0, 0.5)},
            "lmvsd_only-top_k1": {0: run(29.0, 1.0)}, "lmvsd_only-top_k0.25": {0: run(32.5, 0.25)}}
    rows = grid(runs, {v: GRID_VARIANTS[v] for v in ("lmvsd_only-top_k1", "lmvsd_only-top_k0.25")})
    row = rows["lmvsd"]["top_k"]
    # sorted by value, the default read from config
    assert row["miou"] == {"0.25": 32.5, "0.5": 31.0, "1": 29.0}
    assert row["default"] == "0.5" and row["baseline"] == 30.0 and row["seed"] == 0
    assert "**0.5: 31.00**" in grid_markdown("pretrained", rows)


def test_grid_variants_set_one_hyper_parameter_on_one_branch() -> None:
    assert VARIANTS["lmvsd_only-top_k1"] == ["--no-vmlsd", "--lmvsd-top-k", "1.0"]
    assert VARIANTS["vmlsd_only-weight0.5"] == ["--no-lmvsd", "--vmlsd-weight", "0.5"]


def test_pairs_needed_matches_the_normal_approximation_and_keeps_the_minimum() -> None:
    # sd 1.5, effect 1: (1.96 + 0.84)² · 1.5² ≈ 17.7 by the normal; the t quantile adds ~2 pairs
    assert pairs_needed(1.5) == 20 and pairs_needed(0.1) == 8 and pairs_needed(0.1, minimum=3) == 3
    assert pairs_needed(2.0, effect=2.0) == pairs_needed(1.0, effect=1.0)  # only sd / effect matters
    n = pairs_needed(2.14)
    assert n >= ((t975(n - 1) + 0.8416) * 2.14) ** 2 > n - 1
    with pytest.raises(ValueError, match="sd"):
        pairs_needed(-1.0)


def test_power_reads_the_pilot_differences_and_says_when_it_cannot() -> None:
    got = power({"values": [1.0, -1.0, 2.0, 0.0]})
    assert got["pilot_pairs"] == 4 and math.isclose(got["sd"], 1.2909944, rel_tol=1e-6)
    assert got["pairs_needed"] == pairs_needed(got["sd"])
    assert power(None)["sd"] is None and power({"values": [0.3]})["pairs_needed"] == 8


def test_study_v3_runs_world_v2_with_its_dense_clip_and_quick_covers_that_path() -> None:
    v3, quick = STUDIES["v3"], STUDIES["quick"]
    assert (v3.preset, v3.pretrain_preset) == ("v2", "v2") == (quick.preset, quick.pretrain_preset)
    assert len(v3.seeds) >= 8 and v3.schedule[v3.schedule.index("--num-val") + 1] == "2000"
    assert {"baseline", "masksd", "random_selection", "lmvsd_only", "vmlsd_only"} <= set(v3.variants)
    assert (set(v3.variants) <= set(VARIANTS) and set(v3.secondary) <= set(v3.variants)
            and v3.secondary_pairs >= 4)


def test_v3_count_reuses_v3s_runs_and_masks_as_many_tokens_as_the_defaults_at_random() -> None:
    v3, follow_up = STUDIES["v3"], STUDIES["v3_count"]
    assert follow_up.runs_of == "v3"  # its baseline / masksd / random_selection runs are v3's own files
    for field in ("schedule", "epochs", "seeds", "clips", "lr_grid", "pretrained_backbone_grid", "preset",
                  "pretrain_preset", "pretrain_steps"):
        assert getattr(follow_up, field) == getattr(v3, field), field
    assert set(follow_up.variants) - set(v3.variants) == {"random_same_count"}
    flags = VARIANTS["random_same_count"]
    for branch, config in (("lmvsd", masksd.LMVSDConfig()), ("vmlsd", masksd.VMLSDConfig())):
        top_k, ratio = (float(flags[flags.index(f"--{branch}-{name}") + 1]) for name in ("top-k", "ratio"))
        assert top_k == 1.0 and math.isclose(top_k * ratio, config.top_k * config.ratio)


def test_probe_summary_reads_kept_on_referent_against_area_and_checks_the_clip_file() -> None:
    probe = {"preset": "v2", "samples": 4, "pretrained_sha256": "abc",
             "settings": {"random init": {}, "pretrained": {"correlation/dot": {
                 "precision": 0.25, "random": 0.125, "recall": 0.9, "kept_rate/target_noun": 0.5,
                 "kept_rate/function": 0.75}}}}
    summary = probe_summary(probe, "abc")
    assert summary["same_clip_as_study"] and summary["samples"] == 4
    assert summary["scorers"]["correlation/dot"] == {"kept_on_referent": 0.25, "area_fraction": 0.125,
                                                    "ratio": 2.0, "kept_target_noun": 0.5,
                                                    "kept_function_word": 0.75}
    assert not probe_summary(probe, "another file")["same_clip_as_study"]
    assert STUDIES["v3"].probe and STUDIES["v3"].probe.endswith(".json")


def test_runs_from_different_machines_or_clip_files_are_never_paired() -> None:
    def run(miou: float, cpu: str, sha: str = "a") -> dict:
        splits = {split: {"miou": miou} for split in ("val", "test", "compositional")}
        return {"splits": splits, "machine": {"cpu": cpu}, "pretrained_sha256": sha}

    runs = {"baseline": {0: run(30.0, "Xeon"), 1: run(31.0, "Xeon"), 2: run(30.0, "EPYC"),
                         3: run(30.0, "Xeon")},
            "masksd": {0: run(31.0, "Xeon"), 1: run(33.0, "Xeon"), 2: run(40.0, "Xeon"),
                       3: run(40.0, "Xeon", "b")}}
    got = differences(runs)["masksd"]["test"]
    assert got["seeds"] == [0, 1] and got["values"] == [1.0, 2.0]


def test_finite_turns_nan_into_null_for_strict_json() -> None:
    import json

    from benchmarks.accuracy_report import finite

    data = finite({"one_pair": paired_difference([1.0], [0.0]), "x": (math.inf, 2.0)})
    assert data["one_pair"]["ci95_low"] is None and data["x"] == [None, 2.0]
    json.dumps(data, allow_nan=False)


def test_fresh_draw_pairs_each_variant_with_the_baseline_by_seed_and_keeps_the_studys_draw_beside(
    tmp_path,
) -> None:
    from benchmarks import fresh_draw

    seeds = [0, 1, 2]
    miou = {"baseline": [50.0, 52.0, 51.0], "masksd": [51.0, 52.5, 53.0],
            "random_selection": [50.0, 53.0, 50.0]}
    eval_dir = tmp_path / "evals"
    for variant, values in miou.items():
        for seed, value in zip(seeds, values, strict=True):
            # cached: nothing is evaluated
            out = eval_dir / "pretrained" / f"{variant}-lr0.008-seed{seed}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            split = {"miou": value, "count": 2000.0}
            out.write_text(json.dumps({"splits": {"test": split,
                                                  "compositional": {**split, "miou": value / 2}}}))
    study_difference = {"mean": 9.0, "ci95_low": 8.0, "ci95_high": 10.0}
    study_json = {"study": "v3", "partial": False, "minus_baseline_setting": "pretrained",
                  "lr_tuning": {"pretrained": {"chosen": "lr0.008"}},
                  "seeds_run": {"pretrained": {v: seeds for v in miou}},
                  "differences": {"pretrained": {"masksd": {"test": study_difference}}},
                  "head_to_head": {"pretrained": {"masksd_minus_random_selection":
                                                      {"test": study_difference}}}}
    (tmp_path / "study.json").write_text(json.dumps(study_json))

    result = fresh_draw.main(["--study-json", str(tmp_path / "study.json"), "--eval-dir", str(eval_dir),
                              "--work-dir", str(tmp_path), "--out", str(tmp_path / "fresh")])

    assert set(result["differences"]) == {"masksd_minus_baseline", "random_selection_minus_baseline",
                                          "masksd_minus_random_selection"}
    test = result["differences"]["masksd_minus_baseline"]["test"]
    assert test["fresh_draw"]["values"] == [1.0, 0.5, 2.0] and test["study_draw"] == study_difference
    head = result["differences"]["masksd_minus_random_selection"]["compositional"]
    assert head["fresh_draw"]["values"] == [0.5, -0.25, 1.5] and head["study_draw"] is None
    assert result["split_sizes"] == {"test": 2000, "compositional": 2000}
    assert (tmp_path / "fresh.md").read_text().count("\n| ") == 4  # header and three comparisons


def test_by_expression_partitions_the_split_and_pairs_each_group_by_seed(tmp_path) -> None:
    from benchmarks import by_expression as breakdown

    by_group = breakdown.groups("compositional", 24, seed=0)
    parts = [i for name, indices in by_group.items() if name != "all" for i in indices]
    assert sorted(parts) == by_group["all"] == list(range(24))  # every sample in exactly one group
    assert {name.split(",")[0] for name in by_group} <= {"all", "attribute", "location", "relation"}

    cache = tmp_path / "evals" / "pretrained" / "compositional"  # cached results: nothing is evaluated
    cache.mkdir(parents=True)
    for variant, offset in (("baseline", 0.0), ("masksd", 1.0)):
        for seed in (0, 1):
            cache.joinpath(f"{variant}-lr0.008-seed{seed}.json").write_text(
                json.dumps({g: 10.0 + offset * (seed + 1) + k for k, g in enumerate(by_group)}))
    study_json = {"study": "v3", "minus_baseline_setting": "pretrained", "split_sizes": {"compositional": 24},
                  "lr_tuning": {"pretrained": {"chosen": "lr0.008"}},
                  "seeds_run": {"pretrained": {"baseline": [0, 1], "masksd": [0, 1]}}}
    (tmp_path / "study.json").write_text(json.dumps(study_json))

    result = breakdown.main(["--study-json", str(tmp_path / "study.json"), "--pairs", "masksd:baseline",
                             "--eval-dir", str(tmp_path / "evals"), "--out", str(tmp_path / "out")])

    assert result["group_sizes"] == {g: len(i) for g, i in by_group.items()}
    for group in by_group:
        assert result["differences"]["masksd_minus_baseline"][group]["values"] == [1.0, 2.0]
    with pytest.raises(SystemExit):
        breakdown.main(["--study-json", str(tmp_path / "study.json"), "--pairs", "maskris:baseline",
                        "--eval-dir", str(tmp_path / "evals"), "--out", str(tmp_path / "out")])
