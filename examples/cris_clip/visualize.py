"""Show what CM-MaskSD's two branches do on one sample.

    python examples/cris_clip/visualize.py --checkpoint runs/demo-masksd/best.pt --index 3 --out vis.png
    python examples/cris_clip/visualize.py --image photo.jpg --sentence "the dog" --out vis.png  # random init

Runs the wrapper's training forward once (BatchNorm and dropout in eval mode, masks drawn from
``--seed``) and draws the input with the patches LMVSD kept (outlined) and masked (filled), the
sentence's tokens VMLSD kept (green) and masked (red), and the ground truth (synthetic samples)
next to the main, LMVSD and VMLSD predictions. The branch settings come from a masksd checkpoint;
for a baseline checkpoint or without ``--checkpoint`` (random init) from the flags below.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from config import PRESETS, add_flags, apply_flags, context_length
from data import CLIP_MEAN, CLIP_STD, letterbox, letterbox_mask
from evaluate import load_checkpoint
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from model import build_model
from PIL import Image
from torch import nn

from masksd import DistillConfig, MaskedSelfDistill


def draw_tokens(ax: Any, fig: Figure, words: list[str], kept: list[bool], masked: list[bool]) -> None:
    """Tokens left to right as coloured boxes: red masked, green kept, grey otherwise."""
    ax.set_axis_off()
    renderer = fig.canvas.get_renderer()
    x, y, width = 0.01, 0.55, ax.get_window_extent(renderer).width
    for word, k, m in zip(words, kept, masked):
        face, color = ("#d62728", "white") if m else (("#2ca02c", "white") if k else ("#dddddd", "#555555"))
        t = ax.text(x, y, word, transform=ax.transAxes, fontsize=13, color=color, va="center",
                    bbox=dict(boxstyle="round,pad=0.3", facecolor=face, edgecolor="none"))
        x += t.get_window_extent(renderer).width / width + 0.015
        if x > 0.95:
            x, y = 0.01, y - 0.45
    ax.text(0.01, 0.02, "VMLSD words: green = kept by correlation filtering, red = masked, grey = not "
            "selected (SOT/EOT/padding are never selected)", transform=ax.transAxes, fontsize=9,
            color="#333333")


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint of train.py (default: a random-init demo model)")
    p.add_argument("--split", default="val", help="synthetic split of the sample (default val)")
    p.add_argument("--index", type=int, default=0, help="synthetic sample index (default 0)")
    p.add_argument("--image", default=None, help="your own image instead of a synthetic sample")
    p.add_argument("--sentence", default=None,
                   help="sentence (required with --image; overrides the sample's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask draws (default 0)")
    p.add_argument("--out", default="visualize.png", help="output PNG")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    add_flags(p, DistillConfig(), "branches (without a masksd checkpoint)")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    # ---- the wrapper: trained branches from a masksd checkpoint, else built from the flags -------
    torch.manual_seed(args.seed)
    if args.checkpoint is not None:
        wrapper, cfg, _ = load_checkpoint(args.checkpoint)
        model = wrapper.unwrap()
    else:
        cfg = PRESETS["demo"]
        model = build_model(cfg.model)
    if args.checkpoint is None or cfg.method == "baseline":  # masksd: branches from the flags
        distill = apply_flags(DistillConfig(), args)
        wrapper = MaskedSelfDistill(model.image_tower, model.text_tower, model.decoder, config=distill)
    wrapper.to(device).train()
    for m in wrapper.modules():  # BatchNorm with running statistics, no dropout: as at inference
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()

    # ---- one sample, one training forward ---------------------------------------------------------
    if args.image is not None:
        if args.sentence is None:
            raise SystemExit("--image needs --sentence")
        with Image.open(args.image) as im:
            image, sentence, gt = np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), args.sentence, None
    else:
        from synthetic import generate_sample

        sample = generate_sample(args.split, args.index)
        image, sentence, gt = sample.image, args.sentence or sample.sentence, sample.mask
    size = cfg.model.image_size
    x, info = letterbox(image, size)
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=context_length(cfg))
    ids = tokenizer([sentence])
    target = (letterbox_mask(gt, info)[None] if gt is not None
              else torch.zeros(1, size, size, dtype=torch.bool))
    generator = torch.Generator(device).manual_seed(args.seed)
    out = wrapper(x[None].to(device), ids.to(device), target.to(device), generator=generator)  # masksd
    branches = out.selections  # per branch: kept, masked, logits, grid

    # ---- the figure ---------------------------------------------------------------------------------
    shown = (x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)).clamp(0, 1)
    shown = shown.permute(1, 2, 0).numpy()
    panels = [("ground truth", target[0].float().numpy())] if gt is not None else []
    panels.append(("main prediction", torch.sigmoid(out.logits.float())[0, 0].cpu().numpy()))
    for name, branch in branches.items():
        panels.append((f"{name.upper()} branch prediction",
                       torch.sigmoid(branch["logits"].float())[0, 0].cpu().numpy()))
    fig = Figure(figsize=(3.2 * (1 + len(panels)), 4.8))
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display backend
    grid = fig.add_gridspec(2, 1 + len(panels), height_ratios=[4, 1.3])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(shown)
    ax.set_axis_off()
    result: dict[str, Any] = {"sentence": sentence}
    if "lmvsd" in branches:
        kept, masked = branches["lmvsd"]["kept"][0].cpu(), branches["lmvsd"]["masked"][0].cpu()
        gh, gw = branches["lmvsd"]["grid"]  # the patch grid the branch selected on
        ph, pw = size / gh, size / gw
        for n in torch.nonzero(kept).flatten().tolist():
            r, c = divmod(n, gw)
            style = dict(facecolor="#444444", alpha=0.85) if masked[n] else dict(fill=False)
            ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, edgecolor="yellow", linewidth=1.0,
                                   **style))
        ax.set_title(f"LMVSD: {int(kept.sum())}/{kept.numel()} patches kept\n(outlined), "
                     f"{int(masked.sum())} masked (filled)", fontsize=10)
        result["lmvsd"] = {"kept": int(kept.sum()), "masked": int(masked.sum()), "patches": kept.numel()}
    else:
        ax.set_title("input (LMVSD off)", fontsize=10)
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)  # maps at any resolution cover the input
    for k, (title, data) in enumerate(panels, start=1):
        a = fig.add_subplot(grid[0, k])
        if title == "ground truth":
            a.imshow(shown * (0.3 + 0.7 * data[..., None]), extent=extent)
        else:
            a.imshow(data, cmap="magma", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
            if gt is not None:
                a.contour(target[0].float().numpy(), levels=[0.5], colors="cyan", linewidths=1.0)
            title += "\n(probability; cyan: ground truth)" if gt is not None else "\n(probability)"
        a.set_xlim(extent[0], extent[1])
        a.set_ylim(extent[2], extent[3])
        a.set_title(title, fontsize=10)
        a.set_axis_off()
    id_list = ids[0].tolist()
    valid = [i for i, t in enumerate(id_list) if t != 0]
    special = {tokenizer.sot_token_id: "<sot>", tokenizer.eot_token_id: "<eot>"}
    words = [special.get(id_list[i]) or tokenizer.decode([id_list[i]]).strip() or "·" for i in valid]
    kept_t = branches["vmlsd"]["kept"][0].tolist() if "vmlsd" in branches else [False] * len(id_list)
    masked_t = branches["vmlsd"]["masked"][0].tolist() if "vmlsd" in branches else [False] * len(id_list)
    draw_tokens(fig.add_subplot(grid[1, :]), fig, words, [kept_t[i] for i in valid],
                [masked_t[i] for i in valid])
    if "vmlsd" in branches:
        result["vmlsd"] = {"kept": [w for w, i in zip(words, valid) if kept_t[i]],
                           "masked": [w for w, i in zip(words, valid) if masked_t[i]]}
    losses = ", ".join(f"{k} {float(v):.3f}" for k, v in out.losses.items())
    fig.suptitle(f'"{sentence}"  (losses: {losses})', fontsize=11)
    fig.tight_layout()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}: {result}")


if __name__ == "__main__":
    main(sys.argv[1:])
