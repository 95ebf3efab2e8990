"""The scorer probe (benchmarks/selection_probe.py) on a few samples of the random-init demo model."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("open_clip")


def test_probe_reports_every_scorer_with_rates(tmp_path) -> None:
    from benchmarks.selection_probe import SETTINGS, main

    report = main(["--samples", "16", "--batch-size", "8", "--json", str(tmp_path / "probe.json")])
    results = json.loads((tmp_path / "probe.json").read_text())["settings"]["random init"]
    assert results == report["settings"]["random init"]
    assert set(results) == {f"{scorer}/{metric}" for scorer, metric in SETTINGS}
    for r in results.values():
        assert 0 <= r["precision"] <= 1 and 0 < r["random"] < 1 and 0 <= r["recall"] <= 1
        rates = [v for k, v in r.items() if k.startswith("kept_rate/") and not math.isnan(v)]
        assert len(rates) >= 3 and all(0 <= v <= 1 for v in rates)
    # the target's share of the patches does not depend on the scorer; top-K 0.5 keeps half of them
    assert len({r["random"] for r in results.values()}) == 1
    assert 0.2 < results["random/dot"]["recall"] < 0.8
