"""``MaskedSelfDistill``: the CM-MaskSD training engine, and ``masksd.wrap`` for unchanged models.

Training forward (``wrapper.train()``)::

    main branch:  the bare model runs once (M_seg), recording embedded tokens and features
    objectives:   LMVSD re-runs the model with masked image embeddings, VMLSD with masked word
                  embeddings (shared weights; the other modality reused where fusion allows)
    loss        = BCE(M_seg, GT) + λ1 · BCE(M_LMVSD, σ(M_seg)) + λ2 · BCE(M_VMLSD, σ(M_seg))

Eval forward (``wrapper.eval()``) runs the bare model only: ``unwrap()(...)``, bit for bit.

Two ways in, one engine (selection, losses, BatchNorm handling and reporting are shared):

* ``masksd.wrap(model, spec)``: the user's unchanged ``nn.Module``, driven through forward hooks
  described by a ``HookSpec`` (``masksd.backends.hooks``). Its ``state_dict()`` keys never
  change, so trained weights load into the user's own class with ``strict=True``.
* ``MaskedSelfDistill(image_tower, text_tower, decoder)``: a model built from towers
  (``masksd.towers``); the bare model is a ``RISModel``.

State dict of the wrapper: the bare model under ``model.`` and the training-only parameters
(mask tokens, objective heads, private decoders) under ``objectives.``; ``added_state_dict()``
and ``load_added_state_dict()`` save and load the latter alone.

BatchNorm (and SyncBatchNorm) layers of the bare model normalise the masked branches with those
branches' own batch statistics, but only the main branch updates their running statistics:
inference sees unmasked inputs. The layers are looked up at every step, so converting the
wrapper with ``nn.SyncBatchNorm.convert_sync_batchnorm`` after wrapping is fine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from masksd.backends.base import as_tensor_loss, running_stats_frozen
from masksd.backends.hooks import HookBackend
from masksd.backends.inputs import check_same_batch, check_step_target, missing_target_error
from masksd.backends.rng import RngTape
from masksd.backends.taps import resolve_module
from masksd.check import WrapReport, run_check
from masksd.checkpoints import ADDED_PREFIX
from masksd.config import DistillConfig
from masksd.controls import ObjectiveControls
from masksd.losses import segmentation_loss
from masksd.objectives.base import DistillContext, Objective
from masksd.objectives.guided_masking import BranchConfig, GuidedMaskedDistillation, LMVSDConfig, VMLSDConfig
from masksd.scorers import SCORERS, scorer_needs
from masksd.spec import HookSpec
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
        output: the bare model's own return value of the main branch (hooked models), so
            trainers that read the model's loss dict or tuple can still do so.
    """

    logits: Tensor
    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: Any = None


def _config_from_kwargs(config: DistillConfig | None, options: dict[str, Any]) -> DistillConfig:
    defaults = {f.name: f.default for f in fields(DistillConfig) if f.name not in ("lmvsd", "vmlsd")}
    defaults.update(lmvsd=True, vmlsd=True)
    if config is None:
        return DistillConfig(**options)
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a masksd.DistillConfig, got {type(config).__name__}")
    changed = sorted(k for k, v in options.items() if v is not defaults[k] and v != defaults[k])
    if changed:
        raise TypeError(f"give either config= or the options {changed}, not both")
    return config


class MaskedSelfDistill(ObjectiveControls, nn.Module):
    """Wrap a model with CM-MaskSD training objectives (see the module docstring).

    Args:
        image_tower / text_tower / decoder: the tower backend's model parts
            (``decoder(image: Encoded, text: Encoded) -> logits [B, 1, h, w]``). For an
            unchanged ``nn.Module`` use ``masksd.wrap(model, spec)`` instead.
        lmvsd / vmlsd / supervision / share_decoder / hard_targets / threshold / seg_weight:
            the fields of ``DistillConfig`` (paper defaults); or pass ``config=``.
        config: a ``DistillConfig`` holding all of the above.
        dropout: ``"fresh"`` or ``"replay"`` dropout draws in the branches (``DistillConfig``).
        extra_objectives: further ``Objective`` plug-ins run after the two branches.
        criterion: your own segmentation loss ``criterion(logits, target) -> scalar`` (see
            ``masksd.wrap``); None: masksd's BCE (or the model's own loss, ``HookSpec.loss``).
        backend: a ready ``Backend`` instead of the towers (``from_model`` passes a ``HookBackend``).

    Forward:
        Towers: ``forward(images, texts, target=None, *, generator=None)``. Hooked model:
        ``forward(*model_args, target=None, generator=None, **model_kwargs)``. Training mode
        returns a ``DistillOutput``; eval mode returns the bare model's output.
    """

    def __init__(
        self,
        image_tower: nn.Module | None = None,
        text_tower: nn.Module | None = None,
        decoder: Decoder | None = None,
        *,
        lmvsd: LMVSDConfig | BranchConfig | bool | None = True,
        vmlsd: VMLSDConfig | BranchConfig | bool | None = True,
        supervision: Literal["distill", "ground_truth"] = "distill",
        share_decoder: bool = True,
        hard_targets: bool = False,
        threshold: float = 0.5,
        seg_weight: float = 1.0,
        dropout: Literal["fresh", "replay"] = "fresh",
        config: DistillConfig | None = None,
        extra_objectives: Sequence[Objective] = (),
        criterion: Criterion | None = None,
        backend: HookBackend | None = None,
    ) -> None:
        super().__init__()
        options = dict(lmvsd=lmvsd, vmlsd=vmlsd, supervision=supervision, share_decoder=share_decoder,
                       hard_targets=hard_targets, threshold=threshold, seg_weight=seg_weight, dropout=dropout)
        towers = (image_tower, text_tower, decoder)
        self._positional_target = backend is None  # the tower entry: wrapper(images, texts, target)
        self._check_decoder = backend is None  # refuse a decoder's hidden parameters at the first step
        if backend is None:
            if any(part is None for part in towers):
                raise TypeError(
                    "MaskedSelfDistill needs image_tower, text_tower and decoder (the tower entry); "
                    "to wrap an unchanged model use masksd.wrap(model, spec)"
                )
            hidden = decoder_parameters_hidden(decoder)
            if hidden:
                raise TypeError(
                    f"decoder is a plain function that uses modules with parameters ({', '.join(hidden)}); "
                    "their parameters would be neither trained nor saved. Make the decoder an nn.Module "
                    "that holds them as submodules"
                )
            model = RISModel(image_tower, text_tower, decoder, decode_with_fused=True)  # type: ignore[arg-type]
            backend = HookBackend(model, tower_spec(model))
        elif any(part is not None for part in towers) or not isinstance(backend, HookBackend):
            raise TypeError("give either the towers (image_tower, text_tower, decoder) or backend=, not both")
        self._setup(backend, _config_from_kwargs(config, options), extra_objectives, criterion)

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
        backend = HookBackend(model, spec)
        unknown = set(options) - {f.name for f in fields(DistillConfig)}
        if unknown:
            raise TypeError(f"unexpected options {sorted(unknown)}; see masksd.DistillConfig")
        if config is not None and options:
            raise TypeError(f"give either config= or the options {sorted(options)}, not both")
        if config is None:
            defaults = {"lmvsd": True if spec.image is not None else None,
                        "vmlsd": True if spec.text is not None else None}
            config = DistillConfig(**{**defaults, **options})
        return cls(backend=backend, config=config, extra_objectives=extra_objectives, criterion=criterion)

    def _setup(
        self, backend: HookBackend, config: DistillConfig, extra_objectives: Sequence[Objective], criterion: Criterion | None
    ) -> None:
        self.model = backend.model
        self.backend = backend
        self.config = config
        self.seg_weight = float(config.seg_weight)
        self._disabled: frozenset[str] = frozenset()  # objectives skipped (``disabled_objectives``)
        decoder_path = backend.spec.decoder
        if not config.share_decoder and decoder_path is None:
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
                name=name, masked_modality=modality, embed_dim=backend.embed_width(modality), config=branch,
                supervision=config.supervision, hard_targets=config.hard_targets, threshold=config.threshold,
            )
            if config.share_decoder:
                objective = GuidedMaskedDistillation(**kwargs)
            else:
                shared = resolve_module(self.model, decoder_path, "HookSpec.decoder")  # type: ignore[arg-type]
                objective = GuidedMaskedDistillation.with_private_decoder(shared, engine=backend, **kwargs)
            if objective.mask_token is not None:
                backend.init_mask_token(modality, objective.mask_token)
            objectives[name] = objective
        for objective in extra_objectives:
            if not isinstance(objective, Objective):
                raise TypeError(f"extra_objectives must hold Objective instances, got {type(objective).__name__}")
            if objective.name in objectives or objective.name == "seg":
                raise ValueError(f"objective name {objective.name!r} is used twice")
            objectives[objective.name] = objective
        self.objectives = nn.ModuleDict(objectives)
        if criterion is not None and not callable(criterion):
            raise TypeError(f"criterion must be callable as criterion(logits, target) -> loss, got {type(criterion).__name__}")
        if criterion is not None and self.backend.spec.loss is not None:
            raise ValueError(
                "give either criterion= (your loss on the logits) or HookSpec.loss (the loss your model "
                "returns), not both: both would be the main segmentation term"
            )
        self.criterion = criterion

    def _check_branch(self, name: str, modality: str, branch: BranchConfig) -> None:
        """Refuse, at wrap time, a branch whose scorer needs features the spec does not declare."""
        spec = self.backend.spec
        if getattr(spec, modality) is None:
            raise ValueError(f"{name} masks {modality} tokens but HookSpec.{modality} is None; set {name}=None")
        if callable(branch.scorer):
            return
        other = "text" if modality == "image" else "image"
        mine, theirs = getattr(spec, modality), getattr(spec, other)
        present = {
            "tokens": mine.tokens is not None,
            "other_global": theirs is not None and (theirs.tokens is not None or theirs.global_ is not None),
            "other_tokens": theirs is not None and theirs.tokens is not None,
            "image": modality == "image",
        }
        wanted = {"tokens": f"HookSpec.{modality}.tokens", "other_global": f"HookSpec.{other}.global_ (or .tokens)",
                  "other_tokens": f"HookSpec.{other}.tokens", "image": "image tokens (it masks images only)"}
        missing = [wanted[need] for need in scorer_needs(branch.scorer) if not present[need]]
        if missing:
            raise ValueError(
                f"{name} uses scorer={branch.scorer!r}, which needs {' and '.join(missing)}"
                + (" in one shared space" if "image" not in scorer_needs(branch.scorer) else "")
                + f"; declare them, or choose {type(branch).__name__}(scorer=...) among "
                f"{[n for n in SCORERS if n != branch.scorer]}"
            )

    # ------------------------------------------------------------------------------ access
    @property
    def spec(self) -> HookSpec:
        """The ``HookSpec`` the engine runs (the tower entry's: ``masksd.towers.tower_spec``)."""
        return self.backend.spec

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
        """Backend, fusion type and what each branch runs (see also ``check``)."""
        return self.backend.describe()

    def check(self, *args: Any, **kwargs: Any) -> WrapReport:
        """Run one instrumented training step on a sample batch and return a ``WrapReport``;
        the model's parameters, gradients, buffers and RNG state are left as they were."""
        return run_check(self, args, kwargs)

    # ----------------------------------------------------------------------------- forward
    def forward(
        self, *args: Any, target: Tensor | None = None, generator: torch.Generator | None = None, **kwargs: Any
    ) -> DistillOutput | Any:
        """Training: ``DistillOutput``; eval: the bare model's output (see the class docstring)."""
        if getattr(self, "_is_replica", False):
            raise TypeError(
                "masksd does not run under nn.DataParallel (its replicas cannot gather a DistillOutput "
                "and would draw masks per device); use DistributedDataParallel: torchrun --nproc_per_node N"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        backend = self.backend
        if self._positional_target and len(args) == 3:  # the tower entry: wrapper(images, texts, target)
            if target is not None:
                raise TypeError("target given twice (positionally and as target=)")
            *args, target = args  # type: ignore[assignment]
            args = tuple(args)
        args, kwargs, target = backend.split_inputs(args, kwargs, target)
        if not self.training:
            named_in_model = self.spec.target is not None
            if target is not None and not named_in_model:
                raise ValueError(
                    "a target was passed in eval mode, where the wrapper returns the bare model's output "
                    "and ignores it; call wrapper.train() for a training step, or drop the target"
                )
            return backend.eval_forward(args, kwargs)
        valid = self._check_inputs(args, kwargs, target)
        backend.rng_tape = RngTape(self.model) if self.config.dropout == "replay" else None
        check = self._check_decoder and not is_compiling()
        with decoder_foreign_parameters(self.model) if check else nullcontext() as foreign:
            main = backend.run_main(args, kwargs, target)
            if foreign is not None:
                foreign.add_graph(main.logits)
        if foreign is not None:
            try:
                foreign.refuse(getattr(self.model, "decoder", None))
            except ValueError:
                backend.release()
                raise
            self._check_decoder = False
        try:
            return self._objectives(main, generator, valid)
        finally:
            backend.release()
            backend.rng_tape = None

    def _check_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any], target: Tensor | None) -> Tensor | None:
        """masksd's checks of a training step, before the model runs (``masksd.backends.inputs``);
        returns the deferred target check's flag (CUDA) or None."""
        backend = self.backend
        batch = check_same_batch(backend.batch_sizes(args, kwargs, target))
        if target is None:
            needed_by = backend.target_needed_by()
            if needed_by is None and self.criterion is not None:
                needed_by = "criterion= computes the segmentation loss from it"
            if needed_by is None and self.spec.loss is None:
                needed_by = "masksd's segmentation loss"
            if needed_by is not None:
                raise missing_target_error(needed_by)
            return None
        return check_step_target(target, batch=batch)

    def _objectives(self, main: Any, generator: torch.Generator | None, valid: Tensor | None) -> DistillOutput:
        if self.criterion is not None:
            seg = as_tensor_loss(self.criterion(main.raw_logits, main.target), "criterion(logits, target)")
        elif main.model_loss is not None:
            seg = main.model_loss
        else:
            seg = segmentation_loss(main.logits, main.target)
        if valid is not None:  # a CUDA target whose check is still in flight: a bad one gives NaN
            seg = torch.where(valid.to(seg.device), seg, torch.full_like(seg, float("nan")))
        context = DistillContext(
            model=self.model,
            image_embedded=main.embedded.get("image"),
            text_embedded=main.embedded.get("text"),
            image_encoded=main.encoded.get("image"),
            text_encoded=main.encoded.get("text"),
            main_logits=main.logits,
            target=main.target,
            generator=generator,
            backend=self.backend,
            output=main.output,
        )
        terms = {"seg": seg}
        selections: dict[str, dict[str, Any]] = {}
        active = [(name, objective) for name, objective in self.objectives.items() if name not in self._disabled]
        with running_stats_frozen(self.model):
            for name, objective in active:
                result = objective(context)
                terms[name] = result.loss.float()
                selections[name] = result.info
        # The weighted sum and the detached copies only now: a compiled region must not return a
        # loss and its detached copy (or 1.0 * loss) as two outputs (docs/troubleshooting.md).
        total = self.seg_weight * terms["seg"]
        for name, objective in active:
            total = total + objective.weight * terms[name]
        losses = {name: term.detach() for name, term in terms.items()}
        return DistillOutput(logits=main.logits, loss=total, losses=losses, selections=selections, output=main.output)


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
