"""Evaluate a checkpoint of ``train.py`` on one or more splits.

    python examples/cris_clip/evaluate.py --checkpoint runs/demo-masksd/best.pt --split val test
    torchrun --nproc_per_node 8 examples/cris_clip/evaluate.py --checkpoint best.pt \\
        --dataset refcoco --data-root data --split val testA testB --json refcoco.json

Protocol (docs/metrics.md): sigmoid of the bare model's logits, warped back to the original
image size, thresholded at 0.35 (CRIS); mIoU = mean of per-sentence IoUs, oIoU = cumulative
intersection / cumulative union, Prec@X = share of sentences with IoU >= X (LAVT). Values in
percent. ``--resolution model`` compares at the model's input size instead (LAVT).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import engine
from transforms import Tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="last.pt / best.pt written by train.py")
    p.add_argument("--split", nargs="+", default=None,
                   help="splits to evaluate (default: val and the dataset's test splits)")
    engine.add_data_args(p, training=False)
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size per process")
    p.add_argument("--resolution", choices=("original", "model"), default="original",
                   help="original image size (CRIS, default) or the model's input size (LAVT)")
    p.add_argument("--threshold", type=float, default=engine.EVAL_THRESHOLD,
                   help="probability threshold (default 0.35, as CRIS)")
    p.add_argument("--prec-compare", choices=(">=", ">"), default=">=",
                   help="Prec@X counts IoU >= X (LAVT, default) or IoU > X (CRIS)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast precision")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--json", default=None, help="write the results (percent) to this JSON file")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    env = engine.setup_distributed(args.device)
    try:
        bare, ckpt = engine.load_bare_model(args.checkpoint, env.device)
        train_args = ckpt["args"]
        for key in ("dataset", "data_root", "image_root", "split_by", "synthetic_seed"):
            if getattr(args, key) is None:
                setattr(args, key, train_args.get(key))
        if args.num_val is None and args.dataset == train_args.get("dataset"):
            args.num_val = train_args.get("num_val")
        splits = args.split or engine.default_eval_splits(args.dataset) + engine.default_test_splits(args.dataset)
        image_size = engine.model_image_size(bare)
        tokenizer = Tokenizer(context_length=engine.context_length(args.dataset))
        results: dict[str, dict[str, float]] = {}
        for split in splits:
            loader = engine.eval_loader(engine.build_dataset(args, split, image_size=image_size,
                                                             tokenizer=tokenizer),
                                        batch_size=args.batch_size, env=env, workers=args.workers)
            m = engine.evaluate(bare, loader, device=env.device, amp=args.amp, threshold=args.threshold,
                                resolution=args.resolution, prec_compare=args.prec_compare,
                                progress=env.is_main and sys.stderr.isatty(), desc=f"eval {split}")
            results[split] = engine.as_percent(m)
        out = {
            "units": "percent",
            "checkpoint": str(args.checkpoint),
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "dataset": args.dataset,
            "protocol": {"resolution": args.resolution, "threshold": args.threshold,
                         "prec_compare": args.prec_compare},
            "splits": results,
        }
        if env.is_main:
            print(f"{args.checkpoint} (step {ckpt.get('global_step')}), {args.dataset}, "
                  f"{args.resolution} resolution, threshold {args.threshold:g}, percent:")
            print(engine.format_table(results))
            if args.json:
                engine.atomic_write_json(out, Path(args.json))
                print(f"wrote {args.json}")
        return out
    finally:
        engine.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
