"""Step cost of the RIS-style test models (``tests/ris_models``) through the hook backend.

``benchmarks.step_cost`` times them after its main table; this module holds the models' parts.
Per model, every round runs (interleaved, as the main table):

    bare     the unchanged model's training step (its own loss: CRIS's BCE; LAVT's weighted CE)
    hooks    ``masksd.wrap(copy, spec)`` with both branches (LAVT: ``criterion=`` its loss)
    image / text / decoder   the floor's parts, each alone as forward + backward of the sum of
             its outputs, inputs that come from another part being leaves that require grad

``ratio_hooks_<model> = hooks / bare``. The floor is what the branches must re-run at the least,
read off ``wrapper.check()``'s module calls per branch: a branch re-runs the image part when any
image ``reuse`` module ran in it, the text part likewise, and the decoder always. Late fusion
(CRIS) gives ``bare + image + text + 2 decoder``; text -> image fusion (LAVT, whose masked-text
branch is a full forward) gives ``bare + 2 image + text + 2 decoder``. The models are written
the way CRIS.pytorch and LAVT-RIS write theirs; the specs are the recipes of docs/wrapping.md
(``tests/ris_models/specs.py``; LAVT's image tokens tapped before PWAM's InstanceNorm).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import _common as cm
from masksd import MaskedSelfDistill, wrap
from tests.ris_models import cris_style, lavt_style
from tests.ris_models.specs import cris_spec, lavt_spec

__all__ = ["RIS_IMAGE_SIZE", "RIS_MODELS", "RisBench", "floor_parts", "measure_ris_models", "ris_table"]

RIS_MODELS = ("cris_style", "lavt_style")
#: image side per device type (the issue's CPU measurement of the real CRIS / LAVT used 128 px)
RIS_IMAGE_SIZE = {"cpu": 128, "cuda": 256}
PARTS = ("image", "text", "decoder")


def _sum(values: Any) -> Tensor:
    return sum(v.float().sum() for v in (values if isinstance(values, (list, tuple)) else [values]))


def floor_parts(wrapper: MaskedSelfDistill, *args: Any, **kwargs: Any) -> dict[str, int]:
    """How often the floor counts each part, from ``wrapper.check(*args, **kwargs)``: per masked
    branch the image (text) part when one of the image (text) ``reuse`` modules ran in it, and
    the decoder."""
    report = wrapper.check(*args, **kwargs)
    spec = wrapper.spec
    counts = dict.fromkeys(PARTS, 0)
    for run in ("masked image", "masked text"):
        calls = report.calls.get(run)
        if calls is None:
            continue
        counts["decoder"] += 1
        for part in ("image", "text"):
            patterns = spec.modality(part).reuse
            counts[part] += any(n and fnmatch.fnmatchcase(path, p)
                                for path, n in calls.items() for p in patterns)
    return counts


class RisBench:
    """One RIS-style model, its hooked copy, one optimizer and the step / part functions."""

    def __init__(self, name: str, batch: int, image_size: int, device: torch.device, seed: int = 0) -> None:
        cm.seed_everything(seed)
        self.name = name
        if name == "cris_style":
            self.model = cris_style.CRIS(image_size=image_size).to(device)
            b = cris_style.make_batch(batch, image_size, seed=seed)
            self.args, self.target = (b.img.to(device), b.word.to(device), b.mask.to(device)), None
            spec, options = cris_spec(), {}
        elif name == "lavt_style":
            self.model = lavt_style.LAVTOne().to(device)
            b = lavt_style.make_batch(batch, image_size, seed=seed)
            self.args = (b.image.to(device), b.input_ids.to(device), b.attention_mask.to(device))
            self.target = b.target.to(device)
            # tap before the InstanceNorm (no degenerate scores)
            pwam = "backbone.layers.2.fusion.image_lang_att"
            spec = lavt_spec()
            spec = dataclasses.replace(spec, image=dataclasses.replace(
                spec.image, tokens=dataclasses.replace(spec.image.tokens, module=f"{pwam}.f_query.0")))
            options = {"criterion": lavt_style.lavt_loss}
        else:
            raise ValueError(f"unknown RIS-style model {name!r}; known: {RIS_MODELS}")
        cm.seed_everything(seed)
        self.hooked = wrap(copy.deepcopy(self.model), spec, **options).to(device)
        self.model.train()
        self.hooked.train()
        self.kwargs = {} if self.target is None else {"target": self.target}
        self.generator = torch.Generator(device=device).manual_seed(seed)
        params = [*self.model.parameters(), *self.hooked.parameters()]
        self.opt = torch.optim.Adam(params, lr=1e-5)
        self.parts_counted = floor_parts(self.hooked, *self.args, **self.kwargs)
        with torch.no_grad():
            self._main = self._features()

    # --- steps -----------------------------------------------------------------------------
    def _finish(self, loss: Tensor) -> None:
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def bare(self) -> None:
        out = self.model(*self.args)
        self._finish(out[2] if self.name == "cris_style" else lavt_style.lavt_loss(out, self.target))

    def hooks(self) -> None:
        self._finish(self.hooked(*self.args, **self.kwargs, generator=self.generator).loss)

    # --- the floor's parts -------------------------------------------------------------------
    def _features(self) -> dict[str, Any]:
        """The main branch's inputs of each part (computed once, without grad)."""
        m = self.model
        if self.name == "cris_style":
            words, state = m.encode_text(self.args[1])
            return {"vis": m.encode_image(self.args[0]), "words": words, "state": state}
        image, ids, attention_mask = self.args
        l_feats = m.text_encoder(ids, attention_mask=attention_mask)[0].permute(0, 2, 1)
        l_mask = attention_mask.unsqueeze(-1).to(l_feats.dtype)
        return {"l_feats": l_feats, "l_mask": l_mask, "features": m.backbone(image, l_feats, l_mask)}

    def image(self) -> None:
        m, f = self.model, self._main
        if self.name == "cris_style":
            _sum(m.encode_image(self.args[0])).backward()
        else:
            _sum(m.backbone(self.args[0], cm.leaf(f["l_feats"]), f["l_mask"])).backward()

    def text(self) -> None:
        m = self.model
        if self.name == "cris_style":
            _sum(m.encode_text(self.args[1])).backward()
        else:
            _sum(m.text_encoder(self.args[1], attention_mask=self.args[2])[0]).backward()

    def decoder(self) -> None:
        m, f = self.model, cm.leaf(self._main)
        if self.name == "cris_style":
            word = self.args[1]
            fq = m.neck(f["vis"], f["state"])
            b, c, h, w = fq.shape
            fq = m.decoder(fq, f["words"], word == cris_style.PAD).reshape(b, c, h, w)
            _sum(m.proj(fq, f["state"])).backward()
        else:
            x = m.classifier(f["features"])
            _sum(nn.functional.interpolate(x, size=self.args[0].shape[-2:], mode="bilinear",
                                           align_corners=True)).backward()

    def tasks(self) -> dict[str, Callable[[], None]]:
        """``{"<model>_<task>": step}`` for ``cm.interleaved``."""
        return {f"{self.name}_{task}": getattr(self, task) for task in ("bare", "hooks", *PARTS)}

    def clear(self, _: str = "") -> None:
        self.opt.zero_grad(set_to_none=True)
        for module in (self.model, self.hooked):
            module.zero_grad(set_to_none=True)


def measure_ris_models(
    batch: int, image_size: int, device: torch.device, timer: cm.Timer, rounds: int, warmup: int,
    deadline: float | None = None, names: tuple[str, ...] = RIS_MODELS,
) -> dict[str, Any]:
    """Time each model's tasks (interleaved per model) and return ``ratio_hooks_<model>``,
    ``ratio_floor_<model>`` and, under ``ris_models``, the medians, spreads and floor counts."""
    result: dict[str, Any] = {"ris_models": {}}
    for name in names:
        bench = RisBench(name, batch, image_size, device)
        times, _ = cm.interleaved(bench.tasks(), rounds, warmup, timer, after=bench.clear, deadline=deadline,
                                  min_rounds=3)
        med = {task.removeprefix(f"{name}_"): cm.summarize(v)["median"] for task, v in times.items()}
        parts = bench.parts_counted
        floor = med["bare"] + sum(parts[p] * med[p] for p in PARTS)
        result[f"ratio_hooks_{name}"] = med["hooks"] / med["bare"]
        result[f"ratio_floor_{name}"] = floor / med["bare"]
        result["ris_models"][name] = {
            "image_size": image_size, "batch": batch, "rounds": len(times[f"{name}_bare"]),
            "floor_counts": parts, "medians_s": med, "fusion": bench.hooked.describe()["fusion"],
            "ratio_hooks_spread": cm.summarize([a / b for a, b in zip(times[f"{name}_hooks"],
                                                                      times[f"{name}_bare"])]),
        }
        del bench
        cm.free_memory()
    return result


def ris_table(result: dict[str, Any]) -> str:
    """Console / markdown lines for ``measure_ris_models``'s result."""
    lines = ["", "| RIS-style model | fusion | px | bare ms | hooks / bare | floor / bare | floor parts |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name, r in result["ris_models"].items():
        parts = " + ".join(f"{n} {p}" for p, n in r["floor_counts"].items() if n)
        lines.append(f"| {name} | {r['fusion']} | {r['image_size']} | {1e3 * r['medians_s']['bare']:.1f} | "
                     f"{result[f'ratio_hooks_{name}']:.3f} | {result[f'ratio_floor_{name}']:.3f} | "
                     f"bare + {parts} |")
    return "\n".join(lines)
