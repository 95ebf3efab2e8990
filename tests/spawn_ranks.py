"""Run a test's worker on several gloo ranks (one process each) and survive torch's teardown deadlock.

torch before pytorch/pytorch#154976 (2025; our floor, 2.1.2, included) can deadlock while a gloo
process group is destroyed: the main thread frees the group *holding the GIL* and joins the
group's worker threads, while one of them frees a finished collective whose tensor needs the GIL
to drop its Python object. The rank has done all its work and never exits; ``mp.spawn(join=True)``
then waits forever (seen once in .ci/run's torch 2.1.2 run, in the metrics test: both ranks had
written their results, one hung in ``ProcessGroupGloo::~ProcessGroupGloo``).

``run_ranks`` runs ``worker(rank, *args)`` in each process; the worker initialises the process
group and does everything else, except destroying the group: ``run_ranks`` marks the rank done
*before* it destroys the group. Ranks that are done but still alive after a grace period are
killed, with a warning; a rank that fails reports its traceback as ``mp.spawn`` would, and a run
that does not finish within ``timeout_s`` raises ``TimeoutError``.

``replicas`` (inside a worker) all-gathers a module's parameters and says whether the ranks agree.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

TEARDOWN_GRACE_S = 30.0  # a healthy teardown takes well under a second


def _marker(marker_dir: str | Path, rank: int, kind: str) -> Path:
    return Path(marker_dir, f".rank{rank}.{kind}")


def _rank_main(rank: int, worker: Callable[..., None], marker_dir: str, *args: Any) -> None:
    try:
        worker(rank, *args)
        _marker(marker_dir, rank, "done").touch()
    except BaseException:
        _marker(marker_dir, rank, "error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(worker: Callable[..., None], args: tuple[Any, ...], *, world_size: int, marker_dir: Path,
              timeout_s: float = 900.0) -> None:
    """Run ``worker(rank, *args)`` on ranks ``0 .. world_size - 1`` (spawned processes) to the end."""
    context = mp.start_processes(_rank_main, args=(worker, str(marker_dir), *args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline, all_done_at = time.monotonic() + timeout_s, None
    while not context.join(timeout=0.5):  # raises with the traceback when a rank fails
        now = time.monotonic()
        if all(_marker(marker_dir, rank, "done").exists() for rank in range(world_size)):
            all_done_at = all_done_at or now
            if now - all_done_at > TEARDOWN_GRACE_S:
                hung = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                _kill(context)
                warnings.warn(f"ranks {hung} finished their work but hung destroying the gloo process group "
                              f"(torch {torch.__version__}: pytorch/pytorch#154976); killed", RuntimeWarning,
                              stacklevel=2)
                return
        elif now > deadline:
            _kill(context)
            errors = {rank: _marker(marker_dir, rank, "error").read_text() for rank in range(world_size)
                      if _marker(marker_dir, rank, "error").exists()}
            raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s:.0f} s; "
                               f"tracebacks of failed ranks: {errors or 'none'}")


def _kill(context: mp.ProcessContext) -> None:
    for process in context.processes:
        if process.is_alive():
            process.kill()
    for process in context.processes:
        process.join()


def replicas(module: nn.Module, world_size: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Collective: ``module``'s parameters flattened ``[P]``, and whether every rank holds rank 0's
    bit for bit (``identical``, ``max_diff``, ``finite``)."""
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    return flat, {"identical": all(torch.equal(gathered[0], other) for other in gathered[1:]),
                  "max_diff": max(float((gathered[0] - other).abs().max()) for other in gathered[1:]),
                  "finite": bool(torch.isfinite(flat).all())}
