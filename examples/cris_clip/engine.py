"""Training and evaluation machinery shared by ``train.py``, ``evaluate.py``, ``predict.py`` and
``visualize.py`` (the scripts stay short; everything testable lives here).

* data: :func:`build_dataset` (synthetic | refcoco | refcoco+ | refcocog), :func:`train_loader`
  (a :class:`ResumableDistributedSampler`: shuffled by ``seed + epoch``, sharded over ranks,
  able to start mid-epoch), :func:`eval_loader` (rank-strided shards, no padding duplicates);
* distributed: :func:`setup_distributed` reads torchrun's environment (gloo on CPU, nccl on
  GPU; a no-op for a single process);
* optimisation: :func:`build_optimizer` (Adam, backbone parameters at ``lr × backbone_lr_mult``
  as CRIS), :func:`build_scheduler` (per-step linear warm-up then cosine decay),
  :func:`train_one_epoch` (AMP bf16/fp16, tqdm on rank 0);
* evaluation: :func:`evaluate` (sigmoid → back to the original image size → threshold 0.35 →
  ``masksd.metrics.RISMetrics``, all-reduced over ranks; optionally at the model resolution),
  :func:`trivial_scores` (all-background and whole-image predictors);
* checkpoints: :func:`atomic_save` (temp file + ``os.replace``), :func:`make_checkpoint`,
  :func:`load_checkpoint`, :func:`load_bare_model`.

Reproducibility and exact resume: before every optimisation step the global torch RNG is
re-seeded from ``(seed, rank, global_step)`` (:func:`seed_step`), which fixes the masks drawn by
the wrapper and any dropout; the data order depends only on ``(seed, epoch)``; a checkpoint
records ``(epoch, step_in_epoch, global_step)`` and the sampler restarts at that position. A run
stopped after step ``k`` and resumed therefore takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from model import PRESETS, build_model, wrap_model
from synthetic import SyntheticReferDataset
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from transforms import MAX_LEN, PreparedDataset, Tokenizer, collate, unletterbox

from masksd import LMVSDConfig, MaskedSelfDistill, RISModel, VMLSDConfig, segmentation_loss
from masksd.metrics import RISMetrics

DATASETS: tuple[str, ...] = ("synthetic", "refcoco", "refcoco+", "refcocog")
EVAL_THRESHOLD = 0.35  # CRIS: sigmoid map binarised at 0.35 after warping back to the image
PERCENT_KEYS: tuple[str, ...] = ("miou", "oiou", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9")

# Per-preset defaults for flags left unset. demo: tuned on the synthetic *val* split to finish in
# about 6 minutes on 2 CPU cores (2000 steps of 16; 8000 training sentences instead of the
# synthetic default 4000 because 4000 × 10 epochs overfits: val mIoU 30.5 vs 37.5 for the same
# compute; lr 2e-3 / 3e-3 / 4e-3 / 5e-3 gave 33.1 / 36.7 / 37.5 / 37.2); vitb16 / vitl14: the
# paper's recipe (Sec. IV-B).
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "demo": dict(epochs=4, batch_size=16, lr=4e-3, weight_decay=0.0, warmup_epochs=0.25, num_train=8000),
    "vitb16": dict(epochs=100, batch_size=32, lr=1e-5, weight_decay=5e-4, warmup_epochs=10),
    "vitl14": dict(epochs=100, batch_size=32, lr=1e-5, weight_decay=5e-4, warmup_epochs=10),
}


# ============================================================================ distributed
@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_distributed(device: str = "auto") -> DistEnv:
    """Initialise ``torch.distributed`` from torchrun's variables (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): NCCL on GPUs, gloo on CPU. A single process
    (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) initialises nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", 0)
        return DistEnv(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_buffers(module: nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last step they differ
    between ranks; evaluation and checkpoints use rank 0's."""
    if env.distributed:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def broadcast_state(module: nn.Module, env: DistEnv) -> None:
    """Copy rank 0's parameters and buffers to every rank (e.g. after rank 0 loaded a file)."""
    if env.distributed:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def unwrap_ddp(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def bare_model(module: nn.Module) -> RISModel:
    """The bare ``RISModel`` inside a (DDP-wrapped) ``MaskedSelfDistill`` or bare model."""
    module = unwrap_ddp(module)
    return module.unwrap() if isinstance(module, MaskedSelfDistill) else module  # type: ignore[return-value]


def rank_print(env: DistEnv, *args: Any, **kwargs: Any) -> None:
    if env.is_main:
        print(*args, **kwargs, flush=True)


# =================================================================================== data
def add_data_args(parser: Any, *, training: bool = True) -> None:
    """Dataset flags shared by the scripts."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=None if not training else "synthetic",
                   help="synthetic (generated offline, default) or a refer-format dataset under "
                        "--data-root" + ("" if training else " (default: the checkpoint's)"))
    g.add_argument("--data-root", default=None,
                   help="folder holding <dataset>/refs(<split_by>).p and <dataset>/instances.json "
                        "(see examples/cris_clip/refer.py for where to get them)")
    g.add_argument("--image-root", default=None,
                   help="folder of COCO train2014 images (default: searched under --data-root)")
    g.add_argument("--split-by", default=None,
                   help="refer split scheme: unc (refcoco/refcoco+), umd or google (refcocog)")
    if training:
        g.add_argument("--num-train", type=int, default=None,
                       help="synthetic: number of training samples (default 8000 for the demo "
                            "preset, else the generator's 4000)")
    g.add_argument("--num-val", type=int, default=None,
                   help="synthetic: number of samples of each evaluation split (val/test/"
                        "compositional; default 500)")
    g.add_argument("--synthetic-seed", type=int, default=None,
                   help="seed of the synthetic data generator (default 0); independent of --seed")
    g.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes per rank (0 = load in the main process, "
                        "fastest on a 2-core CPU)")


def default_eval_splits(dataset: str) -> list[str]:
    """Splits validated every epoch (the first one selects the best checkpoint)."""
    return ["val"]


def default_test_splits(dataset: str) -> list[str]:
    """Splits evaluated once at the end with the best checkpoint."""
    return {"synthetic": ["test", "compositional"], "refcoco": ["testA", "testB"],
            "refcoco+": ["testA", "testB"], "refcocog": ["test"]}[dataset]


def raw_dataset(
    dataset: str,
    split: str,
    *,
    data_root: str | None = None,
    image_root: str | None = None,
    split_by: str | None = None,
    num_samples: int | None = None,
    synthetic_seed: int | None = None,
) -> Dataset:
    """The raw ``{image, mask, sentence, id}`` dataset of one split."""
    if dataset == "synthetic":
        return SyntheticReferDataset(split, num_samples=num_samples, seed=synthetic_seed or 0)
    from refer import ReferDataset  # pycocotools is only needed for the real datasets

    if data_root is None:
        raise ValueError(f"--dataset {dataset} needs --data-root (the folder holding {dataset}/)")
    return ReferDataset(data_root, dataset=dataset, split_by=split_by, split=split, image_root=image_root)


def context_length(dataset: str) -> int:
    """Max sentence length incl. SOT/EOT (paper: 17 for RefCOCO/+, 22 for G-Ref)."""
    return MAX_LEN[dataset]


def build_dataset(args: Any, split: str, *, image_size: int, tokenizer: Tokenizer) -> PreparedDataset:
    """Model-ready dataset of ``split`` from the data flags in ``args``."""
    n = getattr(args, "num_train", None) if split == "train" else args.num_val
    base = raw_dataset(args.dataset, split, data_root=args.data_root, image_root=args.image_root,
                       split_by=args.split_by, num_samples=n, synthetic_seed=args.synthetic_seed)
    return PreparedDataset(base, image_size=image_size, tokenizer=tokenizer)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed + epoch``, equal shards, tail dropped) that can
    start mid-epoch: ``set_epoch(epoch, start=k)`` skips this rank's first ``k`` indices, so a
    resumed run sees exactly the samples an uninterrupted run would."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class ShardSampler(Sampler[int]):
    """Evaluation shard ``rank::world`` in order (no padding: every sample counted once)."""

    def __init__(self, length: int, *, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(dataset: Dataset, *, batch_size: int, env: DistEnv, seed: int, workers: int) -> DataLoader:
    sampler = ResumableDistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=True, pin_memory=env.device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset: Dataset, *, batch_size: int, env: DistEnv, workers: int) -> DataLoader:
    sampler = ShardSampler(len(dataset), rank=env.rank, world_size=env.world_size)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=env.device.type == "cuda")


def steps_per_epoch(loader: DataLoader) -> int:
    """Optimisation steps in one full epoch on this rank."""
    sampler = loader.sampler
    assert isinstance(sampler, ResumableDistributedSampler)
    return sampler.num_samples // int(loader.batch_size)  # type: ignore[arg-type]


# ================================================================================= model
def add_model_args(parser: Any) -> None:
    """Model and CM-MaskSD flags (``--method``, per-branch settings, ablations)."""
    g = parser.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="demo: tiny random-init CLIP for CPU; vitb16 / vitl14: the paper's backbones")
    g.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (e.g. openai) or a local checkpoint file for "
                        "vitb16/vitl14 (default: random init)")
    g.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels (default: the preset's: 64 demo, 480 vitb16/vitl14; "
                        "the paper's main table uses 576)")
    g.add_argument("--method", choices=("masksd", "baseline"), default="masksd",
                   help="masksd: wrap the model with MaskedSelfDistill (LMVSD+VMLSD); baseline: the "
                        "bare model trained with the segmentation BCE only")
    d_l, d_v = LMVSDConfig(), VMLSDConfig()
    for name, full, d in (("lmvsd", "language-guided masked visual", d_l),
                          ("vmlsd", "visual-guided masked language", d_v)):
        g.add_argument(f"--{name}", action=argparse_bool(), default=True,
                       help=f"enable the {name.upper()} branch ({full} self-distillation)")
        g.add_argument(f"--{name}-top-k", type=float, default=d.top_k,
                       help=f"{name.upper()}: fraction of tokens kept by correlation filtering "
                            f"(default {d.top_k})")
        g.add_argument(f"--{name}-ratio", type=float, default=d.ratio,
                       help=f"{name.upper()}: fraction α of the kept tokens that are masked "
                            f"(default {d.ratio})")
        g.add_argument(f"--{name}-weight", type=float, default=d.weight,
                       help=f"{name.upper()}: loss weight λ (default {d.weight})")
    g.add_argument("--no-masking", action="store_true",
                   help="ablation (paper Table V): the branches re-encode unmasked tokens")
    g.add_argument("--supervision", choices=("distill", "ground_truth"), default="distill",
                   help="targets of the branches: the main prediction (paper) or the ground truth "
                        "(Table VI ablation)")
    g.add_argument("--unshared-decoder", action="store_true",
                   help="ablation (Table VII): each branch gets its own copy of the decoder")
    g.add_argument("--hard-targets", action="store_true",
                   help="binarise the teacher prediction at 0.5 instead of soft probabilities")


def argparse_bool() -> Any:
    import argparse

    return argparse.BooleanOptionalAction


def wrapper_kwargs(args: Any) -> dict[str, Any]:
    """``MaskedSelfDistill`` keyword arguments from the model flags."""
    masking = not getattr(args, "no_masking", False)
    lmvsd = LMVSDConfig(top_k=args.lmvsd_top_k, ratio=args.lmvsd_ratio, weight=args.lmvsd_weight,
                        masking=masking) if args.lmvsd else None
    vmlsd = VMLSDConfig(top_k=args.vmlsd_top_k, ratio=args.vmlsd_ratio, weight=args.vmlsd_weight,
                        masking=masking) if args.vmlsd else None
    return dict(lmvsd=lmvsd, vmlsd=vmlsd, supervision=args.supervision,
                share_decoder=not args.unshared_decoder, hard_targets=args.hard_targets)


def build_training_model(args: Any, *, pretrained: str | None = None) -> tuple[RISModel, nn.Module]:
    """``(bare, trained)``: the bare model and what the loss is computed with (the
    ``MaskedSelfDistill`` wrapper for ``--method masksd``, the bare model for ``baseline``)."""
    bare = build_model(args.preset, pretrained=pretrained, image_size=args.image_size)
    if args.method == "baseline":
        return bare, bare
    return bare, wrap_model(bare, **wrapper_kwargs(args))


def model_image_size(model: nn.Module) -> int:
    """Input side of the reference model (bare or wrapped)."""
    preset = getattr(model, "preset", None)
    if preset is not None:
        return int(preset.image_size)
    size = bare_model(model).image_tower.visual.image_size  # open_clip ViT: int or (h, w)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ========================================================================== optimisation
def build_optimizer(
    module: nn.Module, bare: RISModel, *, lr: float, weight_decay: float, backbone_lr_mult: float
) -> torch.optim.Adam:
    """Adam with two groups: the CLIP towers at ``lr × backbone_lr_mult`` (CRIS: 0.1 for a
    pretrained backbone), everything else (head, mask tokens) at ``lr``."""
    backbone_ids = {id(p) for tower in (bare.image_tower, bare.text_tower) for p in tower.parameters()}
    backbone, head = [], []
    for p in module.parameters():
        if p.requires_grad:
            (backbone if id(p) in backbone_ids else head).append(p)
    groups = [
        {"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"},
        {"params": head, "lr": lr, "name": "head"},
    ]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """LR factor for step ``s`` (0-based): linear warm-up ``(s+1)/warmup`` over ``warmup_steps``,
    then cosine decay from 1 to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (``scheduler.step()`` after every optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps, min_ratio))


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in ``bf16 | fp16 | none``."""
    if amp == "none":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A ``GradScaler`` that is active for fp16 only."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, rank: int, global_step: int) -> None:
    """Re-seed torch's global RNG for one optimisation step (masks, dropout): the draws of
    step ``global_step`` on ``rank`` do not depend on what ran before (exact resume)."""
    torch.manual_seed((seed * 1_000_003 + rank * 10_007 + global_step * 7_919 + 12_345) % 2**63)


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint."""

    epoch: int = 0  # current epoch (0-based); == epochs when training finished
    step_in_epoch: int = 0  # optimisation steps already taken in ``epoch``
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int | None = None  # 1-based epoch of the best validation score
    history: list[dict[str, Any]] = field(default_factory=list)


def train_one_epoch(
    module: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    *,
    env: DistEnv,
    method: str,
    seed: int,
    amp: str = "none",
    max_steps: int | None = None,
    grad_clip: float | None = None,
    progress: bool = True,
    epochs: int | None = None,
) -> dict[str, float]:
    """Run the rest of epoch ``state.epoch`` (from ``state.step_in_epoch``), stopping early at
    ``max_steps`` global steps. Updates ``state`` and returns the mean loss terms on this rank
    (``seg`` and, for masksd, ``lmvsd``/``vmlsd``) plus ``steps`` and ``seconds``."""
    module.train()
    sampler = loader.sampler
    assert isinstance(sampler, ResumableDistributedSampler)
    sampler.set_epoch(state.epoch, start=state.step_in_epoch * int(loader.batch_size))  # type: ignore[arg-type]
    remaining = len(loader)
    if max_steps is not None:
        remaining = max(0, min(remaining, max_steps - state.global_step))
    sums: dict[str, float] = {}
    steps, start = 0, time.perf_counter()
    bar = None
    if progress and env.is_main and remaining:
        from tqdm import tqdm

        total_label = f"/{epochs}" if epochs else ""
        bar = tqdm(total=remaining, desc=f"epoch {state.epoch + 1}{total_label}", leave=False,
                   dynamic_ncols=True, mininterval=1.0)
    device = env.device
    for batch in loader:
        if steps >= remaining:
            break
        seed_step(seed, env.rank, state.global_step)
        images = batch["image"].to(device, non_blocking=True)
        texts = batch["text"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        with autocast(device, amp):
            if method == "masksd":
                out = module(images, texts, masks)
                loss, terms = out.loss, out.losses
            else:
                logits = module(images, texts)
                loss = segmentation_loss(logits, masks)
                terms = {"seg": loss.detach()}
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.global_step += 1
        state.step_in_epoch += 1
        steps += 1
        values = {k: float(v) for k, v in terms.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"non-finite loss at step {state.global_step}: {values}")
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}
                            | {"lr": f"{optimizer.param_groups[-1]['lr']:.2e}"}, refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    if state.step_in_epoch >= steps_per_epoch(loader):
        state.epoch += 1
        state.step_in_epoch = 0
    means = {k: v / max(1, steps) for k, v in sums.items()}
    means.update(steps=float(steps), seconds=time.perf_counter() - start)
    return means


# ============================================================================ evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    amp: str = "none",
    threshold: float = EVAL_THRESHOLD,
    resolution: str = "original",
    prec_compare: str = ">=",
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """RIS metrics of the bare model on ``loader`` (fractions in [0, 1], see ``RISMetrics``).

    ``resolution="original"`` (CRIS protocol): ``sigmoid(logits)`` is warped back to each
    image's original size (:func:`transforms.unletterbox`), thresholded at ``threshold`` and
    compared with the original mask. ``"model"`` (LAVT protocol): the map is upsampled to the
    letterboxed input size and compared with the letterboxed mask. The accumulators are summed
    over all ranks (every rank must call this)."""
    if resolution not in ("original", "model"):
        raise ValueError(f"resolution must be 'original' or 'model', got {resolution!r}")
    model = bare_model(model)
    was_training = model.training
    model.eval()
    metrics = RISMetrics(prec_compare=prec_compare)
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        texts = batch["text"].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images, texts)
        prob = torch.sigmoid(logits.float())
        if prob.dim() == 3:
            prob = prob[:, None]
        if resolution == "original":
            preds = [(unletterbox(prob[i, 0], info) > threshold).cpu() for i, info in enumerate(batch["info"])]
            targets = [torch.from_numpy(np.asarray(m, dtype=bool)) for m in batch["orig_mask"]]
            metrics.update(preds, targets)
        else:
            size = images.shape[-2:]
            up = F.interpolate(prob, size=size, mode="bilinear", align_corners=False)[:, 0]
            metrics.update((up > threshold).cpu(), batch["mask"] > 0.5)
    model.train(was_training)
    metrics.all_reduce()
    return metrics.compute()


def trivial_scores(loader: DataLoader, *, resolution: str = "original") -> dict[str, dict[str, float]]:
    """Scores of two data-only predictors: ``all_background`` (empty mask: IoU 0 everywhere)
    and ``whole_image`` (every pixel: IoU = object area / image area). Fractions, all ranks."""
    out = {}
    for name, fill in (("all_background", False), ("whole_image", True)):
        metrics = RISMetrics()
        for batch in loader:
            if resolution == "original":
                targets = [torch.from_numpy(np.asarray(m, dtype=bool)) for m in batch["orig_mask"]]
                metrics.update([torch.full_like(t, fill) for t in targets], targets)
            else:
                t = batch["mask"] > 0.5
                metrics.update(torch.full_like(t, fill), t)
        metrics.all_reduce()
        out[name] = metrics.compute()
    return out


def as_percent(metrics: dict[str, float]) -> dict[str, float]:
    """Rates ×100 (rounded to 2 decimals); ``count`` unchanged."""
    return {k: (v if k == "count" else round(100.0 * v, 2)) for k, v in metrics.items()}


def format_table(rows: dict[str, dict[str, float]], *, keys: Sequence[str] = PERCENT_KEYS) -> str:
    """Plain-text table of percent metrics, one row per name."""
    heads = ["mIoU", "oIoU"] + [f"P@{k.split('@')[1]}" for k in keys if k.startswith("prec@")]
    width = max([len(n) for n in rows] + [5])
    lines = [f"{'':<{width}} " + " ".join(f"{h:>7}" for h in heads) + f" {'n':>6}"]
    for name, m in rows.items():
        cells = " ".join(f"{m.get(k, float('nan')):>7.2f}" for k in keys)
        lines.append(f"{name:<{width}} {cells} {int(m.get('count', 0)):>6}")
    return "\n".join(lines)


# =========================================================================== checkpoints
def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it into
    place: a crash never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def rng_states() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states (plain types: loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(states["python"]) if not isinstance(states["python"], tuple) else states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def plain_args(args: Any) -> dict[str, Any]:
    """``vars(args)`` with paths turned into strings (a ``weights_only``-safe dict)."""
    out = {}
    for k, v in vars(args).items():
        out[k] = str(v) if isinstance(v, Path) else v
    return out


def make_checkpoint(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    args: Any,
    *,
    sampler_epoch: int,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Everything needed to resume exactly (and to rebuild the model for inference)."""
    return {
        "format": "masksd-cris-clip/1",
        "model": unwrap_ddp(module).state_dict(),  # wrapper keys (model.*, objectives.*) or bare
        "method": args.method,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "state": asdict(state),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "sampler_epoch": sampler_epoch,
        "rng": rng_states(),
        "args": plain_args(args),
        "best_metric": state.best_metric,
        "meta": meta,
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`make_checkpoint` (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def bare_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The bare model's weights from a checkpoint (wrapper keys ``model.*`` stripped; the mask
    tokens and private decoder copies are training-only and dropped)."""
    state = ckpt["model"]
    if ckpt.get("method") == "masksd":
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return dict(state)


def checkpoint_namespace(ckpt: dict[str, Any]) -> Any:
    import argparse

    return argparse.Namespace(**ckpt["args"])


def load_bare_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[RISModel, dict[str, Any]]:
    """``(bare model in eval mode, checkpoint)`` for inference; the architecture comes from
    the checkpoint's arguments (no pretrained weights are fetched: the checkpoint has them)."""
    ckpt = load_checkpoint(path)
    args = checkpoint_namespace(ckpt)
    bare = build_model(args.preset, pretrained=None, image_size=args.image_size)
    bare.load_state_dict(bare_state_dict(ckpt))
    return bare.to(device).eval(), ckpt


def restore_training(ckpt: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, scaler: torch.amp.GradScaler) -> TrainState:
    """Load model/optimizer/scheduler/scaler/RNG states; returns the saved :class:`TrainState`."""
    unwrap_ddp(module).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"])
    return TrainState(**ckpt["state"])


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 over the names and bytes of all parameters (replica consistency checks)."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap_ddp(module).named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
