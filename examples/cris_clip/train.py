"""Train the reference RIS model (open_clip ViT + CRIS head) with CM-MaskSD, or the baseline.

    python examples/cris_clip/train.py --preset demo               # offline, CPU, minutes
    torchrun --nproc_per_node 8 examples/cris_clip/train.py --preset vitb16 --pretrained openai \\
        --dataset refcoco --data-root data --batch-size 4 --amp bf16   # the paper's setting

The same script runs alone and under torchrun. It reads top to bottom: distributed setup → data →
model → masksd wrapper → optimiser and schedule → (resume) → training loop with validation and
checkpoints every epoch → final evaluation of the best checkpoint → ``metrics.json``. Every
setting is in ``config.py`` (``--help`` lists them). The masksd lines are marked ``# masksd``.

Reproducibility: the weights are initialised from ``--seed`` (the same on every rank); the data
order depends only on ``(seed, epoch)``; the masks of step ``s`` on rank ``r`` come from a
``torch.Generator`` seeded from ``(seed, r, s)`` and passed to the wrapper. A checkpoint records
``(epoch, step_in_epoch, global_step)``, and ``--resume auto`` continues from ``<out>/last.pt``
taking exactly the steps an uninterrupted run takes (dropout, off in the demo, draws from torch's
global generator and is not replayed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from config import context_length, extra_objectives, parse_args, trajectory_changes
from data import RISDataset, eval_loader, raw_dataset, train_loader
from evaluate import THRESHOLD, autocast, evaluate, format_table
from model import build_model, build_objectives
from roles import ROLE_NAMES, token_roles
from torch import nn

from masksd import MaskedSelfDistill
from masksd.diagnostics import SelectionStats


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the mask draws of optimisation step ``step`` on ``rank``."""
    return (seed * 1_000_003 + rank * 10_007 + step * 7_919 + 12_345) % 2**63


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up ``(step+1)/warmup``, then cosine decay from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (a hard link, else a copy), replacing it atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links on this file system
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def machine(device: torch.device) -> dict[str, object]:
    """Where the run trained: CPU (or GPU) model, torch version, intra-op threads."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "gpu": gpu, "torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, description=__doc__)
    o, r = cfg.optim, cfg.run
    started = time.perf_counter()

    # ---- distributed setup: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE --------------------------
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if r.device == "auto"
                          else r.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    log = functools.partial(print, flush=True) if master else (lambda *args, **kwargs: None)
    out = Path(r.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(o.seed)  # the same initial weights on every rank

    # ---- resume? Everything but `run` shapes the trajectory and must match the checkpoint's -----
    resume = out / "last.pt" if r.resume == "auto" else (Path(r.resume) if r.resume else None)
    ckpt = None
    if resume is not None and resume.is_file():
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        changed = trajectory_changes(ckpt["config"], cfg.to_dict())
        if ckpt["world_size"] != world:
            changed["world_size"] = (ckpt["world_size"], world)
        if changed:
            raise SystemExit(f"--resume {resume}: settings differ from the checkpoint's (checkpoint, now): "
                             f"{changed}")
    elif r.resume == "auto":
        log(f"--resume auto: no {resume}, starting from scratch")
    elif resume is not None:
        raise SystemExit(f"--resume {resume}: no such file")

    # ---- data ------------------------------------------------------------------------------------
    size, ctx, pin = cfg.model.image_size, context_length(cfg), device.type == "cuda"
    train_set = RISDataset(raw_dataset(cfg.data, "train"), image_size=size, context_length=ctx, train=True,
                           roles=token_roles if cfg.data.dataset == "synthetic" else None)  # VMLSD diagnostic
    loader = train_loader(train_set, batch_size=o.batch_size, rank=rank, world_size=world, seed=o.seed,
                          workers=r.workers, pin_memory=pin)

    def split_loader(split: str):
        dataset = RISDataset(raw_dataset(cfg.data, split), image_size=size, context_length=ctx, train=False)
        return eval_loader(dataset, batch_size=r.eval_batch_size, rank=rank, world_size=world,
                           workers=r.workers, pin_memory=pin)

    val_loaders = {split: split_loader(split) for split in r.eval_split}
    steps_per_epoch = loader.sampler.num_samples // o.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"the training split has fewer samples per rank than --batch-size {o.batch_size}")

    # ---- model, wrapped by masksd (--method baseline: the same wrapper with both branches off) --
    model = build_model(replace(cfg.model, pretrained=None) if ckpt else cfg.model)  # bare RISModel
    # masksd: --objectives beyond the paper's
    extras = build_objectives(extra_objectives(cfg), model, cfg.model)
    wrapper = MaskedSelfDistill(model.image_tower, model.text_tower, model.decoder, config=cfg.distill,
                                extra_objectives=extras)  # masksd
    wrapper.to(device)

    # ---- optimiser and schedule: Adam, the CLIP towers at lr × backbone_lr_mult (CRIS) ----------
    backbone = {id(p) for tower in (model.image_tower, model.text_tower) for p in tower.parameters()}
    params = [p for p in wrapper.parameters() if p.requires_grad]  # + the mask tokens
    optimizer = torch.optim.Adam([
        {"params": [p for p in params if id(p) in backbone], "lr": o.lr * o.backbone_lr_mult},
        {"params": [p for p in params if id(p) not in backbone], "lr": o.lr},
    ], lr=o.lr, weight_decay=o.weight_decay)
    total_steps = steps_per_epoch * o.epochs
    warmup = round(o.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=total_steps, min_ratio=o.min_lr_ratio))
    scaler = (torch.amp.GradScaler(device.type, enabled=o.amp == "fp16") if hasattr(torch.amp, "GradScaler")
              else torch.cuda.amp.GradScaler(enabled=o.amp == "fp16"))  # torch 2.1 / 2.2

    # ---- resume: weights, optimiser, schedule and progress counters -----------------------------
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_miou": -math.inf, "best_epoch": None,
             "best_step": None, "best_eval": {}, "history": []}
    if ckpt is not None:
        wrapper.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        ckpt = None
        log(f"resumed from {resume}: epoch {state['epoch'] + 1}, step {state['global_step']}")
    ddp = nn.parallel.DistributedDataParallel(
        wrapper, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else wrapper

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"preset {cfg.preset} ({n_params:.2f} M parameters, {size}px), method {cfg.method}, dataset "
        f"{cfg.data.dataset} ({len(train_set)} train), {world} process(es) on {device}")
    log(f"{o.epochs} epochs × {steps_per_epoch} steps of {o.batch_size}×{world}; lr {o.lr:g} (backbone "
        f"×{o.backbone_lr_mult:g}), warm-up {o.warmup_epochs:g} epochs, cosine; amp {o.amp}")
    resolutions = ("original", "model") if r.eval_resolution == "both" else (r.eval_resolution,)
    primary, first = resolutions[0], r.eval_split[0]
    progress = r.progress and master and sys.stderr.isatty()

    # ---- training loop ---------------------------------------------------------------------------
    stopped = r.max_steps is not None and state["global_step"] >= r.max_steps
    while state["epoch"] < o.epochs and not stopped:
        epoch, epoch_start = state["epoch"], time.perf_counter()
        wrapper.train()
        loader.sampler.set_epoch(epoch, start=state["step_in_epoch"] * o.batch_size)
        remaining = min(len(loader), math.inf if r.max_steps is None else r.max_steps - state["global_step"])
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=remaining, desc=f"epoch {epoch + 1}/{o.epochs}", leave=False, dynamic_ncols=True)
        sums, steps = None, 0  # loss terms summed on the device; read at log intervals only
        # masksd: what do the branches keep? (read per epoch)
        selection = SelectionStats(role_names=ROLE_NAMES)
        for images, texts, masks, *roles in loader:
            if steps >= remaining:
                break
            generator = torch.Generator(device).manual_seed(step_seed(o.seed, rank, state["global_step"]))
            images, texts, masks = (x.to(device, non_blocking=True) for x in (images, texts, masks))
            with autocast(device, o.amp):
                result = ddp(images, texts, masks, generator=generator)  # masksd: DistillOutput
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(result.loss).backward()
            if o.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(wrapper.parameters(), o.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            terms = torch.stack(list(result.losses.values())).double()  # seg [, lmvsd, vmlsd, ...]
            if "lmvsd" in result.selections:
                kept = result.selections["lmvsd"]
                selection.add_image(kept["kept"], masks, kept["grid"])
            if "vmlsd" in result.selections and roles:
                selection.add_words(result.selections["vmlsd"]["kept"], roles[0])
            sums = terms if sums is None else sums + terms
            steps += 1
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            if bar is not None:
                bar.update(1)
            if steps % r.log_interval == 0:  # the loop's only device→host read
                means = (sums / steps).tolist()
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"non-finite loss by step {state['global_step']}: {means}")
                if bar is not None:
                    bar.set_postfix({k: f"{v:.3f}" for k, v in zip(result.losses, means)}, refresh=False)
        if bar is not None:
            bar.close()
        stopped = r.max_steps is not None and state["global_step"] >= r.max_steps
        if state["step_in_epoch"] >= steps_per_epoch:
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        train_terms = dict(zip(result.losses, (sums / steps).tolist())) if steps else {}
        summary = selection.summary()
        kept_on_target = {k: v for k, v in summary.items() if "/" not in k}  # vs random (= target area)
        kept_words = {k.split("/")[1]: v for k, v in summary.items() if k.startswith("kept_rate/")}
        seconds = time.perf_counter() - epoch_start

        # ---- validate (rank 0's BatchNorm statistics on every rank; DDP keeps them per rank) ----
        if world > 1:
            for buffer in wrapper.buffers():
                dist.broadcast(buffer, 0)
        results = {split: evaluate(model, val_loader, device=device, amp=o.amp, resolutions=resolutions)
                   for split, val_loader in val_loaders.items()}
        m = results[first][primary]["prediction"]
        improved = math.isfinite(m["miou"]) and m["miou"] > state["best_miou"]
        if improved:
            state.update(best_miou=m["miou"], best_epoch=epoch + 1, best_step=state["global_step"],
                         best_eval=results)
        state["history"].append({
            "epoch": epoch + 1, "global_step": state["global_step"], "partial": state["epoch"] == epoch,
            "lr": optimizer.param_groups[-1]["lr"], "seconds": round(seconds, 1),
            "train": {k: round(v, 5) for k, v in train_terms.items()},
            "lmvsd_selection": {k: round(v, 4) for k, v in kept_on_target.items()},
            "vmlsd_selection": {k: round(v, 4) for k, v in kept_words.items()},  # kept rate per word role
            "eval": {split: {res: by[res]["prediction"] for res in resolutions}
                     for split, by in results.items()},
        })

        # ---- checkpoint: written once; best.pt is a link to it -----------------------------------
        if master:
            save({"model": wrapper.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "state": state,
                  "config": cfg.to_dict(), "world_size": world}, out / "last.pt")
            if improved:
                link(out / "last.pt", out / "best.pt")
        terms = " ".join(f"{k} {v:.4f}" for k, v in train_terms.items())
        if kept_on_target:
            terms += (f" | kept on target {kept_on_target['precision']:.3f} "
                      f"(random {kept_on_target['random']:.3f})")
        if kept_words:
            terms += " | words kept " + " ".join(f"{k} {v:.2f}" for k, v in kept_words.items())
        log(f"epoch {epoch + 1:>3}/{o.epochs} step {state['global_step']:>6} | {terms} | {first} mIoU "
            f"{m['miou']:.2f} oIoU {m['oiou']:.2f} P@0.5 {m['prec@0.5']:.2f} P@0.9 {m['prec@0.9']:.2f}"
            f"{' *' if improved else ''} | {seconds:.0f}s")

    if r.check_replicas and world > 1:  # DDP keeps replicas identical: check it bit for bit
        flat = torch.cat([p.detach().flatten() for p in wrapper.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, 0)
        same = torch.tensor(float(torch.equal(flat, reference)), device=device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if not same.item():
            raise RuntimeError("DDP replicas differ after training")
        log(f"replicas identical on {world} ranks ({flat.numel()} parameters)")

    # ---- final evaluation: the best checkpoint on the test splits --------------------------------
    best = out / "best.pt"
    if world > 1:
        dist.barrier()
    if state["best_step"] is not None and state["best_step"] != state["global_step"]:
        if master:
            wrapper.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["model"])
        if world > 1:  # rank 0's file reaches every rank (no shared disk needed)
            for tensor in wrapper.state_dict().values():
                dist.broadcast(tensor, 0)
    final = dict(state["best_eval"])  # the validation splits were scored at the best epoch
    for split in r.test_split:
        if split not in final:
            final[split] = evaluate(model, split_loader(split), device=device, amp=o.amp,
                                    resolutions=resolutions)
    if world > 1:  # barrier first: torch < 2.8 can deadlock destroying a gloo group while a worker thread
        dist.barrier()  # still frees the last collective (pytorch/pytorch#154976)
        dist.destroy_process_group()
    if not master:
        return
    wall = time.perf_counter() - started
    splits = {split: by[primary]["prediction"] for split, by in final.items()}
    trivial = {name: final[first][primary][name] for name in ("all_background", "whole_image")}
    metrics = {
        "units": "percent",
        "protocol": {"resolution": primary, "threshold": THRESHOLD, "prec_compare": ">=",
                     "doc": "docs/metrics.md"},
        "preset": cfg.preset, "method": cfg.method, "dataset": cfg.data.dataset,
        "best_epoch": state["best_epoch"],
        "best_metric": {"split": first, "name": "miou", "value": state["best_miou"]},
        "global_step": state["global_step"], "splits": splits, "trivial": {first: trivial},
        "history": state["history"], "wall_time_s": round(wall, 1), "world_size": world,
        "config": cfg.to_dict(),
        "machine": machine(device),  # float results differ across CPU models: compare runs of one machine
    }
    if cfg.model.pretrained and Path(cfg.model.pretrained).is_file():  # which weights, not only which path
        metrics["pretrained_sha256"] = hashlib.sha256(Path(cfg.model.pretrained).read_bytes()).hexdigest()
    if len(resolutions) == 2:
        metrics["splits_model_resolution"] = {split: by["model"]["prediction"] for split, by in final.items()}
        metrics["trivial_model_resolution"] = {first: {k: final[first]["model"][k] for k in trivial}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"\nbest epoch {state['best_epoch']} ({first} mIoU {state['best_miou']:.2f}); best.pt on every "
          f"split ({primary} resolution, percent):")
    print(format_table({**splits, **{f"{k} ({first})": v for k, v in trivial.items()}}))
    print(f"wall time {int(wall // 60)} min {wall % 60:.0f} s ({wall:.1f} s); wrote {out / 'metrics.json'}, "
          f"{out / 'last.pt'}, {best}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
