"""What each scorer keeps, before any RIS training: a probe of the pretrained demo CLIP.

Builds the reference model from a CLIP checkpoint (``--pretrained``, e.g. the one
``examples/cris_clip/pretrain_clip.py`` writes; none: random init), wraps it with masksd, and runs
the wrapper's own selection (the training forward, no gradient) on synthetic training samples for
every scorer × metric. Reports, for LMVSD, the share of the kept patches that lies on the target
next to the target's share of all patches (what a random pick gives) and the share of the target
they cover; for VMLSD, the kept rate per word role. No training: a minute or two on 2 cores.

Besides the paper's scorer on the plain patch tokens, the dense-alignment fixes for CLIP's
"opposite visualization" (``masksd.adapters.clip_dense``): ``value`` (MaskCLIP's value path of the
last block), ``clearclip`` (q-q attention, no residual, no FFN), each alone and with ``surgery``
(CLIP Surgery: minus each token's mean score over the batch's sentences).

    python -m benchmarks.selection_probe \\
        --pretrained runs/accuracy/v2/pretrain-clip/open_clip_pytorch_model.bin \\
        --json docs/benchmarks/selection_probe.json --markdown docs/benchmarks/selection_probe.md
    python -m benchmarks.selection_probe --preset v2 \\
        --pretrained runs/pretrain-clip-v2/open_clip_pytorch_model.bin \\
        --json docs/benchmarks/selection_probe_v2.json --markdown docs/benchmarks/selection_probe_v2.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from examples.cris_clip.data import RISDataset
from examples.cris_clip.model import MODEL_CONFIGS, build_model
from examples.cris_clip.roles import ROLE_NAMES, token_roles
from examples.cris_clip.synthetic import SyntheticReferDataset
from examples.cris_clip.world_v2 import WorldV2Dataset
from masksd import LMVSDConfig, MaskedSelfDistill, VMLSDConfig
from masksd.diagnostics import SelectionStats

# name -> (scorer, metric, dense patch features or None, surgery): LMVSD and VMLSD both use the
# scorer, metric and surgery; dense features change the patches only (words are scored against the
# image's global feature, which they leave alone)
SETTINGS: dict[str, tuple[str, str, str | None, bool]] = {
    "correlation/dot": ("correlation", "dot", None, False),
    "correlation/cosine": ("correlation", "cosine", None, False),
    "late_interaction/dot": ("late_interaction", "dot", None, False),
    "late_interaction/cosine": ("late_interaction", "cosine", None, False),
    "random/dot": ("random", "dot", None, False),
    "value/dot": ("correlation", "dot", "value", False),
    "value/cosine": ("correlation", "cosine", "value", False),
    "clearclip/dot": ("correlation", "dot", "clearclip", False),
    "clearclip/cosine": ("correlation", "cosine", "clearclip", False),
    "surgery/dot": ("correlation", "dot", None, True),
    "surgery/cosine": ("correlation", "cosine", None, True),
    "value+surgery/dot": ("correlation", "dot", "value", True),
    "clearclip+surgery/dot": ("correlation", "dot", "clearclip", True),
}
WORLDS = {"demo": SyntheticReferDataset, "v2": WorldV2Dataset}  # model preset -> its synthetic world


def probe(
    pretrained: str | None, *, samples: int, batch_size: int, seed: int, preset: str = "demo"
) -> dict[str, Any]:
    config = replace(MODEL_CONFIGS[preset], pretrained=pretrained)
    torch.manual_seed(seed)
    model = build_model(config)
    context = config.clip_cfg["text_cfg"]["context_length"]
    dataset = RISDataset(WORLDS[preset]("train", num_samples=samples, seed=0), image_size=config.image_size,
                         context_length=context, train=True, roles=token_roles)
    batches = [[dataset[i] for i in range(start, min(start + batch_size, samples))]
               for start in range(0, samples, batch_size)]
    results: dict[str, Any] = {}
    for name, (scorer, metric, dense, surgery) in SETTINGS.items():
        model.image_tower.dense = dense  # what towers_from_open_clip(..., dense=dense) sets; same weights
        wrapper = MaskedSelfDistill(model.image_tower, model.text_tower, model.decoder,
                                    lmvsd=LMVSDConfig(scorer=scorer, metric=metric, surgery=surgery),
                                    vmlsd=VMLSDConfig(scorer=scorer, metric=metric, surgery=surgery)).train()
        stats = SelectionStats(role_names=ROLE_NAMES)
        for index, batch in enumerate(batches):
            images, texts, masks, roles = (torch.stack(column) for column in zip(*batch, strict=True))
            generator = torch.Generator().manual_seed(seed * 1000 + index)
            with torch.no_grad():
                out = wrapper(images, texts, target=masks, generator=generator)
            lmvsd = out.selections["lmvsd"]
            stats.add_image(lmvsd["kept"], masks, lmvsd["grid"])
            stats.add_words(out.selections["vmlsd"]["kept"], roles)
        results[name] = {k: round(v, 4) for k, v in stats.summary().items()}
    return results


def markdown(results: dict[str, Any], label: str) -> str:
    lines = [f"**{label}**: what the branches keep (top-K 0.5), no RIS training", "",
             "| scorer / metric | LMVSD kept on target | random (target area) | LMVSD recall | "
             "VMLSD kept rate by word role |", "|---|---:|---:|---:|---|"]
    for name, r in results.items():
        words = ", ".join(f"{role} {r[f'kept_rate/{role}']:.2f}" for role in ROLE_NAMES)
        lines.append(f"| {name} | {r['precision']:.3f} | {r['random']:.3f} | {r['recall']:.2f} | {words} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default=None, help="CLIP checkpoint (none: random init)")
    parser.add_argument("--preset", choices=sorted(WORLDS), default="demo",
                        help="demo: the demo CLIP on world v1 (64 px); v2: the same CLIP at 96 px on world "
                             "v2")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"preset": args.preset, "samples": args.samples, "settings": {}}
    text = []
    for label, path in (("random init", None), ("pretrained", args.pretrained)):
        if label == "pretrained" and path is None:
            continue
        report["settings"][label] = probe(path, samples=args.samples, batch_size=args.batch_size,
                                          seed=args.seed, preset=args.preset)
        if path is not None:
            report["pretrained_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        text.append(markdown(report["settings"][label], f"{label} CLIP"))
    md = "\n".join(text)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(md)
    return report


if __name__ == "__main__":
    main()
