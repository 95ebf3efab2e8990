"""``benchmarks.step_cost_ris``: the RIS-style models' hook-backend cost and floor (smoke run:
one round on tiny batches; the numbers themselves are not checked, their bookkeeping is)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")


def test_ris_model_ratios_and_floors_from_the_branch_calls():
    from benchmarks import _common as cm
    from benchmarks.step_cost_ris import RIS_MODELS, measure_ris_models, ris_table

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = measure_ris_models(2, 64, torch.device("cpu"), cm.Timer(torch.device("cpu")), rounds=1,
                                    warmup=0, deadline=0.0)
    finally:
        torch.set_num_threads(threads)
    cris, lavt = (result["ris_models"][name] for name in RIS_MODELS)
    # late fusion: each branch re-runs its own encoder and the decoder; text -> image: the
    # masked-text branch is a full forward (image part twice)
    assert cris["fusion"] == "late" and cris["floor_counts"] == {"image": 1, "text": 1, "decoder": 2}
    assert lavt["fusion"] == "text->image" and lavt["floor_counts"] == {"image": 2, "text": 1, "decoder": 2}
    for name, r in result["ris_models"].items():
        med = r["medians_s"]
        floor = med["bare"] + sum(n * med[part] for part, n in r["floor_counts"].items())
        assert result[f"ratio_floor_{name}"] == pytest.approx(floor / med["bare"])
        assert result[f"ratio_hooks_{name}"] == pytest.approx(med["hooks"] / med["bare"])
        assert r["rounds"] == 1 and result[f"ratio_floor_{name}"] > 1
    assert "| cris_style | late | 64 |" in ris_table(result)
