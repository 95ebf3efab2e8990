"""Golden values of two training steps per wrapped model, to hold a refactor of the engine to them exactly.

Not a test module: ``tests/test_golden.py`` recomputes every case and compares it with
``tests/golden_values.json``; ``PYTHONPATH=tests python -m tests.golden --write`` records that file, and
``python -m tests.golden`` (no flag) compares and prints the mismatches.

Each case (``cases()``) builds a model with fixed seeds, wraps it (tower entry
``masksd.MaskedSelfDistill(image_tower, text_tower, decoder)`` or hook entry ``masksd.wrap(model,
spec)``) and runs two training steps: ``torch.manual_seed(STEP_SEED + step)`` (the global stream,
which dropout and drop-path draw from), a training forward with
``generator=torch.Generator().manual_seed(step)``, ``out.loss.backward()``, and a plain
``torch.optim.SGD(lr=0.1)`` step between the two. Per step it records

* ``losses``: every entry of ``out.losses`` and ``out.loss`` (key ``"loss"``), as ``float(v).hex()``;
* ``selections``: per objective of ``out.selections``, its bool and integer tensors (LMVSD / VMLSD
  ``kept`` / ``masked``; MaskRIS ``image_masked`` / ``text_*`` / ``ids``; CAL ``positives`` / ``valid``;
  ...) as nested lists of ints, and its ``grid`` (null when None);
* ``grad``: ``Σ p.grad.double().pow(2).sum()`` over ``wrapper.named_parameters()`` with a gradient, hex;

and after the two steps ``eval_equal`` (``wrapper.eval()(*inputs)`` equals ``wrapper.unwrap()(*inputs)``
bit for bit) and ``eval_sum`` (``Σ out.double().pow(2)`` of the eval output's tensors, hex: it sees
the updated weights and BatchNorm running statistics). Everything runs on the CPU with one
intra-op thread, inside ``torch.random.fork_rng``.

Floats are exact only for one torch build on one CPU kind: the file records ``torch.__version__``,
the versions of open_clip / timm / transformers, ``platform.machine()`` / ``platform.processor()``
and torch's CPU capability (the vector kernels ATen picked). The test skips a case where torch, a
library the case uses (``case_libraries``), the machine or the CPU capability differs (the processor
string is recorded for information only). The LAVT-style spec's VMLSD correlation scores are float
noise (masksd warns; see ``_lavt_style``), so ``ris_lavt_{default,replay,criterion}``'s word
selections hang on the last bit of the scores; ``ris_lavt_before_norm`` has robust ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import platform
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent

import masksd  # noqa: E402

VALUES = HERE / "golden_values.json"
STEPS = 2
LR = 0.1
BUILD_SEED = 0
STEP_SEED = 100  # torch.manual_seed(STEP_SEED + step) before each training forward

#: third-party libraries whose version each case's floats depend on (besides torch)
LIBRARIES = ("open_clip", "timm", "transformers")

Record = dict[str, Any]


# ------------------------------------------------------------------------------------- recording
def _hex(value: Any) -> str:
    return float(value).hex()


def _plain(value: Any) -> Any:
    """Bool / integer tensors as nested lists of ints; tuples (grids) as lists; else None."""
    if isinstance(value, Tensor) and (
        value.dtype == torch.bool or not (value.is_floating_point() or value.is_complex())
    ):
        return value.detach().cpu().long().tolist()
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def _selections(selections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, info in selections.items():
        kept = {key: _plain(value) for key, value in info.items()}
        kept = {key: value for key, value in kept.items() if value is not None or key == "grid"}
        if kept:
            out[name] = dict(sorted(kept.items()))
    return out


def _grad(wrapper: torch.nn.Module) -> str:
    total = torch.zeros((), dtype=torch.float64)
    for _, p in wrapper.named_parameters():
        if p.grad is not None:
            total = total + p.grad.detach().double().pow(2).sum()
    return _hex(total)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for key in sorted(value):
            yield from _tensors(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of (nested) outputs: tensors by ``torch.equal``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """One intra-op thread and a forked global RNG, both restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def run_case(
    build: Callable[[], masksd.MaskedSelfDistill],
    train_args: tuple[Any, ...],
    train_kwargs: dict[str, Any],
    eval_args: tuple[Any, ...],
) -> Record:
    """Build (global seed ``BUILD_SEED``), train ``STEPS`` steps and record (module docstring)."""
    with _isolated():
        torch.manual_seed(BUILD_SEED)
        wrapper = build()
        optimizer = torch.optim.SGD(wrapper.parameters(), lr=LR)
        steps = []
        for step in range(STEPS):
            if step:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(STEP_SEED + step)
            wrapper.train()
            out = wrapper(*train_args, generator=torch.Generator().manual_seed(step), **train_kwargs)
            out.loss.backward()
            losses = {name: _hex(value) for name, value in out.losses.items()}
            losses["loss"] = _hex(out.loss.detach())
            steps.append(
                {"losses": losses, "selections": _selections(out.selections), "grad": _grad(wrapper)}
            )
        wrapper.eval()
        with torch.no_grad():
            ours = wrapper(*eval_args)
            bare = wrapper.unwrap()(*eval_args)
        total = torch.zeros((), dtype=torch.float64)
        for tensor in _tensors(ours):
            total = total + tensor.detach().double().pow(2).sum()
        return {"steps": steps, "eval_equal": _same(ours, bare), "eval_sum": _hex(total)}


# ----------------------------------------------------------------------------- reference model
SOT, EOT, PAD = 49406, 49407, 0


def _reference_inputs() -> tuple[Tensor, Tensor, Tensor]:
    """tests/test_hooks_reference.py's batch: images [4, 3, 64, 64], CLIP ids [4, 17], rectangle masks."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    texts = torch.full((4, 17), PAD, dtype=torch.long)
    for i, n in enumerate((3, 6, 1, 9)):
        texts[i, 0], texts[i, n + 1] = SOT, EOT
        texts[i, 1 : n + 1] = torch.randint(1, 49000, (n,), generator=g)
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    for i, (y, x, h, w) in enumerate(((4, 8, 30, 20), (20, 0, 40, 50), (0, 30, 16, 34), (10, 10, 44, 44))):
        masks[i, y : y + h, x : x + w] = True
    return images, texts, masks


def _reference(
    entry: str, *, head_dropout: float | None = None, extras: bool = False, **options: Any
) -> Record:
    """The demo CLIP-ViT + CRIS model (examples/cris_clip/model.py) through ``entry`` ("towers" / "hooks")."""
    from examples.cris_clip.model import (
        EXTRA_OBJECTIVES,
        MODEL_CONFIGS,
        build_model,
        build_objectives,
        hook_spec,
    )

    config = MODEL_CONFIGS["demo"]
    if head_dropout is not None:
        config = dataclasses.replace(config, dropout=head_dropout)

    def build() -> masksd.MaskedSelfDistill:
        model = build_model(config)
        objectives = build_objectives(EXTRA_OBJECTIVES, model, config) if extras else []
        if entry == "towers":
            return masksd.MaskedSelfDistill(
                model.image_tower, model.text_tower, model.decoder,
                extra_objectives=objectives, config=masksd.DistillConfig(**options),
            )
        return masksd.wrap(
            model, hook_spec(), extra_objectives=objectives, config=masksd.DistillConfig(**options)
        )

    images, texts, masks = _reference_inputs()
    if entry == "towers":
        return run_case(build, (images, texts, masks), {}, (images, texts))
    return run_case(build, (images, texts), {"target": masks}, (images, texts))


def _reference_cases() -> dict[str, Callable[[], Record]]:
    out: dict[str, Callable[[], Record]] = {}
    for entry in ("towers", "hooks"):
        out[f"ref_{entry}_default"] = lambda e=entry: _reference(e)
        out[f"ref_{entry}_replay"] = lambda e=entry: _reference(e, dropout="replay")  # demo head: dropout 0
        out[f"ref_{entry}_dropout_fresh"] = lambda e=entry: _reference(e, head_dropout=0.1)
        out[f"ref_{entry}_dropout_replay"] = lambda e=entry: _reference(e, head_dropout=0.1, dropout="replay")
        out[f"ref_{entry}_extras"] = lambda e=entry: _reference(e, extras=True)
    out["ref_towers_private_decoder"] = lambda: _reference("towers", share_decoder=False)
    out["ref_towers_ground_truth"] = lambda: _reference("towers", supervision="ground_truth")
    return out


# ----------------------------------------------------------------------------- RIS-style models
def _cris_style(**options: Any) -> Record:
    from ris_models import cris_style
    from ris_models.specs import cris_spec

    batch = cris_style.make_batch()
    return run_case(lambda: masksd.wrap(cris_style.CRIS(), cris_spec(), **options),
                    (batch.img, batch.word, batch.mask), {}, (batch.img, batch.word))


def _lavt_style(criterion: bool = False, before_norm: bool = False, **options: Any) -> Record:
    """``lavt_spec()``: its image tap (PWAM's ``f_query``, after InstanceNorm) makes the VMLSD correlation
    scores float noise (masksd warns), so ``before_norm`` taps ``f_query.0`` instead, as the warning
    advises (test_lavt_two_model.py's spec): selections that do not hang on the last bit."""
    from ris_models import lavt_style
    from ris_models.specs import lavt_spec

    spec = lavt_spec()
    if before_norm:
        pwam = "backbone.layers.2.fusion.image_lang_att"
        image = dataclasses.replace(spec.image, tokens=masksd.Tap(f"{pwam}.f_query.0", layout="bcn"))
        spec = dataclasses.replace(spec, image=image)
    batch = lavt_style.make_batch()
    loss = lavt_style.lavt_loss if criterion else None
    return run_case(lambda: masksd.wrap(lavt_style.LAVTOne(), spec, criterion=loss, **options),
                    (batch.image, batch.input_ids, batch.attention_mask), {"target": batch.target},
                    (batch.image, batch.input_ids, batch.attention_mask))


def _rela_style(**options: Any) -> Record:
    from ris_models import rela_style
    from ris_models.specs import rela_spec

    inputs = rela_style.make_inputs()
    lmvsd = masksd.LMVSDConfig(top_k=0.5, ratio=0.5)  # tests/test_rela_style.py's: 2 of 4 res5 units
    return run_case(lambda: masksd.wrap(rela_style.ReLAStyle(), rela_spec(), lmvsd=lmvsd, **options),
                    (inputs,), {}, (inputs,))


def _timm_style(**options: Any) -> Record:
    from ris_models import timm_style
    from ris_models.specs import timm_spec

    batch = timm_style.make_batch()
    return run_case(lambda: masksd.wrap(timm_style.TimmRIS(), timm_spec(), **options),
                    (batch.images, batch.ids), {"target": batch.mask}, (batch.images, batch.ids))


def _ris_cases() -> dict[str, Callable[[], Record]]:
    out: dict[str, Callable[[], Record]] = {}
    for name, run in (
        ("cris", _cris_style), ("lavt", _lavt_style), ("rela", _rela_style), ("timm", _timm_style)
    ):
        out[f"ris_{name}_default"] = run
        out[f"ris_{name}_replay"] = lambda run=run: run(dropout="replay")
    out["ris_lavt_criterion"] = lambda: _lavt_style(criterion=True)  # LAVT's weighted CE as criterion=
    out["ris_lavt_before_norm"] = lambda: _lavt_style(before_norm=True)
    return out


# ---------------------------------------------------------------------------------- tiny models
def _tiny_towers(batch_norm: bool = False, **options: Any) -> Record:
    """tests/tiny_models.py's towers (``tiny_wrapper``'s build), ``tiny_batch()``."""
    import tiny_models

    def build() -> masksd.MaskedSelfDistill:
        image_tower, text_tower, decoder = tiny_models.make_model(0, batch_norm=batch_norm)
        return masksd.MaskedSelfDistill(image_tower, text_tower, decoder, **options)

    images, ids, target = tiny_models.tiny_batch()
    return run_case(build, (images, ids, target), {}, (images, ids))


def _tiny_hooks(model: str = "TinyRIS", **options: Any) -> Record:
    """tests/hook_models.py's ``TinyRIS`` (CNN stem, 4x4 backbone units over the 8x8 embedding grid)
    or ``EarlyFusionRIS`` (text -> image fusion, BatchNorm, two-class logits), ``make_batch()``."""
    import hook_models

    cls = getattr(hook_models, model)
    spec = hook_models.tiny_spec() if model == "TinyRIS" else hook_models.early_spec()
    images, ids, masks = hook_models.make_batch()
    return run_case(
        lambda: masksd.wrap(cls(), spec, **options), (images, ids), {"target": masks}, (images, ids)
    )


def _tiny_cases() -> dict[str, Callable[[], Record]]:
    return {
        "tiny_towers_default": _tiny_towers,
        "tiny_towers_batchnorm": lambda: _tiny_towers(batch_norm=True),
        "tiny_hooks_cnn_units": _tiny_hooks,
        "tiny_hooks_early_fusion_batchnorm": lambda: _tiny_hooks("EarlyFusionRIS"),
    }


# ------------------------------------------------------------------------------------- MaskRIS
def _maskris(entry: str, mode: str) -> Record:
    """``MaskRIS`` alone (``MaskRIS.paper_options()``) with tests/test_objectives_maskris.py's
    configs: on the tiny towers with ``FusedTinyDecoder`` or on the README's ``TinyRIS``."""
    import hook_models
    import objective_models
    import tiny_models

    if entry == "towers":
        config = masksd.objectives.MaskRISConfig(mode=mode, patch_size=4, mask_id=3,
                                      special_ids=(tiny_models.PAD, tiny_models.SOT, tiny_models.EOT))
        images, ids, target = objective_models.towers_batch()

        def build() -> masksd.MaskedSelfDistill:
            image_tower, text_tower, _ = tiny_models.make_model(0)
            objective = masksd.objectives.MaskRIS(config, image_dim=16, text_dim=16)
            return masksd.MaskedSelfDistill(
                image_tower, text_tower, objective_models.FusedTinyDecoder(),
                extra_objectives=[objective], **masksd.objectives.MaskRIS.paper_options(),
            )

        return run_case(build, (images, ids, target), {}, (images, ids))
    config = masksd.objectives.MaskRISConfig(mode=mode, patch_size=8, mask_id=1)
    images, ids, target = objective_models.hooks_batch()

    def build_hooks() -> masksd.MaskedSelfDistill:
        model = hook_models.TinyRIS()
        objective = masksd.objectives.MaskRIS(config, image_dim=16, text_dim=16)
        return masksd.wrap(model, hook_models.tiny_spec(), extra_objectives=[objective],
                           **masksd.objectives.MaskRIS.paper_options())

    return run_case(build_hooks, (images, ids), {"target": target}, (images, ids))


def _maskris_cases() -> dict[str, Callable[[], Record]]:
    return {f"maskris_{entry}_{mode}": (lambda e=entry, m=mode: _maskris(e, m))
            for entry in ("towers", "hooks") for mode in ("input", "embedding")}


# ------------------------------------------------------------------------------------ the cases
def cases() -> dict[str, Callable[[], Record]]:
    """Case name -> a zero-argument function that builds, trains two steps and returns the record."""
    return {**_reference_cases(), **_ris_cases(), **_tiny_cases(), **_maskris_cases()}


def case_libraries(name: str) -> tuple[str, ...]:
    """The third-party libraries (of ``LIBRARIES``) whose version case ``name``'s floats depend on."""
    if name.startswith("ref_") or name.startswith("ris_cris"):
        return ("open_clip",)
    if name.startswith("ris_lavt"):
        return ("timm", "transformers")
    if name.startswith("ris_rela"):
        return ("transformers",)
    if name.startswith("ris_timm"):
        return ("timm",)
    return ()


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        return None


def environment() -> dict[str, Any]:
    """What the floats depend on besides the code: versions and the CPU kind."""
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return {
        "torch": torch.__version__,
        "libraries": {name: _version(name) for name in LIBRARIES},
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_capability": capability() if capability is not None else None,
    }


def dumps(data: dict[str, Any]) -> str:
    """JSON, indented, with every list of numbers (a selection row, a grid) on one line."""
    text = json.dumps(data, indent=1)
    return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]",
                  text) + "\n"


def load() -> dict[str, Any]:
    return json.loads(VALUES.read_text())


def mismatches(expected: Record, actual: Record, where: str = "") -> list[str]:
    """Human-readable differences between two records (empty: equal)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in sorted(expected.keys() | actual.keys()):
            if key not in actual:
                out.append(f"{where}.{key}: missing (expected {_short(expected[key])})")
            elif key not in expected:
                out.append(f"{where}.{key}: unexpected {_short(actual[key])}")
            else:
                out.extend(mismatches(expected[key], actual[key], f"{where}.{key}"))
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual) \
            and expected and isinstance(expected[0], dict):
        return [
            m for i, (e, a) in enumerate(zip(expected, actual)) for m in mismatches(e, a, f"{where}[{i}]")
        ]
    if _grid_of_ints(expected) and _grid_of_ints(actual) and len(expected) == len(actual) \
            and all(len(e) == len(a) for e, a in zip(expected, actual)):
        cells = [
            (b, i)
            for b, (e, a) in enumerate(zip(expected, actual))
            for i, (x, y) in enumerate(zip(e, a))
            if x != y
        ]
        if cells:
            shown = ", ".join(f"[{b}][{i}] {expected[b][i]}->{actual[b][i]}" for b, i in cells[:8])
            return [f"{where}: {len(cells)} entries differ: {shown}{' ...' if len(cells) > 8 else ''}"]
        return []
    if expected != actual:
        detail = ""
        if isinstance(expected, str) and isinstance(actual, str) and expected.startswith(("0x", "-0x")):
            with contextlib.suppress(ValueError):
                detail = f" ({float.fromhex(expected)!r} vs {float.fromhex(actual)!r})"
        return [f"{where}: expected {_short(expected)}, got {_short(actual)}{detail}"]
    return []


def _grid_of_ints(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(row, list) and all(isinstance(x, int) for x in row) for row in value)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--write", action="store_true", help=f"record {VALUES.name} (default: compare with it)"
    )
    parser.add_argument("names", nargs="*", help="only these cases (default: all)")
    args = parser.parse_args(argv)
    todo = cases()
    unknown = [n for n in args.names if n not in todo]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(todo)}")
    names = args.names or list(todo)
    if args.write:
        values: dict[str, Any] = {}
        if args.names and VALUES.exists():  # rewrite the named cases only
            values = load()["cases"]
        for name in names:
            print(name, flush=True)
            values[name] = todo[name]()
        data = {"environment": environment(), "cases": {n: values[n] for n in todo if n in values}}
        VALUES.write_text(dumps(data))
        print(f"wrote {VALUES}")
        return 0
    recorded = load()
    if recorded["environment"] != environment():
        print(f"note: recorded on {recorded['environment']}, running on {environment()}")
    failed = 0
    for name in names:
        if name not in recorded["cases"]:
            print(f"{name}: not recorded")
            failed += 1
            continue
        found = mismatches(recorded["cases"][name], todo[name]())
        print(f"{name}: {'ok' if not found else f'{len(found)} mismatches'}")
        for line in found:
            print(f"  {line}")
        failed += bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
