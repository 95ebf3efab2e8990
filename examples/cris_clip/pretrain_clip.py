"""Contrastive pretraining of the demo CLIP on captioned synthetic scenes (issue 8, item 1).

    python examples/cris_clip/pretrain_clip.py --preset demo           # ≤ 15 min on 2 CPU cores
    python examples/cris_clip/train.py --preset demo \\
        --pretrained runs/pretrain-clip/open_clip_pytorch_model.bin
    python examples/cris_clip/pretrain_clip.py --preset v2   # world v2, dense terms (pretrain_dense.py)

The CLIP is ``model.MODEL_CONFIGS[--model].clip_cfg`` at that config's image size, built as
``model.build_model`` builds it. Step ``s`` trains on the fresh scenes ``s * batch_size + i`` of the
caption world (``captions.py``): the run is a function of the settings alone and resumes exactly.
Loss: CLIP's InfoNCE on the global features + ``--token-weight`` × the same on a word–patch
late-interaction score (ColBERT's MaxSim, FILIP's text→image half) over the projected tokens that
masksd scores (``ln_post(x) @ proj``, ``ln_final(x) @ text_projection``); no parameter is added.
AdamW as open_clip (β 0.9/0.98, ε 1e-6, no decay on gains, biases, temperature), warm-up + cosine.

Written to ``--out``: ``last.pt`` (resume; weights under ``state_dict`` as open_clip's training
checkpoints), ``open_clip_pytorch_model.bin`` + ``open_clip_config.json`` (open_clip's hub layout:
``open_clip.create_model("local-dir:<out>")``, ``open_clip.load_checkpoint(clip, <file>)``,
``train.py --pretrained <file>``) and ``metrics.json``. Held-out evaluation (the caption world's val
stream, the referring val split): retrieval recall@1/5 both ways among ``--val-scenes`` captions;
for each size/colour/shape word, the share of its best patches' pixels on the object it names
against that object's area share (chance); for referring sentences, the target's share of the top
50 % patches by ``sentence · patch`` (LMVSD's correlation filtering at the paper's TopK).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pretrain_dense as dense
import torch
import torch.nn.functional as F
from captions import CaptionSample, caption_sample
from data import CLIP_MEAN, CLIP_STD, letterbox
from einops import einsum
from model import MODEL_CONFIGS, ModelConfig
from pretrain_metrics import coverage, hits, mean_of, recall
from synthetic import generate_sample
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from world_v2 import generate_sample as generate_sample_v2

from masksd.adapters.open_clip import towers_from_open_clip
from masksd.towers import Encoded


def _help(text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Every setting; the fields with a help text are flags (``token_weight`` → ``--token-weight``)."""

    preset: str = "demo"
    model: str = _help("architecture: the clip_cfg and image size of model.MODEL_CONFIGS[model]", "demo")
    steps: int = _help("optimisation steps (the schedule's length)", 900)
    batch_size: int = _help("scenes per step (the contrastive batch)", 128)
    lr: float = _help("peak learning rate", 2e-3)
    weight_decay: float = _help("AdamW weight decay (not on gains, biases, the temperature)", 0.1)
    warmup_steps: int = _help("linear warm-up steps before the cosine decay", 50)
    min_lr_ratio: float = _help("final lr as a fraction of the peak", 0.05)
    token_weight: float = _help("weight of the word-patch MaxSim loss (0: CLIP's loss alone)", 1.0)
    world: str = _help("v1: captions.py, synthetic.py (demo); v2: world_v2.py, pretrain_dense.py", "v1")
    dense_weight: float = _help("v2: weight of the dense sentence/word-to-patch terms on the masks", 0.0)
    seed: int = _help("seed of the initial weights and of the caption world", 0)
    train_scenes: int | None = _help("cycle through this many training scenes (none: fresh scenes)")
    val_scenes: int = _help("held-out captioned scenes for retrieval (and --align-scenes)", 1000)
    align_scenes: int = _help("held-out scenes whose caption words score the patch-word alignment", 500)
    refer_samples: int = _help("referring val samples scoring the sentence-patch selection", 200)
    eval_interval: int = _help("steps between evaluations (and checkpoints)", 300)
    log_interval: int = _help("steps between loss reads", 25)
    out: str = _help("output folder", "runs/pretrain-clip")
    resume: str | None = _help("checkpoint to continue from, or 'auto' for <out>/last.pt if it exists")
    max_steps: int | None = _help("stop after this many steps in total (the schedule still spans --steps)")
    workers: int = _help("DataLoader worker processes drawing the scenes", 1)
    progress: bool = _help("tqdm progress bar (only when stderr is a terminal)", True)
    threads: int | None = _help("torch CPU threads (none: torch's default; 1 is faster on a busy machine)")


RUN_FIELDS = ("out", "resume", "max_steps", "workers", "progress", "threads", "eval_interval", "log_interval",
              "val_scenes", "align_scenes", "refer_samples")  # may change when resuming
PRESETS: dict[str, PretrainConfig] = {
    # 12.8 min on 2 CPU cores shared with other jobs (median load 3.4): one for torch, one for the scenes
    "demo": PretrainConfig(threads=1),
    "v2": PretrainConfig(preset="v2", model="v2", world="v2", dense_weight=1.0, steps=1500, eval_interval=250,
                         threads=1, workers=0,
                         out="runs/pretrain-clip-v2"),  # world v2: 96 px, dense alignment (issue 16)
    "smoke": PretrainConfig(preset="smoke", steps=20, batch_size=32, val_scenes=128, align_scenes=64,
                            refer_samples=32, eval_interval=10, log_interval=5,
                            out="runs/pretrain-clip-smoke"),
}


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    """The chosen preset with the given flags applied."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    base = PRESETS[pre.parse_known_args(argv)[0].preset]
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=base.preset, help="demo: ≤ 15 min on 2 "
                        "CPU cores; smoke: seconds (the defaults shown are the chosen preset's)")
    hints = typing.get_type_hints(PretrainConfig)
    for f in dataclasses.fields(PretrainConfig):
        if "help" in f.metadata:
            kind = next(a for a in typing.get_args(hints[f.name]) if a is not type(None)) \
                if typing.get_origin(hints[f.name]) is not None else hints[f.name]
            kwargs: dict[str, Any] = ({"action": argparse.BooleanOptionalAction} if kind is bool
                                      else {"type": kind})
            parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                                help=f"{f.metadata['help']} (default: {getattr(base, f.name)})", **kwargs)
    return replace(base, **{k: v for k, v in vars(parser.parse_args(argv)).items() if k != "preset"})


# ----------------------------------------------------------------------------------------- data
class CaptionStream(Dataset):
    """Item ``i`` = scene ``i`` (or ``i mod scenes``) of a caption split: ``(image [3,S,S], ids [L])``,
    the image letterboxed as the RIS model's input (``data.letterbox``)."""

    def __init__(self, split: str, *, seed: int, size: int, context_length: int, scenes: int | None = None):
        self.split, self.seed, self.size, self.scenes = split, seed, size, scenes
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=context_length)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        s = caption_sample(self.split, index % self.scenes if self.scenes else index, seed=self.seed,
                           image_size=self.size)
        return letterbox(s.image, self.size)[0], self.tokenizer([s.caption.text])[0]


# ------------------------------------------------------------------------------------ model, loss
def make_clip(config: ModelConfig) -> nn.Module:
    """The open_clip CLIP of ``config`` exactly as ``model.build_model`` creates it (random init)."""
    vision = dict(config.clip_cfg["vision_cfg"], image_size=config.image_size)
    return open_clip.CLIP(**dict(config.clip_cfg, vision_cfg=vision))


def word_mask(ids: Tensor, tokenizer: Any) -> Tensor:
    """bool ``[B, L]``: the caption's words (not SOT, EOT or padding)."""
    return (ids != 0) & (ids != tokenizer.sot_token_id) & (ids != tokenizer.eot_token_id)


def contrastive(logits: Tensor) -> Tensor:
    """Symmetric InfoNCE of ``logits [B, B]`` (row i: image i, column j: caption j)."""
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def maxsim(patches: Tensor, words: Tensor, mask: Tensor) -> Tensor:
    """Late-interaction score of every image with every caption (ColBERT's MaxSim, FILIP's
    text→image direction): the mean over the caption's words of the word's best patch.

    ``patches [B, N, D]``, ``words [B, L, D]`` (unit vectors), ``mask [B, L]`` (the words) →
    ``[B_image, B_caption]``. Only the words are scored (packed, ``W`` = their number)."""
    owner = torch.arange(len(mask), device=mask.device)[:, None].expand_as(mask)[mask]  # [W]
    best = einsum(patches, words[mask], "i n d, w d -> i w n").amax(dim=-1)  # [B, W]
    onehot = F.one_hot(owner, len(mask)).to(best.dtype)  # [W, B]
    return best @ onehot / onehot.sum(0).clamp(min=1)


def losses(
    image: Encoded, text: Encoded, mask: Tensor, scale: Tensor, token_weight: float
) -> dict[str, Tensor]:
    """``{"loss", "clip", "token"}``: CLIP's loss on the global features ``[B, D]``, MaxSim's on the
    patch tokens ``[B, N, D]`` and the word tokens ``[B, L, D]`` (``mask [B, L]``: the words)."""
    img, txt = F.normalize(image.global_feature, dim=-1), F.normalize(text.global_feature, dim=-1)
    out = {"clip": contrastive(scale * img @ txt.T)}
    if token_weight:
        out["token"] = contrastive(scale * maxsim(F.normalize(image.tokens, dim=-1),
                                                  F.normalize(text.tokens, dim=-1), mask))
    out["loss"] = out["clip"] + token_weight * out.get("token", 0.0)
    return out


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------- evaluation
def encode(towers: tuple[nn.Module, nn.Module], images: Tensor, ids: Tensor) -> tuple[Encoded, Encoded]:
    """Image and text features of ``images [B, 3, S, S]`` and ``ids [B, L]`` (masksd's towers)."""
    return towers[0].encode(towers[0].embed(images)), towers[1].encode(towers[1].embed(ids))


def part(x: Encoded, i: int, j: int) -> Encoded:
    """Samples ``i:j`` of the tokens and global features."""
    return Encoded(tokens=x.tokens[i:j], global_feature=x.global_feature[i:j])


@torch.no_grad()
def evaluate(clip: nn.Module, towers: tuple[nn.Module, nn.Module], tokenizer: Any, cfg: PretrainConfig,
             val: list[CaptionSample], refer: list[Any], size: int) -> dict[str, Any]:
    """Held-out loss, retrieval, patch-word alignment and sentence-patch selection (module docstring)."""
    clip.eval()
    texts = [s.caption.text for s in val]
    ids = tokenizer(texts)
    image, text = encode(towers, torch.stack([letterbox(s.image, size)[0] for s in val]), ids)
    scale, mask = clip.logit_scale.exp(), word_mask(ids, tokenizer)
    b = min(cfg.batch_size, len(val))
    chunks = [losses(part(image, i, i + b), part(text, i, i + b), mask[i:i + b], scale, cfg.token_weight)
              for i in range(0, len(val) - b + 1, b)]
    sim = F.normalize(image.global_feature, dim=-1) @ F.normalize(text.global_feature, dim=-1).T
    same = torch.tensor([[a == c for c in texts] for a in texts])
    grid = int(math.isqrt(image.tokens.shape[1]))
    words: dict[str, list[dict[str, float]]] = {"size": [], "colour": [], "shape": []}
    for n, s in enumerate(val[:cfg.align_scenes]):
        cover = coverage(s.labels, grid, len(s.objects))
        on_objects = cover.sum(0)
        starts = np.cumsum([1] + [len(tokenizer.encode(w)) for w in s.caption.text.split()])  # word → token
        for m in s.caption.mentions:
            words[m.role].append(hits(image.tokens[n] @ text.tokens[n, starts[m.word]], cover[m.obj],
                                      on_objects))
    image_r, text_r = encode(towers, torch.stack([letterbox(r.image, size)[0] for r in refer]),
                             tokenizer([r.sentence for r in refer]))
    selection = []
    for n, r in enumerate(refer):
        others = (r.image != r.image[0, 0]).any(-1) & ~r.mask  # the other objects (corners are background)
        cover, other = coverage(np.where(r.mask, 0, np.where(others, 1, -1)), grid, 2)  # shares of each patch
        scores = image_r.tokens[n] @ text_r.global_feature[n]
        kept = scores.topk(len(scores) // 2).indices
        selection.append({**hits(scores, cover, cover + other), "precision": cover[kept].mean().item(),
                          "recall": (cover[kept].sum() / cover.sum()).item(),
                          "recall_other_objects": (other[kept].sum() / other.sum()).item()})
    clip.train()
    return {
        "val_loss": {k: float(np.mean([c[k].item() for c in chunks])) for k in chunks[0]} if chunks else {},
        "retrieval": {"image_to_text": recall(sim, same), "text_to_image": recall(sim.T, same.T),
                      "candidates": len(val)},
        "word_patch": {**{role: mean_of(rows) for role, rows in words.items()},
                       "all": mean_of([r for rows in words.values() for r in rows])},
        "sentence_patch": {**mean_of(selection), "top_k": 0.5, "random_recall": 0.5},
        "temperature": 1 / scale.item(),
    }


# ------------------------------------------------------------------------------------ checkpoints
def save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename (a crash never leaves a truncated file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export(clip: nn.Module, config: ModelConfig, out: Path) -> Path:
    """open_clip's hub layout in ``out``: ``open_clip_pytorch_model.bin`` + ``open_clip_config.json``."""
    model_cfg = dict(config.clip_cfg,
                     vision_cfg=dict(config.clip_cfg["vision_cfg"], image_size=config.image_size))
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}, indent=2) + "\n")
    save(clip.state_dict(), out / "open_clip_pytorch_model.bin")
    return out / "open_clip_pytorch_model.bin"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mcfg, progress = MODEL_CONFIGS[cfg.model], cfg.progress and sys.stderr.isatty()
    size, context = mcfg.image_size, mcfg.clip_cfg["text_cfg"]["context_length"]
    clip = make_clip(mcfg)
    towers = towers_from_open_clip(clip)  # share clip's parameters; give the tokens masksd scores
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=context)
    no_decay = [p for n, p in clip.named_parameters()
                if p.ndim < 2 or "ln" in n or "bias" in n or "logit_scale" in n]
    decay = [p for p in clip.parameters() if all(p is not q for q in no_decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    state: dict[str, Any] = {"step": 0, "history": [], "evals": [], "seconds": 0.0}

    resume = out / "last.pt" if cfg.resume == "auto" else (Path(cfg.resume) if cfg.resume else None)
    if resume is not None and resume.is_file():
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        changed = {k: (v, getattr(cfg, k)) for k, v in ckpt["config"].items()
                   if k not in RUN_FIELDS and v != getattr(cfg, k)}
        if changed:
            raise SystemExit(f"--resume {resume}: settings differ from the checkpoint's: {changed}")
        clip.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        started -= state["seconds"]  # the wall time counts every session
        print(f"resumed from {resume} at step {state['step']}", flush=True)
    elif resume is not None and cfg.resume != "auto":
        raise SystemExit(f"--resume {resume}: no such file")

    captioned, referring = ((dense.caption_sample, generate_sample_v2) if cfg.world == "v2"
                            else (caption_sample, generate_sample))
    val = [captioned("val", i, seed=cfg.seed, image_size=size) for i in range(cfg.val_scenes)]
    refer = [referring("val", i, image_size=size) for i in range(cfg.refer_samples)]
    run_eval = lambda: evaluate(clip, towers, tokenizer, cfg, val, refer, size)  # noqa: E731

    def checkpoint() -> None:
        state["seconds"] = time.perf_counter() - started
        save({"state_dict": clip.state_dict(), "optimizer": optimizer.state_dict(),
              "scheduler": scheduler.state_dict(), "state": state, "config": asdict(cfg)}, out / "last.pt")

    def report(e: dict[str, Any]) -> str:
        r, w, s = e["retrieval"], e["word_patch"]["all"], e["sentence_patch"]
        return (f"step {e['step']:>5} | val loss {e['val_loss'].get('loss', math.nan):.3f} | R@1/R@5 i→t "
                f"{r['image_to_text']['r@1']:.3f}/{r['image_to_text']['r@5']:.3f} "
                f"t→i {r['text_to_image']['r@1']:.3f}/{r['text_to_image']['r@5']:.3f} | "
                f"word→patch top-1 {w['top1']:.3f} (chance {w['chance']:.3f}) | "
                f"sentence top-50% precision {s['precision']:.3f} (chance {s['chance']:.3f})")

    print(f"pretraining the {cfg.model} CLIP "
          f"({sum(p.numel() for p in clip.parameters()) / 1e6:.2f} M parameters, "
          f"{size}px): {cfg.steps} steps × {cfg.batch_size} fresh scenes, lr {cfg.lr:g}, token weight "
          f"{cfg.token_weight:g}; load average {load_start[0]:.2f} on {os.cpu_count()} cores", flush=True)
    if not state["evals"]:
        state["evals"].append({"step": 0, **run_eval()})
        print(report(state["evals"][-1]), flush=True)

    stop = min(cfg.steps, cfg.max_steps or cfg.steps)
    stream = (dense.DenseCaptionStream("train", seed=cfg.seed, size=size, context_length=context,
                                       scenes=cfg.train_scenes,
                                       grid=size // mcfg.clip_cfg["vision_cfg"]["patch_size"])
              if cfg.world == "v2"
              else CaptionStream("train", seed=cfg.seed, size=size, context_length=context,
                                 scenes=cfg.train_scenes))
    loader = DataLoader(stream, batch_size=cfg.batch_size, sampler=range(state["step"] * cfg.batch_size,
                        stop * cfg.batch_size), num_workers=cfg.workers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=stop, initial=state["step"], desc="pretrain", dynamic_ncols=True)
    clip.train()
    sums, count, tick = None, 0, time.perf_counter()
    for images, ids, *targets in loader:  # v2: + the dense targets
        image, text = encode(towers, images, ids)
        terms = losses(image, text, word_mask(ids, tokenizer), clip.logit_scale.exp(), cfg.token_weight)
        terms = dense.with_dense(terms, image, text, targets, clip.logit_scale.exp(), cfg.dense_weight)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        detached = {k: v.detach() for k, v in terms.items()}
        sums = detached if sums is None else {k: sums[k] + v for k, v in detached.items()}
        count += 1
        state["step"] += 1
        if bar is not None:
            bar.update(1)
        if state["step"] % cfg.log_interval == 0 or state["step"] == stop:
            means = {k: v.item() / count for k, v in sums.items()}
            if not math.isfinite(means["loss"]):
                raise FloatingPointError(f"non-finite loss by step {state['step']}: {means}")
            state["history"].append({"step": state["step"], **{k: round(v, 5) for k, v in means.items()},
                                     "lr": optimizer.param_groups[0]["lr"],
                                     "seconds_per_step": round((time.perf_counter() - tick) / count, 4)})
            if bar is not None:
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)
            else:
                print(f"step {state['step']:>5} | " + " ".join(f"{k} {v:.4f}" for k, v in means.items()),
                      flush=True)
            sums, count, tick = None, 0, time.perf_counter()
        if state["step"] % cfg.eval_interval == 0 or state["step"] == stop:
            if state["step"] != state["evals"][-1]["step"]:
                state["evals"].append({"step": state["step"], **run_eval()})
                (bar.write if bar is not None else print)(report(state["evals"][-1]))
            checkpoint()
    if bar is not None:
        bar.close()
    if state["step"] < cfg.steps:  # --max-steps: the checkpoint is there, the run is not finished
        return {"step": state["step"]}

    weights = export(clip, mcfg, out)
    history = state["history"]
    metrics = {
        "preset": cfg.preset, "config": asdict(cfg), "step": state["step"], "final": state["evals"][-1],
        "initial": state["evals"][0], "evals": state["evals"], "history": history,
        "loss": {"first": history[0]["loss"], "last": history[-1]["loss"]} if history else {},
        "wall_time_s": round(time.perf_counter() - started, 1),  # all sessions, evaluations included
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "weights": str(weights), "open_clip_config": str(out / "open_clip_config.json"),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wall time {metrics['wall_time_s']:.0f} s; wrote {weights} (train.py --pretrained {weights}), "
          f"{out / 'open_clip_config.json'}, {out / 'metrics.json'}", flush=True)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
