"""Evaluate a checkpoint of ``train.py`` (``train.py`` imports :func:`evaluate` from here).

    python examples/cris_clip/evaluate.py --checkpoint runs/demo-masksd/best.pt --split val test
    torchrun --nproc_per_node 8 examples/cris_clip/evaluate.py --checkpoint best.pt \\
        --dataset refcoco --data-root data --split val testA testB --json refcoco.json

Protocol (docs/metrics.md): the sigmoid of the bare model's logits is warped back to the original
image size and thresholded at 0.35 (CRIS); mIoU = mean per-sentence IoU, oIoU = cumulative
intersection / cumulative union, Prec@X = share of sentences with IoU >= X (LAVT). Percent.
``--resolution model`` compares at the model's input size instead (LAVT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from masksd import MaskedSelfDistill
from masksd.metrics import RISMetrics

if __package__:  # imported as examples.cris_clip.evaluate (benchmarks)
    from .config import Config, add_flags, apply_flags, context_length, extra_objectives
    from .data import TEST_SPLITS, DataConfig, RISDataset, eval_loader, raw_dataset, unletterbox
    from .model import build_model, build_objectives
else:  # a script run of this folder (and train.py) imports siblings by plain name
    from config import Config, add_flags, apply_flags, context_length, extra_objectives
    from data import TEST_SPLITS, DataConfig, RISDataset, eval_loader, raw_dataset, unletterbox
    from model import build_model, build_objectives

THRESHOLD = 0.35  # CRIS: the sigmoid map binarised at 0.35 after warping back to the image
PREDICTORS = ("prediction", "all_background", "whole_image")
KEYS = ("miou", "oiou", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9")


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` in ``bf16 | fp16``; nothing for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device, amp: str = "none",
             resolutions: tuple[str, ...] = ("original",), threshold: float = THRESHOLD,
             prec_compare: str = ">=") -> dict[str, dict[str, dict[str, float]]]:
    """Metrics (percent) of the bare ``model`` on ``loader``, summed over all ranks (every rank
    must call it): ``{resolution: {predictor: {"miou", "oiou", "prec@0.5", ..., "count"}}}``.

    One forward per batch scores every resolution: ``"original"`` warps the probabilities back
    to each image's size (CRIS), ``"model"`` upsamples them to the letterboxed input (LAVT).
    The predictors are the model (``"prediction"``) and two data-only baselines scored from the
    same ground-truth masks: ``"all_background"`` (IoU 0) and ``"whole_image"`` (IoU = object
    area / image area). Intersections and unions are counted on the device.
    """
    model.eval()
    metrics = {res: {name: RISMetrics(prec_compare=prec_compare) for name in PREDICTORS}
               for res in resolutions}
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images, batch["text"].to(device, non_blocking=True))
        prob = torch.sigmoid(logits.float())  # [B, 1, h, w]
        for res in resolutions:
            if res == "original":  # sizes differ between images: lists of [H_i, W_i]
                targets = [m.to(device, non_blocking=True) for m in batch["orig_mask"]]
                preds = [unletterbox(p[0], info) > threshold for p, info in zip(prob, batch["info"])]
            else:
                targets = batch["mask"].to(device, non_blocking=True)  # [B, S, S]
                preds = F.interpolate(prob, size=images.shape[-2:], mode="bilinear",
                                      align_corners=False)[:, 0]
                preds = preds > threshold
            m = metrics[res]
            m["prediction"].update(preds, targets)
            if isinstance(targets, list):
                m["all_background"].update([torch.zeros_like(t) for t in targets], targets)
                m["whole_image"].update([torch.ones_like(t) for t in targets], targets)
            else:
                m["all_background"].update(torch.zeros_like(targets), targets)
                m["whole_image"].update(torch.ones_like(targets), targets)
    return {res: {name: percent(m.all_reduce().compute()) for name, m in by_name.items()}
            for res, by_name in metrics.items()}


def percent(metrics: dict[str, float]) -> dict[str, float]:
    """Rates ×100, rounded to 2 decimals; ``count`` unchanged."""
    return {k: (v if k == "count" else round(100.0 * v, 2)) for k, v in metrics.items()}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Plain-text table of percent metrics, one row per name."""
    width = max([len(n) for n in rows] + [5])
    heads = ["mIoU", "oIoU"] + [f"P@{k[5:]}" for k in KEYS[2:]]
    lines = [f"{'':<{width}} " + " ".join(f"{h:>7}" for h in heads) + f" {'n':>6}"]
    for name, m in rows.items():
        lines.append(f"{name:<{width}} " + " ".join(f"{m.get(k, float('nan')):>7.2f}" for k in KEYS)
                     + f" {int(m.get('count', 0)):>6}")
    return "\n".join(lines)


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[MaskedSelfDistill, Config, dict]:
    """``(wrapper with the trained weights, its Config, the checkpoint)``. The bare model for
    inference is ``wrapper.unwrap()``; no pretrained weights are fetched (the checkpoint has them)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(replace(cfg.model, pretrained=None))
    extras = build_objectives(extra_objectives(cfg), model, cfg.model)  # the run's --objectives heads
    wrapper = MaskedSelfDistill(model.image_tower, model.text_tower, model.decoder,  # masksd
                                config=cfg.distill, extra_objectives=extras)
    wrapper.load_state_dict(ckpt["model"])
    return wrapper.to(device).eval(), cfg, ckpt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="last.pt / best.pt written by train.py")
    p.add_argument("--split", nargs="+", default=None,
                   help="splits (default: val and the dataset's test splits)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size per process")
    p.add_argument("--resolution", choices=("original", "model"), default="original",
                   help="original image size (CRIS, default) or the model's input size (LAVT)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="probability threshold (default 0.35)")
    p.add_argument("--prec-compare", choices=(">=", ">"), default=">=",
                   help="Prec@X counts IoU >= X (LAVT, default) or IoU > X (CRIS)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast precision")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    p.add_argument("--json", default=None, help="also write the results (percent) to this JSON file")
    add_flags(p, DataConfig(), "data (default: the checkpoint's)")
    args = p.parse_args(argv)

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    wrapper, cfg, ckpt = load_checkpoint(args.checkpoint, device)
    data = apply_flags(cfg.data, args)
    cfg = replace(cfg, data=data)
    results = {}
    for split in args.split or ["val", *TEST_SPLITS[data.dataset]]:
        dataset = RISDataset(raw_dataset(data, split), image_size=cfg.model.image_size,
                             context_length=context_length(cfg), train=False)
        loader = eval_loader(dataset, batch_size=args.batch_size, rank=rank, world_size=world,
                             workers=args.workers)
        scores = evaluate(wrapper.unwrap(), loader, device=device, amp=args.amp,
                          resolutions=(args.resolution,), threshold=args.threshold,
                          prec_compare=args.prec_compare)
        results[split] = scores[args.resolution]["prediction"]
    if world > 1:  # barrier first: torch < 2.8 can deadlock destroying a gloo group while a worker thread
        dist.barrier()  # still frees the last collective (pytorch/pytorch#154976)
        dist.destroy_process_group()
    if rank == 0:
        step = ckpt["state"]["global_step"]
        print(f"{args.checkpoint} (step {step}), {data.dataset}, {args.resolution} resolution, "
              f"threshold {args.threshold:g}, percent:\n{format_table(results)}")
        if args.json:
            out = {"units": "percent", "checkpoint": str(args.checkpoint), "global_step": step,
                   "dataset": data.dataset, "splits": results,
                   "protocol": {"resolution": args.resolution, "threshold": args.threshold,
                                "prec_compare": args.prec_compare}}
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
            print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
