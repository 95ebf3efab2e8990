"""Train the reference RIS model (CLIP ViT + CRIS head) with CM-MaskSD or as the baseline.

    python examples/cris_clip/train.py --preset demo               # offline, CPU, minutes
    torchrun --nproc_per_node 8 examples/cris_clip/train.py --preset vitb16 --pretrained openai \\
        --dataset refcoco --data-root data --batch-size 4 --amp bf16   # the paper's setting

The same script runs single-process and under torchrun. Every epoch it validates (original
image resolution, threshold 0.35), writes ``last.pt`` (and ``best.pt`` when the first
``--eval-split`` improves) atomically, and at the end evaluates the best checkpoint on the test
splits and writes ``metrics.json`` (percent) into ``--out``. ``--resume auto`` continues from
``<out>/last.pt`` exactly where it stopped (same schedule, same data order, same masks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import engine
from engine import DistEnv, TrainState, rank_print
from torch import nn
from transforms import Tokenizer

RESUME_KEYS = ("preset", "image_size", "method", "dataset", "num_train", "synthetic_seed", "epochs",
               "batch_size", "lr", "weight_decay", "warmup_epochs", "backbone_lr_mult", "min_lr_ratio",
               "seed", "amp", "lmvsd", "vmlsd", "lmvsd_top_k", "lmvsd_ratio", "lmvsd_weight",
               "vmlsd_top_k", "vmlsd_ratio", "vmlsd_weight", "no_masking", "supervision",
               "unshared_decoder", "hard_targets")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_model_args(p)
    engine.add_data_args(p, training=True)
    g = p.add_argument_group("optimisation (unset values take the preset's defaults)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (demo 4, paper 100)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="batch size PER PROCESS (demo 16; paper: 32 in total, e.g. 4 × 8 GPUs)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of the head (demo 4e-3, paper 1e-5)")
    g.add_argument("--backbone-lr-mult", type=float, default=None,
                   help="lr multiplier of the CLIP towers (default: 0.1 with --pretrained as CRIS, "
                        "1.0 for random init)")
    g.add_argument("--weight-decay", type=float, default=None, help="Adam weight decay (demo 0, paper 5e-4)")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up epochs before the cosine decay (demo 0.25, paper 10)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr as a fraction of the peak")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (default: off)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast precision (fp16 uses a GradScaler; bf16 also works on CPU)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and masks")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimisation steps in total (counted over resumes; "
                        "the schedule still spans --epochs); for tests and smoke runs")
    r = p.add_argument_group("evaluation, output and resuming")
    r.add_argument("--eval-split", nargs="+", default=None,
                   help="splits validated every epoch; the first selects best.pt (default: val)")
    r.add_argument("--test-split", nargs="+", default=None,
                   help="splits evaluated at the end with best.pt (default: test compositional for "
                        "synthetic, testA testB for refcoco/refcoco+, test for refcocog; "
                        "'none' to skip)")
    r.add_argument("--eval-resolution", choices=("original", "model", "both"), default="original",
                   help="compare masks at the original image size (CRIS, default), at the model's "
                        "input size (LAVT), or both")
    r.add_argument("--eval-batch-size", type=int, default=None, help="evaluation batch size (default: --batch-size)")
    r.add_argument("--out", default=None, help="output folder (default runs/<preset>-<method>)")
    r.add_argument("--resume", default=None,
                   help="checkpoint to continue from, or 'auto' for <out>/last.pt if it exists")
    r.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    r.add_argument("--no-progress", action="store_true",
                   help="no tqdm progress bars (they are shown only when stderr is a terminal)")
    r.add_argument("--check-replicas", action="store_true",
                   help="write every rank's final parameter hash to <out>/replicas/rank<k>.json "
                        "(DDP consistency check)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for key, value in engine.PRESET_DEFAULTS[args.preset].items():
        if key == "num_train" and args.dataset != "synthetic":
            continue
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.backbone_lr_mult is None:
        args.backbone_lr_mult = 0.1 if args.pretrained else 1.0
    if args.eval_split is None:
        args.eval_split = engine.default_eval_splits(args.dataset)
    if args.test_split is None:
        args.test_split = engine.default_test_splits(args.dataset)
    if args.test_split == ["none"]:
        args.test_split = []
    if args.out is None:
        args.out = f"runs/{args.preset}-{args.method}"
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    if not sys.stderr.isatty():
        args.no_progress = True
    return args


def resolutions(args: argparse.Namespace) -> list[str]:
    return ["original", "model"] if args.eval_resolution == "both" else [args.eval_resolution]


def run_evaluation(model: nn.Module, loaders: dict[str, Any], args: argparse.Namespace,
                   env: DistEnv) -> dict[str, dict[str, dict[str, float]]]:
    """``{resolution: {split: percent metrics}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for res in resolutions(args):
        out[res] = {}
        for split, loader in loaders.items():
            m = engine.evaluate(model, loader, device=env.device, amp=args.amp, resolution=res,
                                progress=env.is_main and not args.no_progress, desc=f"eval {split}")
            out[res][split] = engine.as_percent(m)
    return out


def find_resume(args: argparse.Namespace) -> Path | None:
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = Path(args.out) / "last.pt"
        return path if path.is_file() else None
    return Path(args.resume)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns the metrics dictionary written to ``metrics.json`` (rank 0; {} elsewhere)."""
    args = parse_args(argv)
    env = engine.setup_distributed(args.device)
    try:
        return run(args, env)
    finally:
        engine.cleanup_distributed()


def run(args: argparse.Namespace, env: DistEnv) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(args.out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    engine.seed_everything(args.seed)  # identical initialisation on every rank

    resume_path = find_resume(args)
    bare, module = engine.build_training_model(args, pretrained=None if resume_path else args.pretrained)
    module.to(env.device)
    image_size = engine.model_image_size(bare)
    ctx = engine.context_length(args.dataset)
    tokenizer = Tokenizer(context_length=ctx)
    meta = {"image_size": image_size, "context_length": ctx, "world_size": env.world_size}

    train_set = engine.build_dataset(args, "train", image_size=image_size, tokenizer=tokenizer)
    loader = engine.train_loader(train_set, batch_size=args.batch_size, env=env, seed=args.seed,
                                 workers=args.workers)
    eval_loaders = {
        s: engine.eval_loader(engine.build_dataset(args, s, image_size=image_size, tokenizer=tokenizer),
                              batch_size=args.eval_batch_size, env=env, workers=args.workers)
        for s in args.eval_split
    }
    per_epoch = engine.steps_per_epoch(loader)
    if per_epoch == 0:
        raise ValueError(f"the training split has fewer samples per rank than --batch-size {args.batch_size}")
    total_steps = per_epoch * args.epochs
    optimizer = engine.build_optimizer(module, bare, lr=args.lr, weight_decay=args.weight_decay,
                                       backbone_lr_mult=args.backbone_lr_mult)
    scheduler = engine.build_scheduler(optimizer, total_steps=total_steps,
                                       warmup_steps=round(args.warmup_epochs * per_epoch),
                                       min_ratio=args.min_lr_ratio)
    scaler = engine.build_scaler(env.device, args.amp)
    state = TrainState()
    if resume_path is not None:
        ckpt = engine.load_checkpoint(resume_path)
        changed = {k: (ckpt["args"].get(k), getattr(args, k)) for k in RESUME_KEYS
                   if ckpt["args"].get(k) != getattr(args, k)}
        if ckpt.get("meta", {}).get("world_size", env.world_size) != env.world_size:
            changed["world_size"] = (ckpt["meta"]["world_size"], env.world_size)  # changes the schedule
        if changed:
            raise SystemExit(f"--resume {resume_path}: these settings differ from the checkpoint's "
                             f"(checkpoint, now): {changed}")
        state = engine.restore_training(ckpt, module, optimizer, scheduler, scaler)
        del ckpt
        rank_print(env, f"resumed from {resume_path}: epoch {state.epoch + 1}, step {state.global_step}")
    elif args.resume == "auto":
        rank_print(env, f"--resume auto: no {out / 'last.pt'}, starting from scratch")

    ddp: nn.Module = module
    if env.distributed:
        ids = [env.local_rank] if env.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids)

    first = args.eval_split[0]
    trivial = {res: {name: engine.as_percent(m) for name, m in
                     engine.trivial_scores(eval_loaders[first], resolution=res).items()}
               for res in resolutions(args)}
    rank_print(env, f"preset {args.preset} ({engine.count_parameters(bare) / 1e6:.2f} M parameters, "
               f"{image_size}px), method {args.method}, dataset {args.dataset} "
               f"({len(train_set)} train), {env.world_size} process(es) on {env.device}")
    rank_print(env, f"{args.epochs} epochs × {per_epoch} steps of {args.batch_size}×{env.world_size}; "
               f"lr {args.lr:g} (backbone ×{args.backbone_lr_mult:g}), warm-up {args.warmup_epochs:g} "
               f"epochs, cosine; amp {args.amp}")
    rank_print(env, f"trivial predictors on {first} ({resolutions(args)[0]} resolution, percent):\n"
               + engine.format_table(trivial[resolutions(args)[0]]))

    def save(name: str) -> None:
        if env.is_main:
            engine.atomic_save(engine.make_checkpoint(module, optimizer, scheduler, scaler, state, args,
                                                      sampler_epoch=state.epoch, meta=meta), out / name)

    stopped = args.max_steps is not None and state.global_step >= args.max_steps
    while state.epoch < args.epochs and not stopped:
        epoch = state.epoch
        stats = engine.train_one_epoch(ddp, loader, optimizer, scheduler, scaler, state, env=env,
                                       method=args.method, seed=args.seed, amp=args.amp,
                                       max_steps=args.max_steps, grad_clip=args.grad_clip,
                                       progress=not args.no_progress, epochs=args.epochs)
        stopped = args.max_steps is not None and state.global_step >= args.max_steps
        engine.broadcast_buffers(module, env)
        results = run_evaluation(module, eval_loaders, args, env)
        score = results[resolutions(args)[0]][first]["miou"]
        record = {"epoch": epoch + 1, "global_step": state.global_step, "partial": state.epoch == epoch,
                  "lr": optimizer.param_groups[-1]["lr"],
                  "train": {k: round(v, 5) for k, v in stats.items()}, "eval": results}
        state.history.append(record)
        improved = math.isfinite(score) and score > state.best_metric
        if improved:
            state.best_metric, state.best_epoch = score, epoch + 1
            save("best.pt")
        save("last.pt")
        terms = " ".join(f"{k} {stats[k]:.4f}" for k in ("seg", "lmvsd", "vmlsd") if k in stats)
        m = results[resolutions(args)[0]][first]
        rank_print(env, f"epoch {epoch + 1:>3}/{args.epochs} step {state.global_step:>6} | {terms} | "
                   f"{first} mIoU {m['miou']:.2f} oIoU {m['oiou']:.2f} P@0.5 {m['prec@0.5']:.2f} "
                   f"P@0.9 {m['prec@0.9']:.2f}{' *' if improved else ''} | {stats['seconds']:.0f}s")

    if args.check_replicas:
        digest = engine.parameter_digest(module)
        path = out / "replicas" / f"rank{env.rank}.json"
        engine.barrier(env)
        path.parent.mkdir(parents=True, exist_ok=True)
        engine.atomic_write_json({"rank": env.rank, "world_size": env.world_size,
                                  "global_step": state.global_step, "sha256": digest}, path)

    # final evaluation with the best checkpoint
    engine.barrier(env)
    best = out / "best.pt"
    if env.is_main and best.is_file():
        module.load_state_dict(engine.load_checkpoint(best)["model"])
    engine.broadcast_state(module, env)  # rank 0's file reaches every rank (no shared disk needed)
    test_loaders = {
        s: engine.eval_loader(engine.build_dataset(args, s, image_size=image_size, tokenizer=tokenizer),
                              batch_size=args.eval_batch_size, env=env, workers=args.workers)
        for s in args.test_split if s not in eval_loaders
    }
    final = run_evaluation(module, {**eval_loaders, **test_loaders}, args, env)
    wall = time.perf_counter() - t0
    primary = resolutions(args)[0]
    metrics: dict[str, Any] = {
        "units": "percent",
        "protocol": {
            "resolution": primary,
            "threshold": engine.EVAL_THRESHOLD,
            "prec_compare": ">=",
            "note": "sigmoid of the bare model's logits, warped back to the original image size "
                    "(resolution=original) or upsampled to the model input (resolution=model), "
                    "binarised at 0.35; miou = mean per-sentence IoU, oiou = cumulative I / cumulative "
                    "U, prec@X = share of sentences with IoU >= X; see docs/metrics.md",
        },
        "preset": args.preset,
        "method": args.method,
        "dataset": args.dataset,
        "best_epoch": state.best_epoch,
        "best_metric": {"split": first, "name": "miou", "value": state.best_metric},
        "global_step": state.global_step,
        "splits": final[primary],
        "trivial": {first: trivial[primary]},
        "history": state.history,
        "wall_time_s": round(wall, 1),
        "world_size": env.world_size,
        "args": engine.plain_args(args),
    }
    if "model" in final and primary != "model":
        metrics["splits_model_resolution"] = final["model"]
        metrics["trivial_model_resolution"] = {first: trivial["model"]}
    if env.is_main:
        engine.atomic_write_json(metrics, out / "metrics.json")
        print(f"\nbest epoch {state.best_epoch} ({first} mIoU {state.best_metric:.2f}); "
              f"best.pt on every split ({primary} resolution, percent):")
        rows = dict(final[primary])
        rows.update({f"{k} ({first})": v for k, v in trivial[primary].items()})
        print(engine.format_table(rows))
        print(f"wall time {int(wall // 60)} min {wall % 60:.0f} s ({wall:.1f} s); wrote {out / 'metrics.json'}, "
              f"{out / 'last.pt'}, {out / 'best.pt'}", flush=True)
        return json.loads(json.dumps(metrics))
    return {}


if __name__ == "__main__":
    main(sys.argv[1:])
