"""What ``torch.compile`` buys on the hook path: the CRIS-style model's training step, bare and wrapped.

Four tasks, timed interleaved (``benchmarks._common.interleaved``) after each compiled task has
compiled (the first ``--compile-steps`` steps, timed apart as the compile cost):

    eager_bare      the unchanged model's training step (its own loss), as in ``step_cost_ris``
    eager_hooks     ``masksd.wrap(copy, spec)``, both branches
    compiled_bare   a second copy after ``model.compile(backend=...)`` (in place: module paths stay)
    compiled_hooks  a wrapped copy whose model was compiled in place (``wrapper.unwrap().compile()``),
                    the way docs/wrapping.md recommends; masksd's hooks run inside the compiled model

Reported: medians per task, ``speedup_bare`` / ``speedup_hooks`` (eager ÷ compiled) and the
hooks ÷ bare ratio in each mode, the compile time of the first steps, and the loss of one step
of each pair (compiled vs eager, same weights and generator seed). Dynamo's hook guards are on
(``skip_nnmodule_hook_guards = False``), since the bare and the hooked copies share their class.
Ratios are read within one run; the machine's load is recorded at start and end (a background job
makes them worthless).

Usage::

    python -m benchmarks.compile_cost --out-dir docs/benchmarks               # inductor, CPU
    python -m benchmarks.compile_cost --backend aot_eager --rounds 2 --quick  # smoke run
    python -m benchmarks.compile_cost --graph-breaks --quick  # dynamo's graph count and breaks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as cm
from benchmarks.step_cost_ris import RIS_IMAGE_SIZE, RisBench

TASKS = ("eager_bare", "eager_hooks", "compiled_bare", "compiled_hooks")


def _benches(batch: int, image_size: int, device: torch.device, backend: str) -> dict[str, Any]:
    """An eager and a compiled ``RisBench`` (same seed, hence the same weights and batch)."""
    eager = RisBench("cris_style", batch, image_size, device)
    compiled = RisBench("cris_style", batch, image_size, device)
    compiled.model.compile(backend=backend)
    compiled.hooked.unwrap().compile(backend=backend)
    return {"eager_bare": (eager, eager.bare), "eager_hooks": (eager, eager.hooks),
            "compiled_bare": (compiled, compiled.bare), "compiled_hooks": (compiled, compiled.hooks)}


def _first_losses(batch: int, image_size: int, device: torch.device, backend: str) -> dict[str, float]:
    """One wrapped step's loss, eager and compiled, from fresh identical copies (no optimizer step)."""
    losses = {}
    for mode in ("eager", "compiled"):
        bench = RisBench("cris_style", batch, image_size, device)
        if mode == "compiled":
            bench.hooked.unwrap().compile(backend=backend)
        losses[mode] = float(bench.hooked(*bench.args, **bench.kwargs, generator=bench.generator).loss)
    return losses


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu")
    image_size = args.image_size or RIS_IMAGE_SIZE[device.type]
    timer, started, load0 = cm.Timer(device), time.perf_counter(), cm.loadavg()
    # the bare and the hooked copies are instances of one class: without hook guards dynamo would
    # run the first one's compiled code for both (docs/troubleshooting.md, torch.compile)
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    torch._dynamo.reset()
    losses = _first_losses(args.batch, image_size, device, args.backend)
    torch._dynamo.reset()
    benches = _benches(args.batch, image_size, device, args.backend)
    compile_s = {}
    for name in ("compiled_bare", "compiled_hooks"):
        steps = [timer(benches[name][1])[0] for _ in range(args.compile_steps)]
        compile_s[name] = {"first_steps_s": steps, "total_s": sum(steps)}
    tasks = {name: fn for name, (_, fn) in benches.items()}
    times, _ = cm.interleaved(tasks, args.rounds, args.warmup, timer)
    med = {name: cm.summarize(v)["median"] for name, v in times.items()}
    result = {
        "device": cm.device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "backend": args.backend, "model": "cris_style (tests/ris_models)", "batch": args.batch,
        "image_size": image_size, "rounds": len(times["eager_bare"]), "loadavg_start": load0,
        "medians_s": med, "spread_s": {name: cm.summarize(v) for name, v in times.items()},
        "speedup_bare": med["eager_bare"] / med["compiled_bare"],
        "speedup_hooks": med["eager_hooks"] / med["compiled_hooks"],
        "ratio_hooks_eager": med["eager_hooks"] / med["eager_bare"],
        "ratio_hooks_compiled": med["compiled_hooks"] / med["compiled_bare"],
        "compile": compile_s, "first_step_loss": losses, "fallback_random": args.fallback_random,
        "command": "python -m benchmarks.compile_cost " + " ".join(args.argv),
    }
    result["wall_s"], result["loadavg_end"] = time.perf_counter() - started, cm.loadavg()
    return result


def graph_breaks(args: argparse.Namespace) -> dict[str, Any]:
    """Dynamo's view of the wrapped model compiled in place (``backend="eager"``: tracing only):
    the graphs it compiled and the graph breaks it took over ``--compile-steps`` wrapped steps."""
    from torch._dynamo.utils import counters

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    torch._dynamo.reset()
    counters.clear()
    bench = RisBench("cris_style", args.batch, args.image_size or 64, torch.device("cpu"))
    bench.hooked.unwrap().compile(backend="eager")
    graphs = []
    for _ in range(args.compile_steps):
        bench.hooks()
        graphs.append(int(counters["stats"]["unique_graphs"]))
    return {"graphs_after_each_step": graphs,
            "graph_breaks": {str(reason): int(n) for reason, n in counters["graph_break"].items()},
            "command": "python -m benchmarks.compile_cost " + " ".join(args.argv)}


def table(result: dict[str, Any]) -> str:
    med = result["medians_s"]
    lines = [f"{result['device']}, torch {result['torch']}, backend {result['backend']}, "
             f"{result['model']} at {result['image_size']} px, batch {result['batch']}, "
             f"{result['rounds']} rounds",
             "", "| | bare ms | hooks ms | hooks / bare | first steps (compile) s |",
             "|---|---:|---:|---:|---:|"]
    for mode in ("eager", "compiled"):
        first = "" if mode == "eager" else (f"{result['compile']['compiled_bare']['total_s']:.0f} / "
                                           f"{result['compile']['compiled_hooks']['total_s']:.0f}")
        lines.append(f"| {mode} | {1e3 * med[f'{mode}_bare']:.1f} | {1e3 * med[f'{mode}_hooks']:.1f} | "
                     f"{result[f'ratio_hooks_{mode}']:.3f} | {first} |")
    lines.append(f"\nspeed-up from compile: bare {result['speedup_bare']:.2f}×, "
                 f"wrapped {result['speedup_hooks']:.2f}×")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spread = result["spread_s"]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for i, name in enumerate(TASKS):
        s = spread[name]
        ax.bar(i, 1e3 * s["median"], color="tab:blue" if "eager" in name else "tab:orange")
        ax.errorbar(i, 1e3 * s["median"],
                    yerr=[[1e3 * (s["median"] - s["q1"])], [1e3 * (s["q3"] - s["median"])]],
                    color="black", capsize=3)
    ax.set_xticks(range(len(TASKS)), [t.replace("_", "\n") for t in TASKS])
    ax.set_ylabel("ms per training step (median, IQR)")
    ax.set_title(f"torch.compile ({result['backend']}) on the hook path, {result['device'][:40]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=0, help="default: step_cost_ris's size per device")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile-steps", type=int, default=3, help="steps timed apart as the compile cost")
    parser.add_argument("--quick", action="store_true", help="64 px, batch 2")
    parser.add_argument("--fallback-random", action="store_true",
                        help="inductor draws dropout's random numbers as eager does (compiled loss = eager "
                             "loss)")
    parser.add_argument("--graph-breaks", action="store_true",
                        help="time nothing: print the graphs and graph breaks of the wrapped model compiled "
                             "in place")
    parser.add_argument("--out-dir", default=None, help="writes compile_cost.{json,md,png}")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.image_size, args.batch = args.image_size or 64, 2
    if args.fallback_random:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    if args.graph_breaks:
        print(json.dumps(graph_breaks(args), indent=1))
        return
    result = run(args)
    text = table(result)
    print(text)
    print(json.dumps({k: result[k] for k in ("speedup_bare", "speedup_hooks", "first_step_loss", "wall_s")},
                     indent=1))
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compile_cost.json").write_text(json.dumps(result, indent=2))
        (out / "compile_cost.md").write_text(text + "\n")
        plot(result, out / "compile_cost.png")


if __name__ == "__main__":
    main()
