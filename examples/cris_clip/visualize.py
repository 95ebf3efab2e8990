"""Show what CM-MaskSD's two branches do on one sample.

    python examples/cris_clip/visualize.py --checkpoint runs/demo-masksd/best.pt --index 3 --out vis.png
    python examples/cris_clip/visualize.py --image photo.jpg --sentence "the dog" --out vis.png  # random init

Runs the wrapper's TRAINING forward once (BatchNorm and dropout in eval mode, masks drawn from
``--seed``) and draws:

* the input with the patches kept by correlation filtering (LMVSD, ``w_global · v_i`` top-K)
  outlined in yellow and the masked patches filled;
* the sentence's tokens: kept words (VMLSD, ``v_global · w_i`` top-K) in green, masked ones in
  red, the rest grey (SOT/EOT/padding are never selected);
* the ground truth (synthetic samples) and the main / LMVSD / VMLSD predictions side by side.

Architecture and branch settings come from the checkpoint (a ``--method masksd`` run); for a
baseline checkpoint or without ``--checkpoint`` they come from the flags below (paper defaults).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import engine
import numpy as np
import open_clip
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from model import build_model, wrap_model
from PIL import Image
from torch import nn
from transforms import CLIP_MEAN, CLIP_STD, Tokenizer, letterbox, letterbox_mask


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint of train.py (default: random init)")
    p.add_argument("--split", default="val", help="synthetic split of the sample (default val)")
    p.add_argument("--index", type=int, default=0, help="synthetic sample index (default 0)")
    p.add_argument("--image", default=None, help="your own image instead of a synthetic sample")
    p.add_argument("--sentence", default=None, help="sentence (required with --image; overrides the sample's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask draws (default 0)")
    p.add_argument("--out", default="visualize.png", help="output PNG")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    engine.add_model_args(p)
    return p


def build_wrapper(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """``(MaskedSelfDistill, meta)`` from the checkpoint (or the flags, random init)."""
    meta: dict[str, Any] = {"context_length": 17}
    if args.checkpoint is None:
        torch.manual_seed(0)
        bare = build_model(args.preset, image_size=args.image_size)
        return wrap_model(bare, **engine.wrapper_kwargs(args)).to(device), meta
    ckpt = engine.load_checkpoint(args.checkpoint)
    meta.update(ckpt.get("meta", {}))
    targs = engine.checkpoint_namespace(ckpt)
    bare = build_model(targs.preset, image_size=targs.image_size)
    cfg = targs if ckpt.get("method") == "masksd" else args
    wrapper = wrap_model(bare, **engine.wrapper_kwargs(cfg))
    if ckpt.get("method") == "masksd":
        wrapper.load_state_dict(ckpt["model"])
    else:
        bare.load_state_dict(engine.bare_state_dict(ckpt))
    return wrapper.to(device), meta


def load_sample(args: argparse.Namespace) -> tuple[np.ndarray, str, np.ndarray | None]:
    if args.image is not None:
        if args.sentence is None:
            raise SystemExit("--image needs --sentence")
        with Image.open(args.image) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), args.sentence, None
    from synthetic import generate_sample

    s = generate_sample(args.split, args.index)
    return s.image, args.sentence or s.sentence, s.mask


def token_strings(ids: list[int]) -> list[str]:
    tok = open_clip.get_tokenizer("ViT-B-16")
    sot, eot = getattr(tok, "sot_token_id", None), getattr(tok, "eot_token_id", None)
    out = []
    for i in ids:
        if i == sot:
            out.append("<sot>")
        elif i == eot:
            out.append("<eot>")
        else:
            out.append(tok.decode([i]).strip() or "·")
    return out


def draw_tokens(ax: Any, fig: Any, words: list[str], kept: list[bool], masked: list[bool]) -> None:
    """Tokens left to right as coloured boxes (red masked, green kept, grey otherwise)."""
    ax.set_axis_off()
    renderer = fig.canvas.get_renderer()
    x, y = 0.01, 0.55
    ax_width = ax.get_window_extent(renderer).width
    for word, k, m in zip(words, kept, masked):
        face, color = ("#d62728", "white") if m else (("#2ca02c", "white") if k else ("#dddddd", "#555555"))
        t = ax.text(x, y, word, transform=ax.transAxes, fontsize=13, color=color, va="center",
                    bbox=dict(boxstyle="round,pad=0.3", facecolor=face, edgecolor="none"))
        width = t.get_window_extent(renderer).width / ax_width
        x += width + 0.015
        if x > 0.95:
            x, y = 0.01, y - 0.45
    ax.text(0.01, 0.02, "VMLSD words: green = kept by correlation filtering, red = masked, "
            "grey = not selected (SOT/EOT/padding are never selected)", transform=ax.transAxes,
            fontsize=9, color="#333333")


def denormalize(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    wrapper, meta = build_wrapper(args, device)
    image, sentence, gt = load_sample(args)
    size = engine.model_image_size(wrapper.unwrap())
    x, info = letterbox(image, size)
    ids = Tokenizer(context_length=int(meta.get("context_length", 17)))([sentence])
    target = letterbox_mask(gt, info)[None] if gt is not None else torch.zeros(1, size, size)
    wrapper.train()
    for m in wrapper.modules():  # deterministic normalisation and no dropout
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        out = wrapper(x[None].to(device), ids.to(device), target.to(device), generator=generator)
    sel = out.selections

    shown = denormalize(x)
    panels: list[tuple[str, np.ndarray | None]] = []
    if gt is not None:
        panels.append(("ground truth", target[0].numpy()))
    panels.append(("main prediction", torch.sigmoid(out.logits.float())[0, 0].cpu().numpy()))
    for name in ("lmvsd", "vmlsd"):
        if name in sel:
            prob = torch.sigmoid(sel[name]["logits"].float())[0, 0].cpu().numpy()
            panels.append((f"{name.upper()} branch prediction", prob))
    ncols = 1 + len(panels)
    fig = Figure(figsize=(3.2 * ncols, 4.8))
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display backend
    grid = fig.add_gridspec(2, ncols, height_ratios=[4, 1.3])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(shown)
    result: dict[str, Any] = {"sentence": sentence}
    if "lmvsd" in sel:
        gh, gw = _grid(wrapper, x, device)
        kept, masked = sel["lmvsd"]["kept"][0].cpu(), sel["lmvsd"]["masked"][0].cpu()
        ph, pw = size / gh, size / gw
        for n in torch.nonzero(kept).flatten().tolist():
            r, c = divmod(n, gw)
            if masked[n]:
                ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, facecolor="#444444",
                                       alpha=0.85, edgecolor="yellow", linewidth=1.0))
            else:
                ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False,
                                       edgecolor="yellow", linewidth=1.0))
        ax.set_title(f"LMVSD: {int(kept.sum())}/{kept.numel()} patches kept\n(outlined), "
                     f"{int(masked.sum())} masked (filled)", fontsize=10)
        result["lmvsd"] = {"kept": int(kept.sum()), "masked": int(masked.sum()), "patches": kept.numel()}
    else:
        ax.set_title("input (LMVSD disabled)", fontsize=10)
    ax.set_axis_off()
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)  # maps at any resolution cover the input
    gt_map = target[0].numpy() if gt is not None else None
    for k, (title, data) in enumerate(panels, start=1):
        a = fig.add_subplot(grid[0, k])
        if title == "ground truth":
            a.imshow(shown * (0.3 + 0.7 * data[..., None]), extent=extent)
        else:
            a.imshow(data, cmap="magma", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
            if gt_map is not None:
                a.contour(gt_map, levels=[0.5], colors="cyan", linewidths=1.0)
            title += "\n(probability; cyan: ground truth)" if gt_map is not None else "\n(probability)"
        a.set_xlim(extent[0], extent[1])
        a.set_ylim(extent[2], extent[3])
        a.set_title(title, fontsize=10)
        a.set_axis_off()
    tax = fig.add_subplot(grid[1, :])
    id_list = ids[0].tolist()
    valid = [i for i, t in enumerate(id_list) if t != 0]
    words = token_strings([id_list[i] for i in valid])
    if "vmlsd" in sel:
        kept_t, masked_t = sel["vmlsd"]["kept"][0].cpu().tolist(), sel["vmlsd"]["masked"][0].cpu().tolist()
        draw_tokens(tax, fig, words, [kept_t[i] for i in valid], [masked_t[i] for i in valid])
        result["vmlsd"] = {"kept": [w for w, i in zip(words, valid) if kept_t[i]],
                           "masked": [w for w, i in zip(words, valid) if masked_t[i]]}
    else:
        draw_tokens(tax, fig, words, [False] * len(words), [False] * len(words))
    fig.suptitle(f'"{sentence}"  (losses: ' + ", ".join(f"{k} {float(v):.3f}" for k, v in out.losses.items())
                 + ")", fontsize=11)
    fig.tight_layout()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}: {result}")
    result["out"] = str(path)
    return result


def _grid(wrapper: nn.Module, x: torch.Tensor, device: torch.device) -> tuple[int, int]:
    """Patch grid ``(gh, gw)`` of the image tower for input ``x``."""
    with torch.no_grad():
        embedded = wrapper.unwrap().image_tower.embed(x[None].to(device))
    grid = embedded.extras.get("grid")
    if grid is None:
        n = embedded.tokens.shape[1]
        side = int(round(n**0.5))
        grid = (side, side)
    return int(grid[0]), int(grid[1])


if __name__ == "__main__":
    main(sys.argv[1:])
