"""Training-step cost of CM-MaskSD against the bare model, its floor and a naive reference.

    python -m benchmarks.step_cost [--config cpu|gpu] [--quick] [--repeats N] [--tokens 64,144]
                                   [--json out.json] [--markdown out.md] [--plot out.png]

Run from the repository root. It measures masksd through its public API only. One process, one
model, one batch; every variant runs once per round, round-robin with a rotating start; warm-up
rounds are discarded; medians and IQR / min-max are reported.

Variants (each = forward + backward + ``Adam.step()`` + ``zero_grad``, one shared optimizer):
    baseline  bare ``RISModel`` + BCE segmentation loss (no wrapper)
    off / visual / textual / both / both_unmasked   ``MaskedSelfDistill`` with the keyword
              arguments in :data:`VARIANTS` (add a line there to time another configuration)
    mask_grounding / cal / cal_fused / lang_rec   each further objective alone (LMVSD/VMLSD off;
              cal_fused: CAL on the decoder's fused features)
    maskris   MaskRIS alone (one extra full pass on corrupted inputs); its floor
              ``ratio_floor_maskris = (baseline + floor_full) / baseline``, ``floor_full`` = one
              forward + backward of the bare model timed alone (no optimizer step)
    hooks     ``both`` through ``masksd.wrap(copy, hook_spec())``: ``ratio_hooks_vs_towers = hooks / both``
    naive     a reference written here: three full passes of the bare model (main; masked
              image + text; image + masked text), re-running both towers and the decoder per
              branch, with the plain-torch selection of :func:`naive_mask`, same three losses
Floor = baseline + one image-encoder pass + one text-encoder pass + two decoder passes, each
timed alone as forward + backward of the sum of what the decoder consumes (inputs are leaves
that require grad, as in the real branches). ``ratio_X = median_X / median_baseline``.
``eval_ratio``: no-grad eval forward of the wrapped model (eval mode) over the bare model.
``masking_share``: token selection (correlation scores, top-K, random subset: :func:`naive_mask`)
plus token replacement forward and backward, for both branches, timed alone on the step's shapes
(10 calls per sample, interleaved with the steps), over the median ``both`` step (the library's
own selection code is private; this plain-torch version does the same work).
``masking_share_insitu``: the median over rounds of ``(both - both_unmasked) / both``, the cost
of drawing the masks and replacing the tokens inside real steps (``masking=False`` keeps the
scoring and top-K; a difference of two step times, so noisy and possibly slightly negative).
Activation memory (any device): bytes saved for backward in one step (``benchmarks.activations``)
over the baseline's: ``activation_ratio_both`` / ``_hooks`` / ``_naive`` / ``_floor``.
Peak memory: CUDA only (``max_memory_allocated`` above the allocation before the call); null on CPU.
RIS-style test models (``tests/ris_models``: CRIS-style late fusion, LAVT-style text -> image),
bare vs ``masksd.wrap`` through the hook backend after the main table: ``ratio_hooks_cris_style``,
``ratio_hooks_lavt_style`` and their floors ``ratio_floor_<model>`` (``benchmarks/step_cost_ris.py``).
Dense scorers (``--dense-scoring value|clearclip``) and feature surgery: ``benchmarks/dense_cost.py``
times them on this model and ``both`` step (``share_<mode>``, goal <= 0.01 of a step).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from dataclasses import asdict, replace
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from benchmarks import _common as cm
from benchmarks.activations import saved_activation_bytes
from benchmarks.step_cost_report import goals, markdown, paired_spread, ratios, table
from benchmarks.step_cost_ris import RIS_IMAGE_SIZE, measure_ris_models, ris_table
from examples.cris_clip.model import MODEL_CONFIGS, ModelConfig, build_model, build_objectives, hook_spec
from masksd import LMVSDConfig, MaskedSelfDistill, VMLSDConfig, wrap
from masksd.losses import consistency_loss, segmentation_loss

CONTEXT = 17  # token ids per sentence (RefCOCO)
CPU_PRESET = ModelConfig(  # ViT-B/16 proportions (head width 64, patch 16), scaled down for a CPU
    clip_cfg=dict(
        embed_dim=128,
        vision_cfg=dict(image_size=224, patch_size=16, width=192, layers=6, head_width=64),
        text_cfg=dict(context_length=17, vocab_size=49408, width=128, heads=2, layers=4),
    ),
    image_size=224,  # 196 image tokens, as ViT-B/16 at 224 px (ModelConfig's default is the demo's 64)
    image_layers=(1, 3),
    head_dim=64, head_layers=1, head_heads=4, head_ffn=256, head_proj_dim=32, dropout=0.1,
)
CONFIGS = {
    "cpu": dict(preset=CPU_PRESET, batch=8, amp=False, repeats=20, warmup=2,
                tokens=(64, 144, 256, 576, 900), sweep_repeats=6),
    "gpu": dict(preset=MODEL_CONFIGS["vitb16"], batch=16, amp=True, repeats=30, warmup=5,
                tokens=(196, 400, 576, 900, 1296), sweep_repeats=10),
}
QUICK = dict(repeats=5, warmup=1, tokens=(64, 144), sweep_repeats=3)
LMVSD, VMLSD = LMVSDConfig(), VMLSDConfig()  # the paper's defaults
# The wrapped variants: name -> MaskedSelfDistill keyword arguments. Each is timed in the main
# table and reported as ratio_<name>; add a line to time another configuration.
VARIANTS: dict[str, dict] = {
    "off": dict(lmvsd=None, vmlsd=None),  # both branches off (= train.py --method baseline)
    "visual": dict(vmlsd=None),  # LMVSD only
    "textual": dict(lmvsd=None),  # VMLSD only
    "both": dict(),
    "both_unmasked": dict(lmvsd=replace(LMVSD, masking=False), vmlsd=replace(VMLSD, masking=False)),
    "mask_grounding": dict(lmvsd=None, vmlsd=None, objectives=("mask_grounding",)),
    "cal": dict(lmvsd=None, vmlsd=None, objectives=("cal",)),
    "cal_fused": dict(lmvsd=None, vmlsd=None, objectives=("cal_fused",)),
    "lang_rec": dict(lmvsd=None, vmlsd=None, objectives=("lang_rec",)),
    "maskris": dict(lmvsd=None, vmlsd=None, seg_weight=0.5, objectives=("maskris",)),  # MaskRIS as the paper
}
# "hooks" (both branches through masksd.wrap on a copy of the model) is timed beside "both".
MAIN_TASKS = ("baseline", *VARIANTS, "hooks", "naive", "floor_image", "floor_text", "floor_decoder",
              "floor_full", "eval_bare", "eval_wrapped", "masking_x10")
SWEEP_TASKS = ("baseline", "both", "naive", "floor_image", "floor_text", "floor_decoder")
RATIO_KEYS = (*VARIANTS, "hooks", "naive")
ACTIVATION_TASKS = ("baseline", "both", "hooks", "naive", "floor_image", "floor_text", "floor_decoder")


def preset_for_tokens(preset: ModelConfig, tokens: int, patch: int = 16) -> ModelConfig:
    side = round(tokens**0.5)
    if side * side != tokens:
        raise SystemExit(f"--tokens: {tokens} is not a square number of patches")
    return replace(preset, image_size=side * patch)


def naive_mask(guide: Tensor, tokens: Tensor, maskable: Tensor, *, top_k: float, ratio: float,
               generator: torch.Generator) -> Tensor:
    """Plain-torch guided masking: score ``tokens [B, N, D]`` against ``guide [B, D]``, keep the
    top ``top_k`` of the ``maskable [B, N]`` tokens, mask a random ``ratio`` of those: ``[B, N]`` bool."""
    with torch.no_grad():
        scores = (torch.einsum("bd,bnd->bn", guide.float(), tokens.float())
                  .masked_fill(~maskable, float("-inf")))
        n_kept = (maskable.sum(1) * top_k).round().clamp(min=1)
        kept = (scores.argsort(1, descending=True).argsort(1) < n_kept[:, None]) & maskable
        draws = torch.rand(kept.shape, generator=generator, device=kept.device).masked_fill(~kept, 2.0)
        return (draws.argsort(1).argsort(1) < (kept.sum(1) * ratio).round()[:, None]) & kept


class Bench:
    """The model, its wrappers, one optimizer, one batch, and one step function per variant."""

    def __init__(self, preset: ModelConfig, batch: int, device: torch.device, amp: bool, seed: int = 0):
        cm.seed_everything(seed)
        self.model = build_model(preset).to(device)
        m = self.model
        self.wrapped = {name: MaskedSelfDistill(
            m.image_tower, m.text_tower, m.decoder, **{k: v for k, v in kwargs.items() if k != "objectives"},
            extra_objectives=build_objectives(kwargs.get("objectives", ()), m, preset)).to(device)
            for name, kwargs in VARIANTS.items()}
        cm.seed_everything(seed)
        self.hooked = wrap(copy.deepcopy(m), hook_spec()).to(device)  # same weights, its own hooks
        self.naive_tokens = nn.ParameterList(
            [nn.Parameter(torch.randn(t.embed_dim) * 0.02) for t in (m.image_tower, m.text_tower)]
        ).to(device)
        params = [*m.parameters(), *self.naive_tokens]
        params += [p for w in self.wrapped.values() for p in w.added_parameters().values()]
        params += list(self.hooked.parameters())
        self.opt = torch.optim.Adam(list(dict.fromkeys(params)), lr=1e-5)
        self.x, self.t, self.y = cm.synthetic_batch(batch, preset.image_size, CONTEXT, device, seed)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        with torch.no_grad(), self.amp():  # main-branch intermediates for the parts timed alone
            ie, te = m.image_tower.embed(self.x), m.text_tower.embed(self.t)
            ienc, tenc = m.image_tower.encode(ie), m.text_tower.encode(te)
        self.main = SimpleNamespace(image_embedded=ie, text_embedded=te, image_encoded=ienc,
                                    text_encoded=tenc)
        self.grads = {"image": torch.ones_like(ie.tokens), "text": torch.ones_like(te.tokens)}

    # --- bookkeeping ---------------------------------------------------------------------
    def set_mode(self, name: str) -> None:
        for module in (self.model, *self.wrapped.values(), self.hooked):
            module.train(not name.startswith("eval"))

    def clear(self, name: str) -> None:
        self.opt.zero_grad(set_to_none=True)

    def _finish(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    # --- training steps --------------------------------------------------------------------
    def baseline(self) -> None:
        with self.amp():
            loss = segmentation_loss(self.model(self.x, self.t), self.y)
        self._finish(loss)

    def wrapped_step(self, name: str) -> None:
        with self.amp():
            out = self.wrapped[name](self.x, self.t, self.y, generator=self.generator)
        self._finish(out.loss)

    def hooks(self) -> None:
        with self.amp():
            out = self.hooked(self.x, self.t, target=self.y, generator=self.generator)
        self._finish(out.loss)

    def naive(self) -> None:
        it, tt, dec = self.model.image_tower, self.model.text_tower, self.model.decoder
        tok_i, tok_t = self.naive_tokens
        with self.amp():
            ie, te = it.embed(self.x), tt.embed(self.t)
            ienc, tenc = it.encode(ie), tt.encode(te)
            main = dec(ienc, tenc)
            m_img = naive_mask(tenc.global_feature, ienc.tokens, ie.maskable, top_k=LMVSD.top_k,
                               ratio=LMVSD.ratio, generator=self.generator)
            m_txt = naive_mask(ienc.global_feature, tenc.tokens, te.maskable, top_k=VMLSD.top_k,
                               ratio=VMLSD.ratio, generator=self.generator)
            ie1 = it.embed(self.x)  # pass 2: image re-embedded and masked, text re-encoded
            masked_image = torch.where(m_img[..., None], tok_i.to(ie1.tokens.dtype), ie1.tokens)
            out1 = dec(it.encode(ie1.with_tokens(masked_image)), tt.encode(tt.embed(self.t)))
            te2 = tt.embed(self.t)  # pass 3: image re-encoded, text masked
            masked_text = torch.where(m_txt[..., None], tok_t.to(te2.tokens.dtype), te2.tokens)
            out2 = dec(it.encode(it.embed(self.x)), tt.encode(te2.with_tokens(masked_text)))
            loss = (segmentation_loss(main, self.y) + LMVSD.weight * consistency_loss(out1, main)
                    + VMLSD.weight * consistency_loss(out2, main))
        self._finish(loss)

    # --- parts of the floor, each alone (forward + backward) -------------------------------
    def floor_image(self) -> None:
        ie = self.main.image_embedded
        with self.amp():
            enc = self.model.image_tower.encode(ie.with_tokens(cm.leaf(ie.tokens)))
            out = enc.tokens.float().sum() + sum(v.float().sum() for v in enc.features["levels"])
        out.backward()

    def floor_text(self) -> None:
        te = self.main.text_embedded
        with self.amp():
            enc = self.model.text_tower.encode(te.with_tokens(cm.leaf(te.tokens)))
            out = enc.global_feature.float().sum() + enc.features["words"].float().sum()
        out.backward()

    def floor_decoder(self) -> None:
        c = self.main
        image = type(c.image_encoded)(**cm.leaf(vars(c.image_encoded)))
        text = type(c.text_encoded)(**cm.leaf(vars(c.text_encoded)))
        with self.amp():
            out = self.model.decoder(image, text).float().sum()
        out.backward()

    def floor_full(self) -> None:
        """One full forward + backward of the bare model (MaskRIS's extra pass), no optimizer step."""
        with self.amp():
            loss = segmentation_loss(self.model(self.x, self.t), self.y)
        loss.backward()

    # --- eval and masking ------------------------------------------------------------------
    def eval_bare(self) -> None:
        with torch.no_grad(), self.amp():
            self.model(self.x, self.t)

    def eval_wrapped(self) -> None:
        with torch.no_grad(), self.amp():
            self.wrapped["both"](self.x, self.t)

    def masking_once(self) -> None:
        """Both branches' selection (:func:`naive_mask`) + token replacement fwd/bwd."""
        c = self.main
        with self.amp():
            for config, embedded, guide, tokens, token, grad in (
                (LMVSD, c.image_embedded, c.text_encoded.global_feature, c.image_encoded.tokens,
                 self.naive_tokens[0], self.grads["image"]),
                (VMLSD, c.text_embedded, c.image_encoded.global_feature, c.text_encoded.tokens,
                 self.naive_tokens[1], self.grads["text"]),
            ):
                masked = naive_mask(guide, tokens, embedded.maskable, top_k=config.top_k, ratio=config.ratio,
                                    generator=self.generator)
                src = cm.leaf(embedded.tokens)
                out = torch.where(masked[..., None], token.to(src.dtype), src)
                torch.autograd.grad(out, (src, token), grad)

    def masking_x10(self) -> None:
        for _ in range(10):
            self.masking_once()

    def tasks(self, names) -> dict:
        return {n: (lambda n=n: self.wrapped_step(n)) if n in VARIANTS else getattr(self, n) for n in names}


def run(args) -> dict:
    cfg = dict(CONFIGS[args.config], **(QUICK if args.quick else {}))
    if args.repeats:
        cfg["repeats"] = args.repeats
    if args.tokens is not None:
        cfg["tokens"] = tuple(int(v) for v in args.tokens.split(",") if v)
    if args.batch:
        cfg["batch"] = args.batch
    device = torch.device("cuda" if args.config == "gpu" and torch.cuda.is_available() else "cpu")
    amp = cfg["amp"] and device.type == "cuda"
    timer, started = cm.Timer(device), time.perf_counter()
    deadline, load0 = (started + args.budget if args.budget > 0 else None), cm.loadavg()
    print(f"step_cost: config={args.config}{' (quick)' if args.quick else ''} "
          f"device={cm.device_name(device)} "
          f"torch={torch.__version__} threads={torch.get_num_threads()} batch={cfg['batch']} "
          f"repeats={cfg['repeats']} (+{cfg['warmup']} warm-up) amp={amp}", flush=True)
    if load0 and load0[0] > 0.5 and device.type == "cpu":
        print(f"warning: load average {load0} before the run: other processes compete for the CPU",
              flush=True)

    bench = Bench(cfg["preset"], cfg["batch"], device, amp)
    times, peaks = cm.interleaved(bench.tasks(MAIN_TASKS), cfg["repeats"], cfg["warmup"], timer,
                                  before=bench.set_mode, after=bench.clear, min_rounds=5,
                                  deadline=None if deadline is None else started + 0.45 * args.budget)
    stats = {k: cm.summarize(v) for k, v in times.items()}
    mask_s = stats.pop("masking_x10")["median"] / 10
    insitu = statistics.median([(a - b) / a for a, b in zip(times["both"], times["both_unmasked"])])
    tokens_main = bench.main.image_embedded.tokens.shape[1]
    tasks = bench.tasks(ACTIVATION_TASKS)
    modules = (bench.model, bench.hooked, *bench.wrapped.values())
    activations = {}
    for name in ACTIVATION_TASKS:  # bytes saved for backward in one step (not timed)
        bench.set_mode(name)
        activations[name] = saved_activation_bytes(tasks[name], modules)
        bench.clear(name)
    del bench
    cm.free_memory()

    med = {k: v["median"] for k, v in stats.items()}
    parts = {k: med[f"floor_{k}"] for k in ("image", "text", "decoder")}
    result = {
        "config": args.config, "quick": args.quick, "device": cm.device_name(device), "loadavg_start": load0,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": cfg["batch"],
        "amp_bf16": amp, "repeats": len(times["baseline"]), "warmup": cfg["warmup"],
        "budget_s": args.budget, "image_tokens": tokens_main,
        "preset": asdict(cfg["preset"]),
        **ratios(stats, RATIO_KEYS),
        "ratio_hooks_vs_towers_spread": cm.summarize([a / b for a, b in zip(times["hooks"], times["both"])]),
        "activation_bytes": activations,
        "activation_ratio_both": activations["both"] / activations["baseline"],
        "activation_ratio_hooks": activations["hooks"] / activations["baseline"],
        "activation_ratio_naive": activations["naive"] / activations["baseline"],
        "activation_ratio_floor": (activations["baseline"] + activations["floor_image"]
                                   + activations["floor_text"] + 2 * activations["floor_decoder"])
                                  / activations["baseline"],
        "ratio_floor_maskris": (med["baseline"] + med["floor_full"]) / med["baseline"],  # + one full fwd+bwd
        "eval_ratio": med["eval_wrapped"] / med["eval_bare"],
        "masking_share": mask_s / med["both"],
        "masking_share_method": "isolated: plain-torch selection (scores, top-K, random subset) + token "
                                "replacement fwd/bwd, both branches, step shapes, 10 calls/sample "
                                "interleaved with the steps",
        "masking_share_insitu": insitu,
        "masking_share_insitu_method": "median over rounds of (both - both_unmasked) / both: mask draws and "
                                       "token replacement inside real steps (difference of two step times)",
        "masking_s": mask_s,
        "medians_s": med,
        "spread_s": {k: {q: v[q] for q in ("q1", "q3", "min", "max", "n")} for k, v in stats.items()},
        "ratio_spread": paired_spread(times, RATIO_KEYS),
        "peak_mem_mib": peaks if device.type == "cuda" else None,
        "part_share": {k: v / sum(parts.values()) for k, v in parts.items()},
        "part_over_baseline": {k: v / med["baseline"] for k, v in parts.items()},
    }
    print(table(result), flush=True)
    # the RIS-style test models through the hook backend, with their own floors (step_cost_ris)
    ris_deadline = None if deadline is None else time.perf_counter() + 0.1 * args.budget
    # (at least 2 samples: the RIS-style models' BatchNorm cannot train on one)
    result.update(measure_ris_models(max(2, cfg["batch"]), RIS_IMAGE_SIZE[device.type], device, timer,
                                     cfg["repeats"], cfg["warmup"], deadline=ris_deadline))
    print(ris_table(result), flush=True)

    sweep, weights = [], [n**1.2 for n in cfg["tokens"]]  # rough relative cost of a sweep point
    for i, n in enumerate(cfg["tokens"]):
        preset = preset_for_tokens(cfg["preset"], n)
        bench = Bench(preset, cfg["batch"], device, amp)
        point_deadline = None  # this point's share of the time left (3 rounds are always measured)
        if deadline is not None:
            now = time.perf_counter()
            point_deadline = now + max(0.0, deadline - now) * weights[i] / sum(weights[i:])
        t_sweep, p_sweep = cm.interleaved(bench.tasks(SWEEP_TASKS), cfg["sweep_repeats"], 1, timer,
                                          before=bench.set_mode, after=bench.clear,
                                          deadline=point_deadline)
        del bench
        cm.free_memory()
        s = {k: cm.summarize(v) for k, v in t_sweep.items()}
        row = {"tokens": n, "image_size": preset.image_size, "rounds": len(t_sweep["baseline"]),
               **ratios(s, RATIO_KEYS),
               "medians_s": {k: v["median"] for k, v in s.items()},
               "peak_mem_mib": p_sweep if device.type == "cuda" else None}
        sweep.append(row)
        print(f"  sweep {n:5d} tokens ({preset.image_size}px): both {row['ratio_both']:.3f}  "
              f"floor {row['ratio_floor']:.3f}  naive {row['ratio_naive']:.3f}  "
              f"baseline {1e3 * row['medians_s']['baseline']:.0f} ms", flush=True)
    result["sweep"] = sweep
    result["goals"] = goals(result)
    result["wall_s"], result["loadavg_end"] = time.perf_counter() - started, cm.loadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    parser.add_argument("--repeats", type=int, default=0, help="measured rounds (default: per config)")
    parser.add_argument("--tokens", default=None, help="sweep image token counts, e.g. 64,144,256")
    parser.add_argument("--batch", type=int, default=0, help="override the config's batch size")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds; past it (45%% of it for the main table) rounds stop once a "
                             "minimum is measured (main 5, sweep 3); 0 = no limit")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    result = run(args)
    print("\n".join(f"goal {k}: {'yes' if ok else 'NO'}" for k, ok in result["goals"].items()))
    print(f"wall time {result['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result) + ris_table(result) + "\n")
    if args.plot and result["sweep"]:
        cm.plot_sweep(result["sweep"], ("naive", "both", "floor"), args.plot,
                      f"CM-MaskSD step cost ({result['config']}: {result['device'][:48]})")


if __name__ == "__main__":
    main()
