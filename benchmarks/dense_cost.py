"""Cost of the dense-alignment scorers (``masksd.adapters.clip_dense``) against a training step.

    python -m benchmarks.dense_cost [--config cpu|gpu] [--quick] [--repeats N] [--json out.json]

Run from the repository root. It uses ``benchmarks.step_cost``'s model, batch and ``both`` step
(LMVSD + VMLSD, paper defaults, plain patch tokens). Tasks, interleaved round-robin:

    both                 the step of ``step_cost`` (forward + backward + Adam)
    both_<mode>          the same step with a tower built with ``dense=<mode>``, sharing the weights
    <mode>_x10           the dense features alone, 10 calls, on the main branch's last-block input
                         (``joint_dense_tokens``, no_grad), as the scorer computes them once a step
    surgery_x10          feature surgery's scores alone (``surgery_scores``), 10 calls

``share_<mode>`` = median(``<mode>_x10``) / 10 / median(``both``): the isolated cost, which is
precise. ``insitu_<mode>`` = the median over rounds of ``(both_<mode> - both) / both``: the
difference of two step times, which is noisy. The goal is ``share <= 0.01``. The features run once
per step, in the main branch only, under no_grad, and never at inference (``Encoded.scoring`` is
lazy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks import _common as cm
from benchmarks.step_cost import CONFIGS, QUICK, Bench
from masksd import MaskedSelfDistill
from masksd.adapters.clip_dense import DENSE_MODES, joint_dense_tokens
from masksd.adapters.open_clip import OpenCLIPImageTower
from masksd.scorers import surgery_scores


class DenseBench:
    """``step_cost.Bench`` plus one wrapper per dense mode and the main branch's last-block input."""

    def __init__(self, bench: Bench) -> None:
        self.bench, m = bench, bench.model
        visual = m.image_tower.visual
        self.towers = {mode: OpenCLIPImageTower(visual, feature_layers=m.image_tower.feature_layers,
                                                dense=mode)
                       for mode in DENSE_MODES}
        self.wrapped = {mode: MaskedSelfDistill(tower, m.text_tower, m.decoder).to(bench.x.device)
                        for mode, tower in self.towers.items()}
        seen: list[torch.Tensor] = []
        hook = visual.transformer.resblocks[-1].register_forward_pre_hook(
            lambda _m, args: seen.append(args[0]))
        with torch.no_grad(), bench.amp():
            m.image_tower.encode(bench.main.image_embedded)
        hook.remove()
        self.block_input = seen[0]  # [B, 1 + N, W]
        self.guide, self.tokens = bench.main.text_encoded.global_feature, bench.main.image_encoded.tokens

    def dense_step(self, mode: str) -> None:
        b = self.bench
        with b.amp():
            out = self.wrapped[mode](b.x, b.t, b.y, generator=b.generator)
        out.loss.backward()
        b.opt.step()
        b.opt.zero_grad(set_to_none=True)
        self.wrapped[mode].zero_grad(set_to_none=True)  # its mask tokens are not in bench.opt

    def dense_x10(self, mode: str) -> None:
        with torch.no_grad(), self.bench.amp():
            for _ in range(10):
                joint_dense_tokens(self.bench.model.image_tower.visual, self.block_input, mode=mode)

    def surgery_x10(self) -> None:
        for _ in range(10):
            surgery_scores(self.guide, self.tokens)

    def tasks(self) -> dict:
        tasks = {"both": lambda: self.bench.wrapped_step("both"), "surgery_x10": self.surgery_x10}
        for mode in DENSE_MODES:
            tasks[f"both_{mode}"] = lambda mode=mode: self.dense_step(mode)
            tasks[f"{mode}_x10"] = lambda mode=mode: self.dense_x10(mode)
        return tasks


def run(args: argparse.Namespace) -> dict:
    cfg = dict(CONFIGS[args.config], **(QUICK if args.quick else {}))
    if args.repeats:
        cfg["repeats"] = args.repeats
    device = torch.device("cuda" if args.config == "gpu" and torch.cuda.is_available() else "cpu")
    amp = cfg["amp"] and device.type == "cuda"
    timer, started, load0 = cm.Timer(device), time.perf_counter(), cm.loadavg()
    dense = DenseBench(Bench(cfg["preset"], cfg["batch"], device, amp))
    dense.bench.set_mode("train")
    times, _ = cm.interleaved(dense.tasks(), cfg["repeats"], cfg["warmup"], timer, after=dense.bench.clear)
    med = {k: cm.summarize(v)["median"] for k, v in times.items()}
    result = {
        "config": args.config, "quick": args.quick, "device": cm.device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": cfg["batch"],
        "amp_bf16": amp, "rounds": len(times["both"]),
        "image_tokens": int(dense.block_input.shape[1]) - 1, "width": int(dense.block_input.shape[2]),
        "layers": len(dense.bench.model.image_tower.visual.transformer.resblocks), "loadavg_start": load0,
        "medians_s": med, "share_surgery": med["surgery_x10"] / 10 / med["both"],
    }
    for mode in DENSE_MODES:
        result[f"share_{mode}"] = med[f"{mode}_x10"] / 10 / med["both"]
        result[f"insitu_{mode}"] = statistics.median(
            (d - b) / b for d, b in zip(times[f"both_{mode}"], times["both"]))
    result["goals"] = {f"share_{m} <= 0.01": result[f"share_{m}"] <= 0.01 for m in (*DENSE_MODES, "surgery")}
    result["wall_s"], result["loadavg_end"] = time.perf_counter() - started, cm.loadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="5 rounds after 1 warm-up (about a minute on a CPU)")
    parser.add_argument("--repeats", type=int, default=0, help="measured rounds (default: per config)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "medians_s"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
