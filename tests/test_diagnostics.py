"""Selection diagnostics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from masksd.diagnostics import SelectionStats, kept_by_role, selection_precision, target_on_units


def test_target_on_units_is_the_covered_share():
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :2, :2] = True  # unit (0, 0) fully covered
    target[0, 2, 2] = True  # a quarter of unit (1, 1)
    assert target_on_units(target, (2, 2)).tolist() == [[1.0, 0.0, 0.0, 0.25]]


def test_selection_precision_hand_computed():
    target = torch.zeros(2, 4, 4, dtype=torch.bool)
    target[0, :2, :2] = True
    target[1, 2:, :] = True  # units 2 and 3 of sample 1
    kept = torch.tensor([[True, True, False, False], [False, False, True, False]])
    sums = selection_precision(kept, target, (2, 2))
    assert sums["kept"].item() == 3 and sums["on_target"].item() == 2.0
    assert sums["units"].item() == 8 and sums["target_units"].item() == 3.0
    stats = SelectionStats()
    stats.add_image(kept, target, (2, 2))
    stats.add_image(kept, target, (2, 2))
    summary = stats.summary()
    assert summary["precision"] == pytest.approx(2 / 3)
    assert summary["random"] == pytest.approx(3 / 8)
    assert summary["recall"] == pytest.approx(2 / 3)


def test_random_selection_precision_matches_area():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(400, 8, 8, generator=g) > 0.7
    kept = torch.rand(400, 64, generator=g) > 0.5
    stats = SelectionStats()
    stats.add_image(kept, target, (8, 8))
    summary = stats.summary()
    assert abs(summary["precision"] - summary["random"]) < 0.01


def test_kept_by_role():
    kept = torch.tensor([[True, False, True, False], [False, True, True, False]])
    roles = torch.tensor([[0, 1, 2, -1], [0, 0, 1, -1]])
    counts = kept_by_role(kept, roles, 3)
    assert counts["present"].tolist() == [3.0, 2.0, 1.0]
    assert counts["kept"].tolist() == [2.0, 1.0, 1.0]
    stats = SelectionStats(role_names=("noun", "attribute", "relation"))
    stats.add_words(kept, roles)
    summary = stats.summary()
    assert summary["kept_rate/noun"] == pytest.approx(2 / 3)
    assert summary["kept_rate/relation"] == 1.0
    assert math.isnan(SelectionStats(role_names=("x",)).summary().get("kept_rate/x", float("nan")))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="kept"):
        selection_precision(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="roles"):
        kept_by_role(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.long), 2)
