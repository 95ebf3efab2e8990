"""Every setting of a run in one place: one :class:`Config` per preset, and the command line
generated from the dataclasses.

A :class:`Config` nests ``model`` (:class:`model.ModelConfig`), ``distill`` (:class:`DistillConfig`,
the masksd settings), ``data`` (:class:`data.DataConfig`), ``optim`` (:class:`OptimConfig`) and
``run`` (:class:`RunConfig`). Every field with a ``help`` text is a flag (``lmvsd_top_k`` →
``--lmvsd-top-k``; booleans get ``--x/--no-x``); a flag left out keeps the preset's value. The
checkpoint stores ``config.to_dict()``, and ``Config.from_dict`` rebuilds it for evaluation,
prediction and resuming. Everything except ``run`` decides the training trajectory, so a resumed
run must match the checkpoint in all of it.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from data import CONTEXT_LENGTH, TEST_SPLITS, DataConfig
from model import MODEL_CONFIGS, ModelConfig

from masksd import LMVSDConfig, VMLSDConfig

_L, _V = LMVSDConfig(), VMLSDConfig()  # the paper's defaults (Tables III and IV)


def _help(text: str, default: Any = None, **extra: Any) -> Any:
    return field(default=default, metadata={"help": text, **extra})


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """The masksd settings; :meth:`wrapper_kwargs` turns them into ``MaskedSelfDistill`` arguments."""

    method: Literal["masksd", "baseline"] = _help(
        "masksd: LMVSD + VMLSD branches; baseline: the same wrapper with both branches off", "masksd")
    lmvsd: bool = _help("run the LMVSD branch (language-guided masked visual self-distillation)", True)
    lmvsd_top_k: float = _help("LMVSD: fraction of image tokens kept by correlation filtering", _L.top_k)
    lmvsd_ratio: float = _help("LMVSD: fraction α of the kept tokens that are masked", _L.ratio)
    lmvsd_weight: float = _help("LMVSD: loss weight λ1", _L.weight)
    vmlsd: bool = _help("run the VMLSD branch (visual-guided masked language self-distillation)", True)
    vmlsd_top_k: float = _help("VMLSD: fraction of words kept by correlation filtering", _V.top_k)
    vmlsd_ratio: float = _help("VMLSD: fraction α of the kept words that are masked", _V.ratio)
    vmlsd_weight: float = _help("VMLSD: loss weight λ2", _V.weight)
    masking: bool = _help("mask the kept tokens (--no-masking: the Table V ablation, branches re-encode "
                          "unmasked tokens)", True)
    supervision: Literal["distill", "ground_truth"] = _help(
        "branch targets: the main prediction (paper) or the ground truth (Table VI ablation)", "distill")
    unshared_decoder: bool = _help("ablation (Table VII): each branch gets its own decoder copy", False)
    hard_targets: bool = _help("binarise the teacher prediction at 0.5 instead of soft probabilities", False)

    def wrapper_kwargs(self) -> dict[str, Any]:  # masksd
        """Keyword arguments of ``masksd.MaskedSelfDistill`` (a branch that is off is ``None``)."""
        on = self.method == "masksd"
        lmvsd = LMVSDConfig(top_k=self.lmvsd_top_k, ratio=self.lmvsd_ratio, weight=self.lmvsd_weight,
                            masking=self.masking) if on and self.lmvsd else None
        vmlsd = VMLSDConfig(top_k=self.vmlsd_top_k, ratio=self.vmlsd_ratio, weight=self.vmlsd_weight,
                            masking=self.masking) if on and self.vmlsd else None
        return dict(lmvsd=lmvsd, vmlsd=vmlsd, supervision=self.supervision,
                    share_decoder=not self.unshared_decoder, hard_targets=self.hard_targets)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Schedule and optimiser (Adam, linear warm-up then cosine decay, per step)."""

    epochs: int = _help("training epochs", 100)
    batch_size: int = _help("batch size PER PROCESS (paper: 32 in total, e.g. 4 × 8 GPUs)", 32)
    lr: float = _help("peak learning rate of the head and mask tokens", 1e-5)
    backbone_lr_mult: float | None = _help(
        "lr multiplier of the CLIP towers (none: 0.1 with --pretrained as CRIS, else 1)")
    weight_decay: float = _help("Adam weight decay", 5e-4)
    warmup_epochs: float = _help("linear warm-up epochs before the cosine decay", 10.0)
    min_lr_ratio: float = _help("final lr as a fraction of the peak", 0.0)
    grad_clip: float | None = _help("clip the gradient norm (none: off)")
    amp: Literal["none", "bf16", "fp16"] = _help("autocast precision (fp16 adds a GradScaler)", "none")
    seed: int = _help("seed of the initial weights, data order and masks", 0)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where and how this process runs; may change when resuming."""

    out: str | None = _help("output folder (none: runs/<preset>-<method>)")
    resume: str | None = _help("checkpoint to continue from, or 'auto' for <out>/last.pt if it exists")
    max_steps: int | None = _help("stop after this many optimisation steps in total (the schedule still "
                                  "spans --epochs); for tests and smoke runs")
    eval_split: tuple[str, ...] = _help("splits validated every epoch; the first selects best.pt", ("val",))
    test_split: tuple[str, ...] | None = _help(
        "splits evaluated with best.pt at the end ('none' to skip; none: the dataset's test splits)")
    eval_resolution: Literal["original", "model", "both"] = _help(
        "compare masks at the original image size (CRIS), the model's input size (LAVT), or both", "original")
    eval_batch_size: int | None = _help("evaluation batch size (none: --batch-size)")
    log_interval: int = _help("steps between reads of the loss terms (a device sync; progress bar, "
                              "non-finite check)", 50)
    device: str = _help("auto (CUDA if available), cpu or cuda", "auto")
    workers: int = _help("DataLoader worker processes per rank (0: load in the main process)", 0)
    progress: bool = _help("tqdm progress bars (only when stderr is a terminal)", True)
    check_replicas: bool = _help("DDP: at the end, check that every rank holds rank 0's weights", False)


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run. ``PRESETS`` holds one per preset; ``parse_args`` applies the flags."""

    preset: str
    model: ModelConfig
    distill: DistillConfig = DistillConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls(preset=d["preset"], model=ModelConfig(**d["model"]), distill=DistillConfig(**d["distill"]),
                   data=DataConfig(**d["data"]), optim=OptimConfig(**d["optim"]), run=RunConfig(**d["run"]))


PRESETS: dict[str, Config] = {
    # tuned on the synthetic val split to finish in minutes on 2 CPU cores (see docs/benchmarks.md)
    "demo": Config(preset="demo", model=MODEL_CONFIGS["demo"], data=DataConfig(num_train=8000),
                   optim=OptimConfig(epochs=4, batch_size=16, lr=4e-3, weight_decay=0.0, warmup_epochs=0.25)),
    # the paper's recipe (Sec. IV-B): 100 epochs, lr 1e-5, batch 32, weight decay 5e-4
    "vitb16": Config(preset="vitb16", model=MODEL_CONFIGS["vitb16"]),
    "vitl14": Config(preset="vitl14", model=MODEL_CONFIGS["vitl14"]),
}


# ------------------------------------------------------------------------- command line
def add_flags(parser: argparse.ArgumentParser, config: Any, title: str) -> None:
    """One flag per field of the dataclass instance ``config`` that has a ``help`` text. Flags
    left out do not appear in the parsed namespace (``argparse.SUPPRESS``)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        if "help" not in f.metadata:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: a flag of type X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS,
                                      help=f"{f.metadata['help']} (default: {getattr(config, f.name)})")
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kwargs["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(kind)[0])
        else:
            kwargs["type"] = kind
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def apply_flags(config: Any, namespace: argparse.Namespace) -> Any:
    """``config`` with the fields given on the command line replaced."""
    given = {f.name: getattr(namespace, f.name) for f in fields(config) if hasattr(namespace, f.name)}
    return replace(config, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


SECTIONS = ("model", "distill", "data", "optim", "run")


def build_parser(preset: str = "demo", description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=preset,
                        help="demo: tiny random-init CLIP for a CPU; vitb16 / vitl14: the paper's backbones "
                             "(flags below override the preset; defaults shown are the chosen preset's)")
    for section in SECTIONS:
        add_flags(parser, getattr(PRESETS[preset], section), section)
    return parser


def parse_args(argv: list[str] | None = None, description: str | None = None) -> Config:
    """The chosen preset with the given flags applied, every 'none: ...' default resolved."""
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    name = preset.parse_known_args(argv)[0].preset
    namespace = build_parser(name, description).parse_args(argv)
    cfg = PRESETS[name]
    cfg = replace(cfg, **{s: apply_flags(getattr(cfg, s), namespace) for s in SECTIONS})
    o, r = cfg.optim, cfg.run
    tests = r.test_split if r.test_split is not None else TEST_SPLITS[cfg.data.dataset]
    return replace(
        cfg,
        optim=replace(o, backbone_lr_mult=o.backbone_lr_mult if o.backbone_lr_mult is not None
                      else (0.1 if cfg.model.pretrained else 1.0)),
        run=replace(r, out=r.out or f"runs/{name}-{cfg.distill.method}",
                    eval_batch_size=r.eval_batch_size or o.batch_size,
                    test_split=() if tests == ("none",) else tuple(tests)),
    )


def context_length(config: Config) -> int:
    """Token ids per sentence incl. SOT/EOT (17 for RefCOCO/+, 22 for G-Ref, as the paper)."""
    return CONTEXT_LENGTH[config.data.dataset]
