"""Every setting of a run in one place: one :class:`Config` per preset, and the command line
generated from the dataclasses.

A :class:`Config` holds ``method`` and five dataclasses: ``model`` (:class:`model.ModelConfig`),
``distill`` (``masksd.DistillConfig``, the wrapper's own configuration), ``data``
(:class:`data.DataConfig`), ``optim`` (:class:`OptimConfig`) and ``run`` (:class:`RunConfig`).
Every field with a help text is a flag (``lr`` → ``--lr``; booleans get ``--x/--no-x``); a
nested dataclass gets prefixed flags (``distill.lmvsd.top_k`` → ``--lmvsd-top-k``) and, when it
may be None, an on/off flag (``--no-vmlsd``). A flag left out keeps the preset's value. The
checkpoint stores ``config.to_dict()`` and ``Config.from_dict`` rebuilds it; everything except
``run`` shapes the training trajectory, so a resumed run must match the checkpoint in all of it
(:func:`trajectory_changes`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from masksd import DistillConfig, LMVSDConfig, VMLSDConfig

if __package__:  # imported as examples.cris_clip.config (benchmarks)
    from .data import CONTEXT_LENGTH, TEST_SPLITS, DataConfig
    from .model import EXTRA_OBJECTIVES, MODEL_CONFIGS, ModelConfig
else:  # a script run of this folder (train.py, evaluate.py) imports siblings by plain name
    from data import CONTEXT_LENGTH, TEST_SPLITS, DataConfig
    from model import EXTRA_OBJECTIVES, MODEL_CONFIGS, ModelConfig


def _help(text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": text})


# help texts of masksd.DistillConfig's fields and of its branches' (LMVSDConfig / VMLSDConfig)
LIBRARY_HELP = {
    "lmvsd": "the LMVSD branch (language-guided masked visual self-distillation)",
    "vmlsd": "the VMLSD branch (visual-guided masked language self-distillation)",
    "top_k": "fraction of the tokens kept by correlation filtering",
    "ratio": "fraction α of the kept tokens that are masked",
    "weight": "loss weight λ",
    "masking": "mask the kept tokens (off: the Table V ablation, the branch re-encodes unmasked tokens)",
    "metric": "correlation: dot (paper) or cosine",
    "scorer": "how tokens are ranked before top-K: correlation (paper), late_interaction, prediction or "
              "random",
    "surgery": "correlation scores minus each token's mean score over the batch's sentences (CLIP Surgery)",
    "supervision": "branch targets: the main prediction (distill, paper) or the ground truth (Table VI)",
    "share_decoder": "the branches use the model's decoder (off: each its own copy, Table VII ablation)",
    "hard_targets": "binarise the teacher prediction at --threshold instead of soft probabilities",
    "threshold": "probability threshold of --hard-targets",
    "seg_weight": "weight of the main segmentation loss",
    "dropout": "dropout in the masked branches: fresh draws (default) or the main branch's replayed "
               "(then the mask is the branches' only difference; equal on a model without dropout)",
}


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
    """A whole run. ``PRESETS`` holds one per preset; :func:`parse_args` applies the flags."""

    preset: str
    method: Literal["masksd", "baseline"] = _help(
        "masksd: LMVSD + VMLSD; baseline: the same wrapper with both branches off (plus the further "
        "objectives named by --objectives, if any)", "masksd")
    objectives: tuple[str, ...] | None = _help(
        "training objectives, comma- or space-separated (e.g. lmvsd,vmlsd,mask_grounding): lmvsd vmlsd "
        "(paper) and any of mask_grounding cal cal_fused lang_rec maskris (MagNet, CRFormer, MaskRIS: with "
        "--seg-weight 0.5 as MaskRIS); the paper's branches "
        "run only if named. none: LMVSD + VMLSD as set by --lmvsd/--vmlsd. With --method baseline: the "
        "baseline plus only the named further objectives (naming lmvsd or vmlsd there is an error)")
    model: ModelConfig
    distill: DistillConfig = field(default_factory=DistillConfig)  # masksd: paper defaults
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "distill": self.distill.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        objectives = tuple(d["objectives"]) if d.get("objectives") is not None else None
        return cls(preset=d["preset"], method=d["method"], objectives=objectives,
                   model=ModelConfig(**d["model"]), distill=DistillConfig.from_dict(d["distill"]),
                   data=DataConfig(**d["data"]),
                   optim=OptimConfig(**d["optim"]), run=RunConfig(**d["run"]))


PRESETS: dict[str, Config] = {
    # tuned on the synthetic val split to finish in minutes on 2 CPU cores (see docs/benchmarks.md)
    "demo": Config(preset="demo", model=MODEL_CONFIGS["demo"], data=DataConfig(num_train=8000),
                   optim=OptimConfig(epochs=4, batch_size=16, lr=4e-3, weight_decay=0.0, warmup_epochs=0.25)),
    # world v2 (world_v2.py, issue 16): the demo's model and schedule at 96 px, 2000 samples per
    # evaluation split
    "v2": Config(preset="v2", model=MODEL_CONFIGS["v2"],
                 data=DataConfig(num_train=8000, num_val=2000, world="v2"),
                 optim=OptimConfig(epochs=4, batch_size=16, lr=4e-3, weight_decay=0.0, warmup_epochs=0.25)),
    # the paper's recipe (Sec. IV-B): 100 epochs, lr 1e-5, batch 32, weight decay 5e-4
    "vitb16": Config(preset="vitb16", model=MODEL_CONFIGS["vitb16"]),
    "vitl14": Config(preset="vitl14", model=MODEL_CONFIGS["vitl14"]),
}


# ------------------------------------------------------------------------- command line
def _flag_fields(config: Any) -> list[tuple[dataclasses.Field, Any, str]]:
    """``(field, type, help)`` of the fields of dataclass ``config`` that become flags."""
    hints, out = typing.get_type_hints(type(config)), []
    for f in fields(config):
        library = type(config).__module__.startswith("masksd.")  # LIBRARY_HELP names masksd's fields only
        text = f.metadata.get("help") or (LIBRARY_HELP.get(f.name) if library else None)
        if text is not None:
            kind = hints[f.name]
            if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: a flag of type X
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            out.append((f, kind, text))
    return out


def add_flags(parser: argparse.ArgumentParser, config: Any, title: str, prefix: str = "") -> None:
    """One flag per field of the dataclass instance ``config`` that has a help text (recursing
    into nested dataclasses). Flags left out do not appear in the namespace (``SUPPRESS``)."""
    group = parser.add_argument_group(title)
    for f, kind, text in _flag_fields(config):
        value, name = getattr(config, f.name), "--" + (prefix + f.name).replace("_", "-")
        if dataclasses.is_dataclass(kind):  # e.g. a branch: on/off, then its own fields
            group.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{text} (default: {'on' if value is not None else 'off'})")
            add_flags(parser, value if value is not None else f.default_factory(), f"{title}: {f.name}",
                      f"{prefix}{f.name}_")
            continue
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f"{text} (default: {value})")
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kwargs["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(kind)[0])
        else:
            kwargs["type"] = kind
        group.add_argument(name, **kwargs)


def apply_flags(config: Any, namespace: argparse.Namespace, prefix: str = "") -> Any:
    """``config`` with the fields given on the command line replaced."""
    given: dict[str, Any] = {}
    for f, kind, _ in _flag_fields(config):
        key, value = prefix + f.name, getattr(config, f.name)
        if dataclasses.is_dataclass(kind):
            on = getattr(namespace, key, value is not None)
            given[f.name] = apply_flags(value or f.default_factory(), namespace, key + "_") if on else None
        elif hasattr(namespace, key):
            v = getattr(namespace, key)
            given[f.name] = tuple(v) if isinstance(v, list) else v
    return replace(config, **given)


SECTIONS = ("model", "distill", "data", "optim", "run")


def build_parser(preset: str = "demo", description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=preset,
                        help="demo: tiny random-init CLIP for a CPU; v2: the same at 96 px on world v2 "
                             "(world_v2.py); vitb16 / vitl14: the paper's backbones (the defaults shown "
                             "below are the chosen preset's)")
    add_flags(parser, PRESETS[preset], "method")
    for section in SECTIONS:
        add_flags(parser, getattr(PRESETS[preset], section), section)
    return parser


OBJECTIVE_NAMES = ("lmvsd", "vmlsd", *EXTRA_OBJECTIVES)  # what --objectives accepts, besides "none"


def objective_names(values: Sequence[str]) -> tuple[str, ...] | None:
    """``--objectives`` as given (``["lmvsd,vmlsd", "cal"]``: comma- and/or space-separated) → the
    names in order, each once; None for a lone ``none`` (LMVSD + VMLSD as set by --lmvsd/--vmlsd).

    Raises:
        ValueError: an unknown or missing name, or ``none`` together with other names; the message
            lists the valid names.
    """
    names = [n.strip() for value in values for n in value.split(",") if n.strip()]
    valid = f"choose from {' '.join(OBJECTIVE_NAMES)} (comma- or space-separated), or none"
    unknown = [n for n in names if n not in (*OBJECTIVE_NAMES, "none")]
    if not names or unknown:
        found = f"unknown {', '.join(map(repr, unknown))}" if unknown else "no name given"
        raise ValueError(f"--objectives: {found}; {valid}")
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"--objectives: none stands alone (LMVSD + VMLSD as set by --lmvsd/--vmlsd), "
                             f"got {' '.join(names)}; to add objectives to the paper's branches name them "
                             "all, e.g. lmvsd,vmlsd,mask_grounding")
        return None
    return tuple(dict.fromkeys(names))


def resolve_objectives(cfg: Config) -> Config:
    """``cfg`` with the paper's branches switched by ``cfg.objectives`` (when set) and, for
    ``--method baseline``, both off; baseline keeps only the further objectives.

    Raises:
        ValueError: ``--method baseline`` with ``lmvsd`` or ``vmlsd`` in ``--objectives``.
    """
    d, named = cfg.distill, cfg.objectives
    if cfg.method == "baseline":
        branches = [n for n in named or () if n in ("lmvsd", "vmlsd")]
        if branches:
            raise ValueError(f"--method baseline turns LMVSD and VMLSD off, but --objectives names "
                             f"{' and '.join(branches)}; drop them (baseline + the further objectives only) "
                             "or use --method masksd")
        return replace(cfg, distill=replace(d, lmvsd=None, vmlsd=None), objectives=tuple(named or ()))
    if named is None:
        return cfg
    return replace(cfg, distill=replace(d, lmvsd=(d.lmvsd or LMVSDConfig()) if "lmvsd" in named else None,
                                        vmlsd=(d.vmlsd or VMLSDConfig()) if "vmlsd" in named else None))


def parse_args(argv: list[str] | None = None, description: str | None = None) -> Config:
    """The chosen preset with the given flags applied, every 'none: ...' default resolved.

    ``--objectives`` is checked here, before any data or model is built: a bad value exits with
    argparse's usage message (status 2) naming the valid objectives."""
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    name = preset.parse_known_args(argv)[0].preset
    parser = build_parser(name, description)
    namespace = parser.parse_args(argv)
    cfg = PRESETS[name]
    try:
        objectives = (objective_names(namespace.objectives) if hasattr(namespace, "objectives")
                      else cfg.objectives)
        cfg = resolve_objectives(replace(cfg, method=getattr(namespace, "method", cfg.method),
                                         objectives=objectives,
                                         **{s: apply_flags(getattr(cfg, s), namespace) for s in SECTIONS}))
    except ValueError as error:
        parser.error(str(error))
    o, r = cfg.optim, cfg.run
    tests = r.test_split if r.test_split is not None else TEST_SPLITS[cfg.data.dataset]
    return replace(
        cfg,
        optim=replace(o, backbone_lr_mult=o.backbone_lr_mult if o.backbone_lr_mult is not None
                      else (0.1 if cfg.model.pretrained else 1.0)),
        run=replace(r, out=r.out or f"runs/{name}-{cfg.method}",
                    eval_batch_size=r.eval_batch_size or o.batch_size,
                    test_split=() if tests == ("none",) else tuple(tests)),
    )


def trajectory_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings that differ between two ``Config.to_dict()``, by dotted name, ``run`` excluded. A
    setting added to the code after ``saved`` was written counts as its default there, so a run
    resumes across versions as long as the new setting is left at its default."""
    try:  # fill what an older checkpoint lacks with the defaults
        saved = Config.from_dict(saved).to_dict()
    except (KeyError, TypeError, ValueError):  # unknown or malformed: compare as written
        pass

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict)
                       else {prefix + k: list(v) if isinstance(v, tuple) else v})  # JSON has no tuples
        return out

    a, b = (flat({k: v for k, v in saved.items() if k != "run"}),
            flat({k: v for k, v in now.items() if k != "run"}))
    changed = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
    pretrained = changed.get("model.pretrained")
    if pretrained and all(pretrained) and _same_file(*pretrained):  # one file named two ways
        del changed["model.pretrained"]
    return changed


def _same_file(a: str, b: str) -> bool:
    """Whether two paths (relative ones from the working directory) name one existing file,
    e.g. ``runs/x.bin`` and ``/work/runs/x.bin``: a run resumes under either spelling."""
    try:
        return Path(a).resolve(strict=True) == Path(b).resolve(strict=True)
    except OSError:
        return False


def extra_objectives(config: Config) -> tuple[str, ...]:
    """The objectives besides LMVSD/VMLSD that ``--objectives`` asks for, in order (also for a
    ``Config`` built by hand or read from a checkpoint: comma-joined names are split, ``none`` is
    none, an unknown name raises the ValueError of :func:`objective_names`)."""
    names = objective_names(config.objectives) if config.objectives else None
    return tuple(n for n in names or () if n not in ("lmvsd", "vmlsd"))


def context_length(config: Config) -> int:
    """Token ids per sentence incl. SOT/EOT (17 for RefCOCO/+, 22 for G-Ref, as the paper)."""
    return CONTEXT_LENGTH[config.data.dataset]
