"""``MaskedSelfDistill``: the CM-MaskSD training engine, and ``masksd.wrap`` for unchanged models.

Training forward (``wrapper.train()``)::

    main branch:  the bare model runs once (M_seg), recording embedded tokens and features
    objectives:   LMVSD re-runs the model with masked image embeddings, VMLSD with masked word
                  embeddings (shared weights; the other modality reused where fusion allows)
    loss        = BCE(M_seg, GT) + λ1 · BCE(M_LMVSD, σ(M_seg)) + λ2 · BCE(M_VMLSD, σ(M_seg))

Eval forward (``wrapper.eval()``) runs the bare model only: ``unwrap()(...)``, bit for bit.

Two ways in, one engine (``masksd.engine``: a ``HookSpec`` compiled once, hooks, one runner):

* ``masksd.wrap(model, spec)``: the user's unchanged ``nn.Module``, driven through forward hooks
  described by a ``HookSpec``. Its ``state_dict()`` keys never change, so trained weights load
  into the user's own class with ``strict=True``.
* ``MaskedSelfDistill(image_tower, text_tower, decoder)``: a model built from towers
  (``masksd.towers``); the bare model is a ``RISModel`` and its spec ``tower_spec(model)``.

State dict of the wrapper: the bare model under ``model.`` and the training-only parameters
(mask tokens, objective heads, private decoders) under ``objectives.``; ``added_state_dict()``
and ``load_added_state_dict()`` save and load the latter alone.

BatchNorm (and SyncBatchNorm) layers of the bare model normalise the masked branches with those
branches' own batch statistics, but only the main branch updates their running statistics:
inference sees unmasked inputs. The layers are looked up at every step, so converting the
wrapper with ``nn.SyncBatchNorm.convert_sync_batchnorm`` after wrapping is fine.

Loss weights change during training with ``set_weights`` (ramps, warm-ups); objectives switch off
for some steps with ``disabled_objectives`` (nothing runs, no loss is reported). A weight of 0
still runs its branch; under DDP with ``find_unused_parameters=False`` a disabled objective's
parameters get no gradient, which DDP refuses: set its weight to 0 instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from masksd.check import WrapReport, run_check
from masksd.checkpoints import ADDED_PREFIX
from masksd.config import BranchConfig, DistillConfig
from masksd.engine.inputs import check_inputs, split_target
from masksd.engine.outputs import as_tensor_loss
from masksd.engine.plan import resolve_module
from masksd.engine.rng import RngTape, running_stats_frozen
from masksd.engine.runner import Runner
from masksd.losses import segmentation_loss
from masksd.objectives.base import Objective
from masksd.objectives.guided_masking import GuidedMaskedDistillation
from masksd.scorers import SCORERS, scorer_needs
from masksd.spec import HookSpec
from masksd.step import other
from masksd.torch_compat import is_compiling
from masksd.towers import Decoder, RISModel, decoder_foreign_parameters, decoder_parameters_hidden, tower_spec

__all__ = ["Criterion", "DistillOutput", "MaskedSelfDistill", "wrap"]

#: A user's segmentation loss: ``criterion(logits, target) -> scalar``, given the logits as the
#: model produces them (``HookSpec.logits``'s value before any two-class conversion, e.g. LAVT's
#: ``[B, 2, H, W]``; the tower decoder's ``[B, 1, h, w]``) and the target as passed to the wrapper.
Criterion = Callable[[Tensor, Tensor], Tensor]


@dataclass
class DistillOutput:
    """Result of a training forward.

    Attributes:
        logits: ``[B, 1, h, w]`` main-branch logits ``M_seg`` (two-class logits converted).
        loss: scalar float32 total loss (what to call ``backward()`` on).
        losses: unweighted terms by name: ``"seg"`` and one per objective (``"lmvsd"``,
            ``"vmlsd"``), each a detached scalar.
        selections: per objective, ``{"kept": [B, N_u] bool, "masked": [B, N_u] bool,
            "logits": [B, 1, h, w], "grid": (h_u, w_u) or None}`` (detached) over the units the
            branch selected on (patches; a CNN's coarse grid; words).
        output: the bare model's own return value of the main branch, so that trainers that
            read the model's loss dict or tuple can still do so.
    """

    logits: Tensor
    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: Any = None


class MaskedSelfDistill(nn.Module):
    """Wrap a model with CM-MaskSD training objectives (see the module docstring).

    Args:
        image_tower / text_tower / decoder: the tower entry's model parts
            (``decoder(image: Encoded, text: Encoded) -> logits [B, 1, h, w]``). For an
            unchanged ``nn.Module`` use ``masksd.wrap(model, spec)`` instead.
        config: a ``DistillConfig`` (default: the paper's settings); or give its fields as
            keyword ``options`` (``lmvsd=LMVSDConfig(...)``, ``vmlsd=None``, ...), not both.
        extra_objectives: further ``Objective`` plug-ins run after the two branches.
        criterion: your own segmentation loss ``criterion(logits, target) -> scalar`` (see
            ``masksd.wrap``); None: masksd's BCE (or the model's own loss, ``HookSpec.loss``).

    Forward:
        Towers: ``forward(images, texts, target=None, *, generator=None)``. Hooked model:
        ``forward(*model_args, target=None, generator=None, **model_kwargs)``. Training mode
        returns a ``DistillOutput``; eval mode returns the bare model's output.
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        decoder: Decoder,
        *,
        config: DistillConfig | None = None,
        extra_objectives: Sequence[Objective] = (),
        criterion: Criterion | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        hidden = decoder_parameters_hidden(decoder)
        if hidden:
            raise TypeError(
                f"decoder is a plain function that uses modules with parameters ({', '.join(hidden)}); "
                "their parameters would be neither trained nor saved. Make the decoder an nn.Module "
                "that holds them as submodules"
            )
        model = RISModel(image_tower, text_tower, decoder, decode_with_fused=True)
        self._setup(
            model, tower_spec(model), DistillConfig.merged(config, options), extra_objectives, criterion
        )
        self._towers = True  # wrapper(images, texts, target): the target may come third

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        spec: HookSpec,
        *,
        config: DistillConfig | None = None,
        extra_objectives: Sequence[Objective] = (),
        criterion: Criterion | None = None,
        **options: Any,
    ) -> MaskedSelfDistill:
        """Wrap an unchanged ``model`` described by ``spec`` (what ``masksd.wrap`` does)."""
        if not isinstance(spec, HookSpec):
            raise TypeError(f"spec must be a masksd.HookSpec, got {type(spec).__name__}")
        absent = {m: None for m in ("lmvsd", "vmlsd")
                  if getattr(spec, "image" if m == "lmvsd" else "text") is None}
        if config is None:
            options = {**absent, **options}
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper._setup(model, spec, DistillConfig.merged(config, options), extra_objectives, criterion)
        wrapper._towers = False
        return wrapper

    def _setup(
        self, model: nn.Module, spec: HookSpec, config: DistillConfig, extra_objectives: Sequence[Objective],
        criterion: Criterion | None,
    ) -> None:
        runner = Runner(model, spec)
        self.model = model
        self.runner = runner
        self._config = config  # the branch weights live in their objectives (``config``)
        self._disabled: frozenset[str] = frozenset()  # objectives skipped (``disabled_objectives``)
        self._check_decoder = isinstance(model, RISModel)  # refuse a decoder's hidden parameters once
        if not config.share_decoder and spec.decoder is None:
            raise ValueError(
                "share_decoder=False gives each branch its own decoder copy: name the decoder module in "
                "HookSpec(decoder='<module path>')"
            )
        objectives: dict[str, Objective] = {}
        for name, modality, branch in (("lmvsd", "image", config.lmvsd), ("vmlsd", "text", config.vmlsd)):
            if branch is None:
                continue
            self._check_branch(name, modality, branch)
            kwargs: dict[str, Any] = dict(
                name=name, masked_modality=modality, embed_dim=runner.width(modality), config=branch,
                supervision=config.supervision, hard_targets=config.hard_targets, threshold=config.threshold,
            )
            if config.share_decoder:
                objective = GuidedMaskedDistillation(**kwargs)
            else:
                shared = resolve_module(model, spec.decoder, "HookSpec.decoder")  # type: ignore[arg-type]
                objective = GuidedMaskedDistillation.with_private_decoder(
                    shared, engine=runner.recorder, **kwargs
                )
            if objective.mask_token is not None:
                runner.init_mask_token(modality, objective.mask_token)
            objectives[name] = objective
        for objective in extra_objectives:
            if not isinstance(objective, Objective):
                raise TypeError(
                    f"extra_objectives must hold Objective instances, got {type(objective).__name__}"
                )
            if objective.name in objectives or objective.name == "seg":
                raise ValueError(f"objective name {objective.name!r} is used twice")
            objectives[objective.name] = objective
        self.objectives = nn.ModuleDict(objectives)
        if criterion is not None and not callable(criterion):
            raise TypeError(
                f"criterion must be callable as criterion(logits, target) -> loss, "
                f"got {type(criterion).__name__}"
            )
        if criterion is not None and spec.loss is not None:
            raise ValueError(
                "give either criterion= (your loss on the logits) or HookSpec.loss (the loss your model "
                "returns), not both: both would be the main segmentation term"
            )
        self.criterion = criterion

    def _check_branch(self, name: str, modality: str, branch: BranchConfig) -> None:
        """Refuse, at wrap time, a branch whose scorer needs features the spec does not declare."""
        spec = self.runner.spec
        if getattr(spec, modality) is None:
            raise ValueError(
                f"{name} masks {modality} tokens but HookSpec.{modality} is None; set {name}=None"
            )
        if callable(branch.scorer):
            return
        side = other(modality)
        mine, theirs = getattr(spec, modality), getattr(spec, side)
        present = {
            "tokens": mine.tokens is not None,
            "other_global": theirs is not None and (theirs.tokens is not None or theirs.global_ is not None),
            "other_tokens": theirs is not None and theirs.tokens is not None,
            "image": modality == "image",
        }
        wanted = {"tokens": f"HookSpec.{modality}.tokens",
                  "other_global": f"HookSpec.{side}.global_ (or .tokens)",
                  "other_tokens": f"HookSpec.{side}.tokens",
                  "image": "image tokens (it masks images only)"}
        needs = scorer_needs(branch.scorer)
        missing = [wanted[need] for need in needs if not present[need]]
        if missing:
            raise ValueError(
                f"{name} uses scorer={branch.scorer!r}, which needs {' and '.join(missing)}"
                + (" in one shared space" if "image" not in needs else "")
                + f"; declare them, or choose {type(branch).__name__}(scorer=...) among "
                f"{[n for n in SCORERS if n != branch.scorer]}"
            )

    # ------------------------------------------------------------------------------ access
    @property
    def spec(self) -> HookSpec:
        """The ``HookSpec`` the engine runs (the tower entry's: ``masksd.towers.tower_spec``)."""
        return self.runner.spec

    @property
    def seg_weight(self) -> float:
        """The weight of the main segmentation term (``config.seg_weight``)."""
        return self._config.seg_weight

    @property
    def config(self) -> DistillConfig:
        """The configuration as it stands (weights changed by ``set_weights`` included)."""
        branches = {name: self.objectives[name].config for name in ("lmvsd", "vmlsd")
                    if name in self.objectives}
        return dataclasses.replace(self._config, **branches)

    def unwrap(self) -> nn.Module:
        """The bare model (the user's object for ``wrap``; a ``RISModel`` for the tower entry)."""
        return self.model

    def added_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that exist only for training (mask tokens, heads, private decoders)."""
        return {ADDED_PREFIX + name: p for name, p in self.objectives.named_parameters()}

    def added_state_dict(self) -> dict[str, Tensor]:
        """The training-only state (keys start with ``objectives.``), to save apart."""
        return {ADDED_PREFIX + k: v for k, v in self.objectives.state_dict().items()}

    def load_added_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> Any:
        """Load what ``added_state_dict()`` saved (keys with or without the prefix)."""
        stripped = {k[len(ADDED_PREFIX):] if k.startswith(ADDED_PREFIX) else k: v for k, v in state.items()}
        return self.objectives.load_state_dict(stripped, strict=strict)

    def describe(self) -> dict[str, Any]:
        """Fusion type and what each branch runs (see also ``check``)."""
        return {"backend": "hooks", **self.runner.describe()}

    def check(self, *args: Any, **kwargs: Any) -> WrapReport:
        """Run one instrumented training step on a sample batch and return a ``WrapReport``;
        the model's parameters, gradients, buffers and RNG state are left as they were."""
        return run_check(self, args, kwargs)

    # --------------------------------------------------------------------------- controls
    def _objective_names(self, names: Any, argument: str) -> list[str]:
        unknown = [name for name in names if name not in self.objectives]
        if unknown:
            raise ValueError(
                f"{argument}: no objective named {unknown}; this wrapper has {list(self.objectives)}"
            )
        return list(names)

    def set_weights(self, **weights: float) -> None:
        """Set loss weights by name: ``seg`` (the main term) and any objective (``lmvsd``,
        ``vmlsd``, extra objectives' names). Values are finite numbers >= 0; each is stored once,
        in the objective's ``config`` (``wrapper.config`` reads them), so what is saved stays true."""
        for name, value in weights.items():
            if (
                isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value < 0
            ):
                raise ValueError(f"set_weights: {name} must be a finite number >= 0, got {value!r}")
        names = self._objective_names([n for n in weights if n != "seg"], "set_weights")
        if "seg" in weights:
            self._config = dataclasses.replace(self._config, seg_weight=float(weights["seg"]))
        for name in names:
            objective, weight = self.objectives[name], float(weights[name])
            own = getattr(objective, "config", None)
            if dataclasses.is_dataclass(own) and any(f.name == "weight" for f in dataclasses.fields(own)):
                objective.config = dataclasses.replace(own, weight=weight)
            else:
                objective.weight = weight

    @contextmanager
    def disabled_objectives(self, *names: str) -> Iterator[None]:
        """Within the block, training steps skip the named objectives (none named: all of them);
        ``out.losses`` then holds ``"seg"`` and the objectives still on. Nests; restores on exit."""
        chosen = self._objective_names(names, "disabled_objectives") if names else list(self.objectives)
        before = self._disabled
        self._disabled = before | frozenset(chosen)
        try:
            yield
        finally:
            self._disabled = before

    # ----------------------------------------------------------------------------- forward
    def forward(
        self, *args: Any, target: Tensor | None = None, generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> DistillOutput | Any:
        """Training: ``DistillOutput``; eval: the bare model's output (see the class docstring)."""
        if getattr(self, "_is_replica", False):
            raise TypeError(
                "masksd does not run under nn.DataParallel (its replicas cannot gather a DistillOutput "
                "and would draw masks per device); use DistributedDataParallel: torchrun --nproc_per_node N"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if self._towers and len(args) == 3:  # the tower entry: wrapper(images, texts, target)
            if target is not None:
                raise TypeError("target given twice (positionally and as target=)")
            args, target = args[:2], args[2]
        plan = self.runner.plan
        args, kwargs, target = split_target(plan, args, kwargs, target)
        if not self.training:
            if target is not None and self.spec.target is None:
                raise ValueError(
                    "a target was passed in eval mode, where the wrapper returns the bare model's output "
                    "and ignores it; call wrapper.train() for a training step, or drop the target"
                )
            return self.model(*args, **kwargs)
        valid = check_inputs(plan, args, kwargs, target, criterion=self.criterion is not None)
        tape = RngTape(self.model) if self._config.dropout == "replay" else None
        check = self._check_decoder and not is_compiling()
        with decoder_foreign_parameters(self.model) if check else nullcontext() as foreign:
            step = self.runner.run_main(args, kwargs, target, generator=generator, tape=tape)
            if foreign is not None:
                foreign.add_graph(step.logits)
        if foreign is not None:
            foreign.refuse(getattr(self.model, "decoder", None))
            self._check_decoder = False
        # the main segmentation term
        if self.criterion is not None:
            seg = as_tensor_loss(self.criterion(step.raw_logits, step.target), "criterion(logits, target)")
        elif step.model_loss is not None:
            seg = step.model_loss
        else:
            seg = segmentation_loss(step.logits, step.target, checked=True)  # checked by check_inputs
        if valid is not None:  # a CUDA target whose check is still in flight: a bad one gives NaN
            seg = torch.where(valid.to(seg.device), seg, torch.full_like(seg, float("nan")))
        # the objectives, each on the step's record (BatchNorm running statistics left to the main branch)
        terms = {"seg": seg}
        selections: dict[str, dict[str, Any]] = {}
        active = [(name, objective) for name, objective in self.objectives.items()
                  if name not in self._disabled]
        with running_stats_frozen(self.model):
            for name, objective in active:
                result = objective(step, self.runner)
                terms[name] = result.loss.float()
                selections[name] = result.info
        # the weighted sum and the detached copies only now: a compiled region must not return a
        # loss and its detached copy (or 1.0 * loss) as two outputs (docs/troubleshooting.md)
        total = self._config.seg_weight * terms["seg"]
        for name, objective in active:
            total = total + objective.weight * terms[name]
        losses = {name: term.detach() for name, term in terms.items()}
        return DistillOutput(
            logits=step.logits, loss=total, losses=losses, selections=selections, output=step.output
        )


def wrap(
    model: nn.Module,
    spec: HookSpec,
    *,
    config: DistillConfig | None = None,
    extra_objectives: Sequence[Objective] = (),
    criterion: Criterion | None = None,
    **options: Any,
) -> MaskedSelfDistill:
    """Wrap the RIS model you already have, unchanged, for CM-MaskSD training.

    Args:
        model: your bare ``nn.Module`` (not DDP/DataParallel/compiled: wrap first, then DDP).
        spec: a ``HookSpec`` naming, on ``model``, the embedding modules, the logits and the
            scoring features (see ``masksd.spec`` and docs/wrapping.md).
        config: a ``DistillConfig``; or pass its fields as keyword ``options``
            (``lmvsd=LMVSDConfig(...)``, ``vmlsd=None``, ``hard_targets=True``, ...).
        extra_objectives: further ``Objective`` plug-ins.
        criterion: your own segmentation loss ``criterion(logits, target) -> scalar`` as the
            main term (e.g. LAVT's cross-entropy weighted ``[0.9, 1.1]`` on its two-class
            logits); it receives ``HookSpec.logits``'s value unconverted and the target as
            given. None: the model's own loss (``HookSpec.loss``) or masksd's BCE.

    Returns:
        A ``MaskedSelfDistill`` whose ``unwrap()`` is ``model`` itself: its ``state_dict()``
        keys are untouched.
    """
    return MaskedSelfDistill.from_model(
        model, spec, config=config, extra_objectives=extra_objectives, criterion=criterion, **options
    )
