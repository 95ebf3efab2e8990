"""Eval forward of the wrapped model over the bare model, timed alone (the step_cost cpu model).

    python -m benchmarks.eval_cost [--rounds 40] [--json out.json]

Eval of a ``MaskedSelfDistill`` is the bare model's forward: this times both, interleaved with a
rotating start (no grad, batch 8), and prints the medians and their ratio. ``step_cost``'s
``eval_ratio`` comes from one shared run of every variant; this one isolates the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.step_cost import CPU_PRESET
from examples.cris_clip.model import build_model
from masksd import MaskedSelfDistill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    bare = build_model(CPU_PRESET).eval()
    wrapper = MaskedSelfDistill(bare.image_tower, bare.text_tower, bare.decoder).eval()
    images = torch.randn(8, 3, CPU_PRESET.image_size, CPU_PRESET.image_size)
    texts = torch.randint(1, 400, (8, 17))
    times: dict[str, list[float]] = {"bare": [], "wrapped": []}
    with torch.no_grad():
        for r in range(args.rounds + 4):  # 4 warm-up rounds
            for name in ("bare", "wrapped") if r % 2 else ("wrapped", "bare"):
                start = time.perf_counter()
                (bare if name == "bare" else wrapper)(images, texts)
                if r >= 4:
                    times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) * 1000 for name, values in times.items()}
    result = {"median_ms": med, "eval_ratio": med["wrapped"] / med["bare"], "rounds": args.rounds,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
