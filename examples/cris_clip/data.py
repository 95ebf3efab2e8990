"""Data: the referring datasets, letterbox transforms and loaders.

* :class:`DataConfig` names the dataset (``synthetic``, generated offline by ``synthetic.py``, or
  a refer-format RefCOCO / RefCOCO+ / G-Ref under ``data_root``, read by ``refer.py``);
  :func:`raw_dataset` returns one split as ``{image, mask, sentence, id}`` items.
* :func:`letterbox` resizes an image keeping its aspect ratio and centre-pads it to a square
  (the padding is the CLIP mean, 0 after normalisation); :func:`unletterbox` maps a map
  predicted on the square back onto the original image (evaluation at the original size, CRIS).
* :class:`RISDataset` turns raw items into model inputs: a training item is only the tuple
  ``(image [3,S,S] float32, text [L] int64, mask [S,S] bool)`` (the default collate stacks it),
  plus ``roles [L] int64`` when given a ``roles`` function (the synthetic set's word roles, for
  VMLSD's selection diagnostic); an evaluation item is a dict that also carries the letterbox
  geometry and the original mask.
  No horizontal flips: they would break "left" / "right".
* :func:`train_loader` shuffles by ``seed + epoch``, shards over ranks and can start mid-epoch
  (exact resume); :func:`eval_loader` gives rank ``r`` the samples ``r, r + world, ...``.

This module imports no sibling module at import time (``raw_dataset`` imports the chosen
dataset's module), so tests can import it as ``examples.cris_clip.data``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT_LENGTH = {"synthetic": 17, "refcoco": 17, "refcoco+": 17, "refcocog": 22}  # incl. SOT/EOT (paper)
TEST_SPLITS = {"synthetic": ("test", "compositional"), "refcoco": ("testA", "testB"),
               "refcoco+": ("testA", "testB"), "refcocog": ("test",)}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which dataset and how much of it. Fields with ``help`` become command-line flags."""

    dataset: Literal["synthetic", "refcoco", "refcoco+", "refcocog"] = field(default="synthetic", metadata={
        "help": "synthetic (generated offline) or a refer-format dataset under --data-root"})
    data_root: str | None = field(default=None, metadata={"help": (
        "folder holding <dataset>/refs(<split_by>).p and <dataset>/instances.json (see refer.py)")})
    image_root: str | None = field(default=None, metadata={
        "help": "folder of COCO train2014 images (none: searched under --data-root)"})
    split_by: str | None = field(default=None, metadata={
        "help": "refer split scheme: unc (refcoco/refcoco+), umd or google (refcocog)"})
    num_train: int | None = field(default=None, metadata={
        "help": "synthetic: training samples (none: the generator's 4000)"})
    num_val: int | None = field(default=None, metadata={
        "help": "synthetic: samples of each evaluation split (none: 500)"})
    synthetic_seed: int = field(default=0, metadata={
        "help": "seed of the synthetic data generator (independent of --seed)"})
    world: Literal["v1", "v2"] = field(default="v1", metadata={
        "help": "synthetic: v1 (synthetic.py, the demo's) or v2 (world_v2.py: large referents, short "
                "expressions)"})


def raw_dataset(config: DataConfig, split: str) -> Dataset:
    """One split as ``{image uint8 [H,W,3], mask bool [H,W], sentence, id}`` items."""
    if config.dataset == "synthetic":
        if __package__:  # imported as examples.cris_clip.data (tests, benchmarks)
            from .synthetic import SyntheticReferDataset
            from .world_v2 import WorldV2Dataset
        else:  # a script run of this folder imports siblings by plain name
            from synthetic import SyntheticReferDataset
            from world_v2 import WorldV2Dataset

        n = config.num_train if split == "train" else config.num_val
        world = WorldV2Dataset if config.world == "v2" else SyntheticReferDataset
        return world(split, num_samples=n, seed=config.synthetic_seed)
    if __package__:
        from .refer import ReferDataset  # needs pycocotools
    else:
        from refer import ReferDataset  # needs pycocotools

    if config.data_root is None:
        raise ValueError(f"--dataset {config.dataset} needs --data-root "
                         f"(the folder holding {config.dataset}/)")
    return ReferDataset(config.data_root, dataset=config.dataset, split_by=config.split_by, split=split,
                        image_root=config.image_root)


# ---------------------------------------------------------------------------------- letterbox
@dataclass(frozen=True)
class LetterboxInfo:
    """The ``orig_h × orig_w`` image was resized to ``new_h × new_w`` and placed at ``(top, left)``
    in a ``size × size`` square."""

    orig_h: int
    orig_w: int
    size: int
    new_h: int
    new_w: int
    top: int
    left: int


def letterbox_info(orig_h: int, orig_w: int, size: int) -> LetterboxInfo:
    """Geometry of letterboxing an ``orig_h × orig_w`` image into a ``size × size`` square."""
    scale = size / max(orig_h, orig_w)
    new_h, new_w = min(size, max(1, round(orig_h * scale))), min(size, max(1, round(orig_w * scale)))
    return LetterboxInfo(orig_h, orig_w, size, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2)


def letterbox(image: np.ndarray, size: int) -> tuple[Tensor, LetterboxInfo]:
    """uint8 ``[H, W, 3]`` RGB → CLIP-normalised float32 ``[3, size, size]`` (bicubic, aspect
    kept, centred; padding 0) and its :class:`LetterboxInfo`."""
    info = letterbox_info(image.shape[0], image.shape[1], size)
    resized = Image.fromarray(image).resize((info.new_w, info.new_h), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    out = torch.zeros(3, size, size, dtype=torch.float32)
    out[:, info.top : info.top + info.new_h, info.left : info.left + info.new_w] = (arr - mean) / std
    return out, info


def letterbox_mask(mask: np.ndarray, info: LetterboxInfo) -> Tensor:
    """bool ``[orig_h, orig_w]`` → bool ``[size, size]``, letterboxed like its image (nearest)."""
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((info.new_w, info.new_h), Image.NEAREST)
    out = torch.zeros(info.size, info.size, dtype=torch.bool)
    out[info.top : info.top + info.new_h, info.left : info.left + info.new_w] = torch.from_numpy(
        np.asarray(small) > 127)
    return out


def unletterbox(prob: Tensor, info: LetterboxInfo) -> Tensor:
    """Map ``prob [..., h, w]`` covering the whole letterbox square (any resolution, e.g. the
    logits') back onto the original image: ``[..., orig_h, orig_w]`` (padding cropped,
    bilinear at the centres of the original pixels). Float dtypes are kept."""
    work = torch.float64 if prob.dtype == torch.float64 else torch.float32
    lead, (h, w) = prob.shape[:-2], prob.shape[-2:]
    x = prob.reshape(-1, 1, h, w).to(work)
    # centres of original pixels -> letterbox coordinates -> grid_sample's [-1, 1]
    u = (torch.arange(info.orig_w, device=prob.device, dtype=work) + 0.5) * (info.new_w / info.orig_w)
    v = (torch.arange(info.orig_h, device=prob.device, dtype=work) + 0.5) * (info.new_h / info.orig_h)
    gx = 2.0 * (info.left + u) / info.size - 1.0
    gy = 2.0 * (info.top + v) / info.size - 1.0
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # [H, W, 2] as (x, y)
    out = F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.reshape(*lead, info.orig_h, info.orig_w).to(prob.dtype if prob.is_floating_point() else work)


# ----------------------------------------------------------------------------------- datasets
class RISDataset(Dataset):
    """Model-ready items from a raw dataset: letterboxed image and mask, CLIP token ids.

    ``train=True``: ``(image [3,S,S] float32, text [L] int64, mask [S,S] bool)``, and
    ``roles(sentence, tokenizer, context_length)`` (``[L]`` int64, e.g. ``roles.token_roles``)
    last when ``roles`` is given.
    ``train=False``: a dict with those three plus ``info`` (:class:`LetterboxInfo`) and
    ``orig_mask`` (bool ``[H, W]``, the mask at the original image size).
    """

    def __init__(self, base: Dataset, *, image_size: int, context_length: int, train: bool,
                 roles: Callable[[str, Any, int], Tensor] | None = None) -> None:
        self.base, self.image_size, self.train, self.roles = base, image_size, train, roles
        self.context_length = context_length
        # open_clip's BPE tokenizer (ships with open_clip): SOT, words, EOT, zero padding; a
        # truncated sentence keeps its EOT
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=context_length)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, ...] | dict[str, Any]:
        item = self.base[index]
        image, info = letterbox(np.asarray(item["image"]), self.image_size)
        orig_mask = np.asarray(item["mask"]).astype(bool)
        mask = letterbox_mask(orig_mask, info)
        text = self.tokenizer([item["sentence"]])[0]
        if self.train:
            return ((image, text, mask) if self.roles is None else
                    (image, text, mask, self.roles(item["sentence"], self.tokenizer, self.context_length)))
        return {"image": image, "text": text, "mask": mask, "info": info,
                "orig_mask": torch.from_numpy(orig_mask)}


def eval_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``image [B,3,S,S]``, ``text [B,L]``, ``mask [B,S,S]``; ``info`` and ``orig_mask``
    (sizes differ between images) stay lists."""
    out = {key: torch.stack([it[key] for it in items]) for key in ("image", "text", "mask")}
    out.update({key: [it[key] for it in items] for key in ("info", "orig_mask")})
    return out


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed + epoch``, equal shards, tail dropped) that can
    start mid-epoch: ``set_epoch(epoch, start=k)`` skips this rank's first ``k`` indices."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class ShardSampler(Sampler[int]):
    """Evaluation shard ``rank::world`` in order: every sample counted exactly once."""

    def __init__(self, length: int, *, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(dataset: RISDataset, *, batch_size: int, rank: int, world_size: int, seed: int,
                 workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches ``(images [B,3,S,S], texts [B,L], masks [B,S,S])``; ``loader.sampler.set_epoch``
    before every epoch; ``sampler.num_samples // batch_size`` steps per full epoch."""
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=pin_memory)


def eval_loader(dataset: RISDataset, *, batch_size: int, rank: int, world_size: int, workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """This rank's shard of an evaluation split, in :func:`eval_collate` batches."""
    sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=eval_collate, pin_memory=pin_memory)
