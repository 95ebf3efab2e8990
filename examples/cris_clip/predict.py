"""Segment the object a sentence refers to in your own image, with a checkpoint of ``train.py``.

    python examples/cris_clip/predict.py --checkpoint runs/demo-masksd/best.pt \\
        --image photo.jpg --sentence "the man on the left" --out prediction.png
    python examples/cris_clip/predict.py --checkpoint runs/demo-masksd/best.pt \\
        --synthetic-index 3 --out prediction.png   # a synthetic test sample and its sentence

The image is letterboxed to the model's input size, the sigmoid map is warped back to the
ORIGINAL image size and thresholded (0.35, as in evaluation); the PNG is the original image
with the mask overlaid (same width and height as the input).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import engine
import numpy as np
import torch
from PIL import Image
from transforms import Tokenizer, letterbox, unletterbox


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="last.pt / best.pt written by train.py")
    p.add_argument("--image", default=None, help="input image (any format PIL reads)")
    p.add_argument("--sentence", default=None,
                   help="the referring expression (default with --synthetic-index: the sample's)")
    p.add_argument("--synthetic-index", type=int, default=None,
                   help="use sample N of a synthetic split instead of --image")
    p.add_argument("--synthetic-split", default="test",
                   help="split for --synthetic-index: train, val, test or compositional (default test)")
    p.add_argument("--out", default="prediction.png", help="output PNG: the image with the mask overlaid")
    p.add_argument("--mask-out", default=None, help="also write the binary mask as a PNG (0/255)")
    p.add_argument("--threshold", type=float, default=engine.EVAL_THRESHOLD,
                   help="probability threshold (default 0.35)")
    p.add_argument("--color", default="255,40,40", help="overlay colour R,G,B (default red)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1] (default 0.5)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    return p


def load_input(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """``(uint8 [H, W, 3] image, sentence)`` from ``--image`` or ``--synthetic-index``."""
    if args.image is not None:
        if args.sentence is None:
            raise SystemExit("--image needs --sentence")
        with Image.open(args.image) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), args.sentence
    if args.synthetic_index is None:
        raise SystemExit("give --image PATH --sentence TEXT, or --synthetic-index N")
    from synthetic import generate_sample

    sample = generate_sample(args.synthetic_split, args.synthetic_index)
    return sample.image, args.sentence or sample.sentence


@torch.no_grad()
def predict_probability(model: torch.nn.Module, image: np.ndarray, sentence: str, *, image_size: int,
                        context_length: int, device: torch.device) -> torch.Tensor:
    """Probability map ``[H, W]`` (float32, CPU) at the original image size."""
    x, info = letterbox(image, image_size)
    tokens = Tokenizer(context_length=context_length)([sentence])
    logits = model(x[None].to(device), tokens.to(device))
    prob = torch.sigmoid(logits.float())
    prob = prob[0, 0] if prob.dim() == 4 else prob[0]
    return unletterbox(prob, info).cpu()


def overlay(image: np.ndarray, mask: np.ndarray, *, color: tuple[int, int, int], alpha: float) -> Image.Image:
    """The image with ``mask`` tinted by ``color`` and outlined (same size as ``image``)."""
    out = image.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * tint
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[mask & ~interior] = tint
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = engine.resolve_device(args.device)
    model, ckpt = engine.load_bare_model(args.checkpoint, device)
    meta = ckpt.get("meta", {})
    image, sentence = load_input(args)
    prob = predict_probability(model, image, sentence, image_size=engine.model_image_size(model),
                               context_length=int(meta.get("context_length", 17)), device=device)
    mask = (prob > args.threshold).numpy()
    color = tuple(int(c) for c in args.color.split(","))
    if len(color) != 3:
        raise SystemExit(f"--color must be R,G,B, got {args.color!r}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, mask, color=color, alpha=args.alpha).save(out)  # type: ignore[arg-type]
    if args.mask_out:
        Image.fromarray(mask.astype(np.uint8) * 255).save(args.mask_out)
    area = float(mask.mean())
    print(f'"{sentence}": mask covers {100 * area:.1f}% of the {image.shape[1]}x{image.shape[0]} image '
          f"(max probability {float(prob.max()):.2f}); wrote {out}")
    return {"sentence": sentence, "area": area, "out": str(out), "size": (image.shape[1], image.shape[0])}


if __name__ == "__main__":
    main(sys.argv[1:])
