"""The scorer probe (benchmarks/selection_probe.py) on a few samples of the random-init demo model."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("open_clip")


@pytest.mark.parametrize("preset", ["demo", "v2"])
def test_probe_reports_every_scorer_with_rates(tmp_path, preset) -> None:
    from benchmarks.selection_probe import SETTINGS, main

    report = main(["--samples", "16", "--batch-size", "8", "--preset", preset,
                   "--json", str(tmp_path / "probe.json")])
    saved = json.loads((tmp_path / "probe.json").read_text())
    results = saved["settings"]["random init"]
    assert results == report["settings"]["random init"] and saved["preset"] == preset
    assert set(results) == set(SETTINGS)
    assert {"value/dot", "clearclip/dot", "surgery/dot", "value+surgery/dot"} <= set(results)
    for r in results.values():
        assert 0 <= r["precision"] <= 1 and 0 < r["random"] < 1 and 0 <= r["recall"] <= 1
        rates = [v for k, v in r.items() if k.startswith("kept_rate/") and not math.isnan(v)]
        assert len(rates) >= 3 and all(0 <= v <= 1 for v in rates)
    # the target's share of the patches does not depend on the scorer; top-K 0.5 keeps half of them
    assert len({r["random"] for r in results.values()}) == 1
    assert 0.2 < results["random/dot"]["recall"] < 0.8
    # dense features and surgery change which patches are kept (the plain features' choice differs)
    for name in ("value/dot", "clearclip/dot", "surgery/dot"):
        assert results[name] != results["correlation/dot"]
    # words are scored against the image's global feature, which dense patch features leave alone
    for key, rate in results["correlation/dot"].items():
        if key.startswith("kept_rate/"):
            assert (rate == results["value/dot"][key]
                    or math.isnan(rate) and math.isnan(results["value/dot"][key]))


def test_probe_plot_divides_kept_on_target_by_the_area_per_clip(tmp_path) -> None:
    import json

    from benchmarks import probe_plot

    report = {"preset": "v2",
              "settings": {"pretrained": {"correlation/dot": {"precision": 0.25, "random": 0.125},
                                          "random/dot": {"precision": 0.1, "random": 0.1}}}}
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(report))
    groups = probe_plot.main([str(path), "--out", str(tmp_path / "probe.png")])
    assert groups == {"CLIP v2, world v2 (pretrained)": {"correlation/dot": 2.0, "random/dot": 1.0}}
    assert (tmp_path / "probe.png").stat().st_size > 0
