"""``TowerBackend``: runs a model built from two towers and a decoder (``masksd.towers``).

The main branch calls ``embed`` and ``encode`` of each tower and the decoder once; a masked
branch re-encodes only the masked modality and decodes it with the other modality's main-branch
features (late fusion by construction, as in the paper).

Hidden decoder parameters: on the first training step (eager, not while ``torch.compile``
traces) the main branch's decoder call runs under ``decoder_foreign_parameters``, which names
every module with trainable parameters outside the bare model that ran, and every such
``nn.Parameter`` the logits depend on; ``run_main`` refuses them with a ``ValueError``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_pre_hook

from masksd.backends.base import Backend, MainBranch, Modality, check_ids, check_logits
from masksd.backends.tower_passes import TowerPasses
from masksd.masking import replace_tokens
from masksd.torch_compat import is_compiling
from masksd.towers import Embedded, Encoded, Fused, RISModel, check_batch_sizes

__all__ = ["TowerBackend", "decoder_foreign_parameters", "decoder_parameters_hidden"]


def _tower_name(modality: Modality) -> str:
    return f"{modality}_tower"


class TowerBackend(TowerPasses, Backend):
    """Backend of ``MaskedSelfDistill(image_tower, text_tower, decoder)``.

    Args:
        model: the bare ``RISModel`` built from the towers and the decoder.
    """

    def __init__(self, model: RISModel) -> None:
        self.model = model
        self._main: MainBranch | None = None
        self._checked_widths = False
        self._checked_decoder = False

    def embed_width(self, modality: Modality) -> int:
        return int(getattr(self.model, _tower_name(modality)).embed_dim)

    def split_inputs(self, args, kwargs, target):  # type: ignore[override]
        if kwargs:
            raise TypeError(
                f"unexpected keyword arguments {sorted(kwargs)}: call wrapper(images, texts, target, "
                "generator=...)"
            )
        if len(args) == 3:
            if target is not None:
                raise TypeError("target given twice (positionally and as target=)")
            images, texts, target = args
        elif len(args) == 2:
            images, texts = args
        else:
            raise TypeError(f"expected wrapper(images, texts[, target]), got {len(args)} positional arguments")
        return (images, texts), {}, target

    def batch_sizes(self, args, kwargs, target):  # type: ignore[override]
        named = {"images": args[0], "texts": args[1], "target": target}
        return {name: int(v.shape[0]) for name, v in named.items() if isinstance(v, Tensor) and v.dim() > 0}

    def eval_forward(self, args, kwargs):  # type: ignore[override]
        return self.model(*args, **kwargs)

    def _embed(self, modality: Modality, inputs: Any) -> Embedded:
        tower = getattr(self.model, _tower_name(modality))
        embedded = tower.embed(inputs)
        if not isinstance(embedded, Embedded):
            raise TypeError(
                f"{_tower_name(modality)} ({type(tower).__name__}).embed must return masksd.Embedded"
                f"(tokens=..., maskable=...), got {type(embedded).__name__}"
            )
        return embedded

    def _encode(self, modality: Modality, embedded: Embedded) -> Encoded:
        tower = getattr(self.model, _tower_name(modality))
        encoded = tower.encode(embedded)
        if not isinstance(encoded, Encoded):
            raise TypeError(
                f"{_tower_name(modality)} ({type(tower).__name__}).encode must return masksd.Encoded"
                f"(tokens=..., global_feature=..., features=...), got {type(encoded).__name__}"
            )
        return encoded

    def _decode(self, decoder: Any, image: Encoded, text: Encoded) -> Tensor:
        logits = decoder(image, text)
        name = f"decoder ({type(decoder).__name__})"
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"{name} must return a logits tensor [B, 1, h, w], got {type(logits).__name__}; "
                "return the segmentation logits only"
            )
        return check_logits(logits, two_class=False, where=name)

    def _check_widths(self, embedded: dict[str, Embedded]) -> None:
        for modality, value in embedded.items():
            width = self.embed_width(modality)  # type: ignore[arg-type]
            if value.tokens.shape[-1] != width:
                raise ValueError(
                    f"{_tower_name(modality)}.embed_dim is {width} but its embed() returns tokens of "
                    f"width {value.tokens.shape[-1]} (shape {tuple(value.tokens.shape)}); set embed_dim "
                    "to the width of the embedded tokens (the mask token has that size)"
                )
        self._checked_widths = True

    def run_main(self, args, kwargs, target):  # type: ignore[override]
        images, texts = args
        self._inputs = (images, texts)  # for raw_input / run_corrupted (TowerPasses)
        embedded = {"image": self._embed("image", images), "text": self._embed("text", texts)}
        check_batch_sizes(embedded["image"].tokens.shape[0], embedded["text"].tokens.shape[0])
        if not self._checked_widths:
            self._check_widths(embedded)
        tape = self.rng_tape
        if tape is not None:
            tape.clear()
        encoded = {}
        for m, e in embedded.items():
            if tape is not None:
                tape.record(f"encode {m}")
            encoded[m] = self._encode(m, e)  # type: ignore[arg-type]
        if tape is not None:
            tape.record("decode")
        fused = None
        check = not self._checked_decoder and not is_compiling()
        with decoder_foreign_parameters(self.model) if check else nullcontext() as foreign:
            if callable(getattr(self.model.decoder, "forward_with_fused", None)):
                logits, fused = self._decode_with_fused(encoded["image"], encoded["text"])
            else:
                logits = self._decode(self.model.decoder, encoded["image"], encoded["text"])
            if foreign is not None:
                foreign.add_graph(logits)
        if foreign is not None:
            foreign.refuse(self.model.decoder)
            self._checked_decoder = True
        self._main = MainBranch(
            logits=logits, target=target, output=logits, embedded=embedded, encoded=encoded, fused=fused
        )
        return self._main

    def _decode_with_fused(self, image: Encoded, text: Encoded) -> tuple[Tensor, Fused]:
        name = f"decoder ({type(self.model.decoder).__name__}).forward_with_fused"
        result = self.model.decoder.forward_with_fused(image, text)
        if not isinstance(result, tuple) or len(result) != 2:
            raise TypeError(f"{name} must return (logits, fused), got {type(result).__name__}")
        logits, fused = result
        if not isinstance(logits, Tensor):
            raise TypeError(f"{name} must return a logits tensor first, got {type(logits).__name__}")
        return check_logits(logits, two_class=False, where=name), Fused.from_value(fused, name)

    def run_masked(self, modality, masked, mask_token, *, decoder=None):  # type: ignore[override]
        main = self._main
        if main is None:
            raise RuntimeError("run_masked() called before run_main()")
        embedded = main.embedded[modality]
        tokens = embedded.tokens
        if mask_token is not None:
            tokens = replace_tokens(tokens, masked, mask_token)
        tape = self.rng_tape
        with tape.branch(f"encode {modality}") if tape is not None else nullcontext():
            encoded = self._encode(modality, embedded.with_tokens(tokens))
            other = main.encoded["text" if modality == "image" else "image"]
            image, text = (encoded, other) if modality == "image" else (other, encoded)
            if tape is not None:
                tape.restore("decode")
            return self._decode(decoder if decoder is not None else self.model.decoder, image, text)

    def release(self) -> None:
        self._main = None
        self._inputs = None

    # -------------------------------------------------------------- optional capabilities
    def _main_branch(self) -> MainBranch:
        if self._main is None:
            raise RuntimeError("the main branch has not run in this training step")
        return self._main

    def token_ids(self) -> Tensor:
        embedded = self._main_branch().embedded["text"]
        tower = self.model.text_tower
        method = getattr(tower, "token_ids", None)
        ids = method(embedded) if callable(method) else embedded.extras.get("ids")
        where = f"text_tower ({type(tower).__name__})"
        if ids is None:
            raise TypeError(
                f"{where} provides no token ids: put them in Embedded.extras['ids'] in embed(), or define "
                "token_ids(embedded) -> [B, L] on the tower"
            )
        return check_ids(ids, embedded.maskable, where)

    def word_embedding(self) -> Tensor:
        tower = self.model.text_tower
        where = f"text_tower ({type(tower).__name__})"
        value = getattr(tower, "word_embedding", None)
        if value is None:
            value = getattr(tower, "token_embedding", None)
        elif callable(value) and not isinstance(value, nn.Module):
            value = value()
        weight = value.weight if isinstance(value, nn.Embedding) else value
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(
                f"{where} has no input-embedding matrix: give it a word_embedding attribute (an nn.Embedding "
                "or a [V, C] tensor) or method, or a token_embedding nn.Embedding"
            )
        return weight

    def encoded_with_grad(self, modality: Modality) -> Encoded | None:
        return self._main_branch().encoded[modality]

    def fused(self) -> Fused:
        main = self._main_branch()
        if main.fused is None:
            raise TypeError(
                f"decoder ({type(self.model.decoder).__name__}) provides no fused features: define "
                "forward_with_fused(image, text) -> (logits, fused [B, D, h, w] or [B, N, D]) on it, with "
                "forward(image, text) == forward_with_fused(image, text)[0] (see masksd.towers)"
            )
        return main.fused

    def encode_masked(self, modality: Modality, masked: Tensor, mask_token: Tensor) -> dict[str, Encoded | None]:
        main = self._main_branch()
        embedded = main.embedded[modality]
        tokens = replace_tokens(embedded.tokens, masked, mask_token)
        other: Modality = "text" if modality == "image" else "image"
        return {modality: self._encode(modality, embedded.with_tokens(tokens)), other: main.encoded[other]}

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "towers",
            "fusion": "late (towers are encoded independently)",
            "passes": {
                "lmvsd": "image encoder + decoder (text features reused)",
                "vmlsd": "text encoder + decoder (image features reused)",
            },
        }


def decoder_parameters_hidden(decoder: Any) -> list[str]:
    """Names of ``nn.Module``/``nn.Parameter`` objects a plain-function decoder reaches.

    A function or lambda that calls the user's neck and head keeps their parameters out of the
    wrapper's ``parameters()`` and ``state_dict()``: no gradient step, no checkpoint.
    """
    if isinstance(decoder, nn.Module):
        return []
    found: list[str] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, nn.Module) and any(True for _ in value.parameters()):
            found.append(f"{name} ({type(value).__name__})")
        elif isinstance(value, nn.Parameter):
            found.append(f"{name} (Parameter)")

    target = getattr(decoder, "__func__", decoder)
    owner = getattr(decoder, "__self__", None)
    if owner is not None:
        visit("self", owner)
    for arg in getattr(decoder, "args", ()) or ():  # functools.partial
        visit("partial argument", arg)
    for key, arg in (getattr(decoder, "keywords", None) or {}).items():
        visit(f"partial keyword {key}", arg)
    code = getattr(target, "__code__", None)
    if code is not None:
        for cell_name, cell in zip(code.co_freevars, getattr(target, "__closure__", None) or ()):
            try:
                visit(cell_name, cell.cell_contents)
            except ValueError:  # empty cell
                continue
        module_globals = getattr(target, "__globals__", {})
        for global_name in code.co_names:
            if global_name in module_globals:
                visit(global_name, module_globals[global_name])
        for default in getattr(target, "__defaults__", None) or ():
            visit("default argument", default)
    return found


class ForeignParameters:
    """What ran in a decoder call with trainable parameters outside the bare model.

    Attributes:
        modules: outermost modules (not the bare model's) with such parameters that ran.
        parameters: further such ``nn.Parameter`` objects the logits depend on (used without a
            module call, e.g. ``F.linear(x, head["w"])``).
    """

    def __init__(self, model: nn.Module) -> None:
        self._own_modules = {id(m) for m in model.modules()}
        self._own_parameters = {id(p) for p in model.parameters()}
        self._thread = threading.get_ident()
        self.modules: list[nn.Module] = []
        self.parameters: list[nn.Parameter] = []

    def _foreign(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad and id(p) not in self._own_parameters]

    def record(self, module: nn.Module, args: Any) -> None:
        """Global forward pre-hook: note ``module`` if it is foreign (outermost call only)."""
        if threading.get_ident() != self._thread or id(module) in self._own_modules:
            return
        if any(module is inner for found in self.modules for inner in found.modules()):
            return
        if self._foreign(module):
            self.modules.append(module)

    def add_graph(self, logits: Tensor) -> None:
        """Add the foreign ``nn.Parameter`` leaves of the autograd graph of ``logits [B, 1, h, w]``
        that no recorded module holds (one walk over the graph)."""
        covered = {id(p) for module in self.modules for p in module.parameters()}
        seen: set[Any] = set()
        stack = [logits.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if (
                isinstance(variable, nn.Parameter)
                and id(variable) not in self._own_parameters
                and id(variable) not in covered
            ):
                covered.add(id(variable))
                self.parameters.append(variable)
            stack.extend(next_node for next_node, _ in node.next_functions)

    def refuse(self, decoder: Any) -> None:
        """Raise the ``ValueError`` that names what was found (nothing found: return)."""
        found = [f"{type(m).__name__} ({sum(p.numel() for p in self._foreign(m)):,} parameters)" for m in self.modules]
        found += [f"an nn.Parameter of shape {list(p.shape)} ({p.numel():,} values)" for p in self.parameters]
        if not found:
            return
        name = getattr(decoder, "__qualname__", None) or type(decoder).__name__
        raise ValueError(
            f"decoder ({name}) uses trainable parameters that are not part of the wrapper: "
            f"{', '.join(found)}. They would be neither trained (wrapper.parameters()) nor saved "
            "(wrapper.state_dict()). Pass an nn.Module as decoder: wrap the callable in an nn.Module "
            "that holds them as submodules (a dict or list of modules hides them: use nn.ModuleDict / "
            "nn.ModuleList, and nn.Parameter attributes or nn.ParameterDict for raw parameters)"
        )


@contextmanager
def decoder_foreign_parameters(model: nn.Module) -> Iterator[ForeignParameters]:
    """Record, while the block runs, the modules outside ``model`` with trainable parameters.

    A process-wide forward pre-hook (``register_module_forward_pre_hook``) is installed for the
    block only (it records calls from this thread); call ``add_graph(logits)`` inside the block
    for raw parameters and ``refuse(decoder)`` after it. Frozen modules (no parameter with
    ``requires_grad``) are allowed: a fixed pretrained helper loaded by your own code.
    """
    found = ForeignParameters(model)
    handle = register_module_forward_pre_hook(found.record)
    try:
        yield found
    finally:
        handle.remove()
