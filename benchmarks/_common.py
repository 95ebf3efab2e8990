"""Helpers shared by the benchmarks: device naming, seeding, synthetic batches, timing, stats."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SOT, EOT, PAD = 49406, 49407, 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str:
    """A human-readable name of the device the benchmark ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"CPU: {name} ({torch.get_num_threads()} torch threads)"


def synthetic_batch(batch: int, image_size: int, context: int, device: torch.device, seed: int = 0):
    """Random images ``[B,3,S,S]``, CLIP-style token ids ``[B,L]`` (SOT, words, EOT, padding)
    with 3..L-2 words per sample, and a binary target mask ``[B,S,S]`` (one rectangle)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    ids = torch.full((batch, context), PAD, dtype=torch.long)
    ids[:, 0] = SOT
    lengths = torch.randint(3, context - 1, (batch,), generator=g)
    for b, n in enumerate(lengths.tolist()):
        ids[b, 1 : 1 + n] = torch.randint(1, SOT, (n,), generator=g)
        ids[b, 1 + n] = EOT
    # one object per sample, as a referring mask: a random rectangle of 10-40 % of the side, so
    # that the objectives that need background and foreground (CAL) have both
    target = torch.zeros(batch, image_size, image_size)
    for b in range(batch):
        h, w = (torch.randint(image_size // 10, 2 * image_size // 5 + 1, (2,), generator=g)).tolist()
        top, left = torch.randint(0, image_size - h + 1, (1,), generator=g).item(), \
            torch.randint(0, image_size - w + 1, (1,), generator=g).item()
        target[b, top:top + h, left:left + w] = 1.0
    return images.to(device), ids.to(device), target.to(device)


def leaf(value):
    """Detached copy of every tensor in a (nested) structure; floating ones require grad."""
    if isinstance(value, Tensor):
        return value.detach().requires_grad_(value.is_floating_point())
    if isinstance(value, (list, tuple)):
        return type(value)(leaf(v) for v in value)
    if isinstance(value, dict):
        return {k: leaf(v) for k, v in value.items()}
    return value


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, quartiles, min/max (seconds) of timing samples."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {"median": statistics.median(s), "q1": q[0], "q3": q[2], "min": s[0], "max": s[-1], "n": len(s)}


class Timer:
    """Times one call (with CUDA syncs around it) and its peak extra CUDA memory."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float | None]:
        peak = None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        self.sync()
        elapsed = time.perf_counter() - start
        if self.cuda:
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return elapsed, peak


def interleaved(tasks: dict[str, Callable[[], object]], rounds: int, warmup: int, timer: Timer,
                before: Callable[[str], None] | None = None,
                after: Callable[[str], None] | None = None,
                deadline: float | None = None, min_rounds: int = 3):
    """Run every task once per round, round-robin with a rotating start so that no task is
    always first; the first ``warmup`` rounds are discarded. Past ``deadline`` (a
    ``time.perf_counter()`` value) no new round starts once ``min_rounds`` are measured.
    Returns ``(times, peaks)``: per task the list of seconds and the largest peak extra
    memory in MiB (None on CPU)."""
    names = list(tasks)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, float | None] = {n: None for n in names}
    for r in range(warmup + rounds):
        if deadline is not None and r >= warmup + min_rounds and time.perf_counter() > deadline:
            break
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if before is not None:
                before(name)
            elapsed, peak = timer(tasks[name])
            if after is not None:
                after(name)
            if r >= warmup:
                times[name].append(elapsed)
                if peak is not None:
                    peaks[name] = max(peak, peaks[name] or 0.0)
    return times, peaks


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (a shared machine's contention), None where unavailable."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def plot_sweep(rows: list[dict], keys: tuple[str, ...], path: str, title: str) -> None:
    """PNG of ``ratio_<key>`` against ``tokens`` for every key (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [row["tokens"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in zip(keys, ("s--", "o-", "^:", "d-.")):
        ax.plot(xs, [row[f"ratio_{key}"] for row in rows], style, label=key)
    ax.set_xlabel("image tokens")
    ax.set_ylabel("training step time / baseline")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
