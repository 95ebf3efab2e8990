"""Segment the object a sentence refers to in your own image, with a checkpoint of ``train.py``.

    python examples/cris_clip/predict.py --checkpoint runs/demo-masksd/best.pt \\
        --image photo.jpg --sentence "the man on the left" --out prediction.png
    python examples/cris_clip/predict.py --checkpoint runs/demo-masksd/best.pt \\
        --synthetic-index 3 --out prediction.png   # a synthetic test sample and its sentence

The image is letterboxed to the model's input size; the sigmoid map is warped back to the
original image size and thresholded (0.35, as in evaluation). The PNG is the input image with
the mask overlaid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from config import context_length
from data import letterbox, unletterbox
from evaluate import THRESHOLD, load_checkpoint
from PIL import Image


def load_input(
    image: str | None, sentence: str | None, index: int | None, split: str
) -> tuple[np.ndarray, str]:
    """``(uint8 [H, W, 3] image, sentence)`` from an image file or a synthetic sample."""
    if image is not None:
        if sentence is None:
            raise SystemExit("--image needs --sentence")
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), sentence
    if index is None:
        raise SystemExit("give --image PATH --sentence TEXT, or --synthetic-index N")
    from synthetic import generate_sample

    sample = generate_sample(split, index)
    return sample.image, sentence or sample.sentence


def overlay(image: np.ndarray, mask: np.ndarray, *, color: tuple[int, int, int], alpha: float) -> Image.Image:
    """``image`` with ``mask`` tinted by ``color`` and outlined (same size as ``image``)."""
    out = image.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * tint
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[mask & ~interior] = tint
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="last.pt / best.pt written by train.py")
    p.add_argument("--image", default=None, help="input image (any format PIL reads)")
    p.add_argument("--sentence", default=None,
                   help="the referring expression (default: the synthetic sample's)")
    p.add_argument("--synthetic-index", type=int, default=None,
                   help="use sample N of a synthetic split instead")
    p.add_argument("--synthetic-split", default="test", help="split for --synthetic-index (default test)")
    p.add_argument("--out", default="prediction.png", help="output PNG: the image with the mask overlaid")
    p.add_argument("--mask-out", default=None, help="also write the binary mask as a PNG (0/255)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="probability threshold (default 0.35)")
    p.add_argument("--color", default="255,40,40", help="overlay colour R,G,B (default red)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1] (default 0.5)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    args = p.parse_args(argv)
    color = tuple(int(c) for c in args.color.split(","))
    if len(color) != 3:
        raise SystemExit(f"--color must be R,G,B, got {args.color!r}")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    wrapper, cfg, _ = load_checkpoint(args.checkpoint, device)
    image, sentence = load_input(args.image, args.sentence, args.synthetic_index, args.synthetic_split)
    x, info = letterbox(image, cfg.model.image_size)
    tokens = open_clip.get_tokenizer("ViT-B-16", context_length=context_length(cfg))([sentence])
    logits = wrapper.unwrap()(x[None].to(device), tokens.to(device))  # [1, 1, h, w]
    prob = unletterbox(torch.sigmoid(logits.float())[0, 0], info).cpu()  # [H, W]
    mask = (prob > args.threshold).numpy()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, mask, color=color, alpha=args.alpha).save(out)  # type: ignore[arg-type]
    if args.mask_out:
        Image.fromarray(mask.astype(np.uint8) * 255).save(args.mask_out)
    print(f'"{sentence}": mask covers {100 * mask.mean():.1f}% of the '
          f"{image.shape[1]}x{image.shape[0]} image "
          f"(max probability {float(prob.max()):.2f}); wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
