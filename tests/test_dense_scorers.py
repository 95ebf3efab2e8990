"""Dense-alignment scoring features (MaskCLIP value path, ClearCLIP) and feature surgery.

Tiny random open_clip ViTs: every dense feature is checked against a hand computation from the
last block's weights, on the block input captured from ``clip.encode_image`` (an independent
forward); the main output never changes.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

open_clip = pytest.importorskip("open_clip")

from dense_checks import assert_dense_encoded  # noqa: E402

import masksd  # noqa: E402
from masksd import (  # noqa: E402
    DistillConfig,
    HookSpec,
    LMVSDConfig,
    Maskable,
    MaskedSelfDistill,
    ModalitySpec,
    Tap,
    VMLSDConfig,
)
from masksd.adapters.clip_dense import clip_dense_tap, dense_step  # noqa: E402
from masksd.adapters.open_clip import towers_from_open_clip  # noqa: E402
from masksd.masking import select_top_k  # noqa: E402
from masksd.scorers import surgery_scores  # noqa: E402
from masksd.towers import RISModel, scoring_tokens  # noqa: E402

SOT, EOT = 49406, 49407


def tiny_clip(layers: int = 2, width: int = 32, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(
            embed_dim=24,
            vision_cfg=dict(image_size=32, patch_size=8, width=width, layers=layers, head_width=16),
            text_cfg=dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1),
        )


def batch(size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, 32, 32, generator=g)
    ids = torch.zeros(size, 12, dtype=torch.long)
    for b in range(size):
        n = 3 + b % 5
        ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = SOT, torch.randint(300, 40000, (n,), generator=g), EOT
    target = (torch.rand(size, 1, 16, 16, generator=g) > 0.5).float()
    return x, ids, target


class Decoder(nn.Module):
    """Uses the projected image tokens (so their values matter to the output) and the sentence."""

    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.tokens_in, self.sentence_in, self.out = nn.Linear(dim, 8), nn.Linear(dim, 8), nn.Conv2d(8, 1, 1)

    def forward(self, image, text):
        gh, gw = image.features["grid"]
        f = rearrange(self.tokens_in(image.tokens), "b (h w) c -> b c h w", h=gh, w=gw)
        f = f * torch.sigmoid(self.sentence_in(text.global_feature))[:, :, None, None]
        return F.interpolate(self.out(f), scale_factor=4)


def block_input(clip: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last visual block's input ``[B, 1 + N, W]`` during ``clip.encode_image(x)``."""
    seen = []
    handle = clip.visual.transformer.resblocks[-1].register_forward_pre_hook(
        lambda m, args: seen.append(args[0]))
    try:
        clip.encode_image(x)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def reference(clip: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The dense features written out from the block's weights: ``[B, N, D]``."""
    block, visual = clip.visual.transformer.resblocks[-1], clip.visual
    inp = block_input(clip, x)
    width, heads = inp.shape[-1], block.attn.num_heads
    h = F.layer_norm(inp, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q, v = h @ w[:width].T + b[:width], h @ w[2 * width:].T + b[2 * width:]
    if mode == "value":
        mixed = v[:, 1:]
    else:
        outs = []
        for head in range(heads):
            part = slice(head * width // heads, (head + 1) * width // heads)
            qh, vh = q[..., part], v[..., part]
            weights = torch.softmax(qh[:, 1:] @ qh.transpose(1, 2) / (width // heads) ** 0.5, dim=-1)
            outs.append(weights @ vh)
        mixed = torch.cat(outs, dim=-1)
    out = mixed @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    out = F.layer_norm(out, (width,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)
    return out @ visual.proj


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("mode", ["value", "clearclip"])
def test_dense_scoring_features_match_a_hand_computation(mode, layers):
    clip = tiny_clip(layers=layers, width=64 if layers == 1 else 32).eval()
    image_tower, _ = towers_from_open_clip(clip, image_layers=(0,), dense=mode)
    plain_tower, _ = towers_from_open_clip(clip, image_layers=(0,))
    x = batch()[0]
    with torch.no_grad():
        encoded = image_tower.encode(image_tower.embed(x))
        plain = plain_tower.encode(plain_tower.embed(x))
        expected = reference(clip, x, mode)
        assert torch.equal(encoded.global_feature, clip.encode_image(x))
    assert expected.shape == (4, 16, 24)
    assert_dense_encoded(encoded, plain, expected)


@pytest.mark.parametrize("mode", ["value", "clearclip"])
def test_main_output_is_unchanged_and_the_branch_keeps_the_dense_top_k(mode):
    x, ids, target = batch()
    outputs = {}
    for dense in (None, mode):
        clip = tiny_clip()
        image_tower, text_tower = towers_from_open_clip(clip, dense=dense)
        torch.manual_seed(1)
        decoder = Decoder()
        bare = RISModel(image_tower, text_tower, decoder).eval()
        wrapper = MaskedSelfDistill(image_tower, text_tower, decoder,
                                    lmvsd=LMVSDConfig(top_k=0.5), vmlsd=VMLSDConfig(top_k=0.5))
        with torch.no_grad():
            eval_logits = wrapper.eval()(x, ids)
            assert torch.equal(eval_logits, bare(x, ids))
            out = wrapper.train()(x, ids, target=target, generator=torch.Generator().manual_seed(0))
            image, text = bare.encode(x, ids)
        outputs[dense] = (eval_logits, out, image, text)
    (eval_plain, out_plain, image, text), (eval_dense, out_dense, image_d, _) = outputs[None], outputs[mode]
    assert torch.equal(eval_plain, eval_dense)
    assert (torch.equal(out_plain.logits, out_dense.logits)
            and torch.equal(out_plain.losses["seg"], out_dense.losses["seg"]))
    # LMVSD keeps the top half of the patches under the dense features · the sentence feature
    dense_scores = torch.einsum("bd,bnd->bn", text.global_feature, scoring_tokens(image_d))
    maskable = torch.ones_like(dense_scores, dtype=torch.bool)
    assert torch.equal(out_dense.selections["lmvsd"]["kept"], select_top_k(dense_scores, maskable, top_k=0.5))
    plain_scores = torch.einsum("bd,bnd->bn", text.global_feature, image.tokens)
    assert torch.equal(out_plain.selections["lmvsd"]["kept"], select_top_k(plain_scores, maskable, top_k=0.5))
    assert not torch.equal(out_plain.selections["lmvsd"]["kept"], out_dense.selections["lmvsd"]["kept"])
    # words are scored against the image's global feature, which dense features leave alone
    assert torch.equal(out_plain.selections["vmlsd"]["kept"], out_dense.selections["vmlsd"]["kept"])


def test_late_interaction_reads_the_dense_patch_features():
    x, ids, target = batch()
    image_tower, text_tower = towers_from_open_clip(tiny_clip(), dense="clearclip")
    config = dict(top_k=0.5, scorer="late_interaction")
    wrapper = MaskedSelfDistill(image_tower, text_tower, Decoder(), lmvsd=LMVSDConfig(**config),
                                vmlsd=VMLSDConfig(**config)).train()
    with torch.no_grad():
        out = wrapper(x, ids, target=target, generator=torch.Generator().manual_seed(0))
        image, text = wrapper.unwrap().encode(x, ids)
    real = (ids != 0) & (ids != SOT) & (ids != EOT)
    similarity = torch.einsum("bnd,bld->bnl", scoring_tokens(image), text.tokens)
    patches = similarity.masked_fill(~real[:, None], float("-inf")).amax(dim=2)
    assert torch.equal(out.selections["lmvsd"]["kept"],
                       select_top_k(patches, torch.ones_like(real[:, :1]).expand(-1, 16), top_k=0.5))
    assert torch.equal(out.selections["vmlsd"]["kept"], select_top_k(similarity.amax(dim=1), real, top_k=0.5))


def hooked(mode: str) -> tuple[RISModel, HookSpec]:
    image_tower, text_tower = towers_from_open_clip(tiny_clip())
    torch.manual_seed(1)
    model = RISModel(image_tower, text_tower, Decoder())
    spec = HookSpec(
        image=ModalitySpec(embed="image_tower.visual.conv1", layout="bchw",
                           tokens=clip_dense_tap(model, "image_tower.visual", mode=mode),
                           global_=Tap("decoder", kind="input", select="[0].global_feature"),
                           reuse=("image_tower.visual.transformer.resblocks.*",
                                  "image_tower.visual.ln_post")),
        text=ModalitySpec(embed="text_tower.token_embedding",
                          maskable=Maskable(ids="texts", never=(0, SOT, EOT)),
                          tokens=Tap("decoder", kind="input", select="[1].tokens"),
                          global_=Tap("decoder", kind="input", select="[1].global_feature"),
                          reuse=("text_tower.transformer",)),
    )
    return model, spec


@pytest.mark.parametrize("mode", ["value", "clearclip"])
def test_a_dense_tap_on_a_hooked_model_selects_as_the_dense_tower(mode):
    x, ids, target = batch()
    model, spec = hooked(mode)
    tap = spec.image.tokens
    assert tap == Tap("image_tower.visual.transformer.resblocks.1", kind="input", select="[0]",
                      project=(dense_step(mode, "image_tower.visual.transformer.resblocks.1"),
                               "image_tower.visual.ln_post", "image_tower.visual.proj"))
    assert HookSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    wrapped = masksd.wrap(model, spec, lmvsd=LMVSDConfig(top_k=0.5), vmlsd=VMLSDConfig(top_k=0.5))
    image_tower, text_tower = towers_from_open_clip(tiny_clip(), dense=mode)
    torch.manual_seed(1)
    towers = MaskedSelfDistill(image_tower, text_tower, Decoder(), lmvsd=LMVSDConfig(top_k=0.5),
                               vmlsd=VMLSDConfig(top_k=0.5))
    with torch.no_grad():
        assert torch.equal(wrapped.eval()(x, ids), model.eval()(x, ids))
        hooks_out = wrapped.train()(x, ids, target=target, generator=torch.Generator().manual_seed(0))
        towers_out = towers.train()(x, ids, target=target, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hooks_out.logits, towers_out.logits)
    for branch in ("lmvsd", "vmlsd"):
        assert torch.equal(hooks_out.selections[branch]["kept"], towers_out.selections[branch]["kept"])


def test_objectives_that_train_on_a_dense_taps_tokens_are_refused():
    from masksd.objectives import CrossModalAlignment

    x, ids, target = batch()
    model, spec = hooked("value")
    wrapped = masksd.wrap(model, spec, extra_objectives=[CrossModalAlignment()])
    with pytest.raises(ValueError, match="dense scoring tap.*without gradient"):
        wrapped.train()(x, ids, target=target)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_surgery_subtracts_each_tokens_mean_score_over_the_batch(metric):
    x, ids, target = batch(5)
    image_tower, text_tower = towers_from_open_clip(tiny_clip(), dense="value")
    config = dict(top_k=0.5, surgery=True, metric=metric)
    wrapper = MaskedSelfDistill(image_tower, text_tower, Decoder(), lmvsd=LMVSDConfig(**config),
                                vmlsd=VMLSDConfig(**config)).train()
    with torch.no_grad():
        out = wrapper(x, ids, target=target, generator=torch.Generator().manual_seed(0))
        image, text = wrapper.unwrap().encode(x, ids)
    for kept, tokens, guide, maskable in (
        (out.selections["lmvsd"]["kept"], scoring_tokens(image), text.global_feature,
         torch.ones(5, 16, dtype=torch.bool)),
        (out.selections["vmlsd"]["kept"], text.tokens, image.global_feature,
         (ids != 0) & (ids != SOT) & (ids != EOT)),
    ):
        if metric == "cosine":
            tokens, guide = F.normalize(tokens, dim=-1), F.normalize(guide, dim=-1)
        every = torch.einsum("bnd,cd->bnc", tokens, guide)  # token of sample b against sentence / image c
        expected = every.diagonal(dim1=0, dim2=2).T - every.mean(dim=2)
        torch.testing.assert_close(surgery_scores(guide, tokens), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(kept, select_top_k(expected, maskable, top_k=0.5))
        plain = every.diagonal(dim1=0, dim2=2).T
        assert not torch.equal(kept, select_top_k(plain, maskable, top_k=0.5))
    # one sample: nothing to subtract, the plain correlation
    tokens, guide = torch.randn(1, 6, 4), torch.randn(1, 4)
    assert torch.equal(surgery_scores(guide, tokens), torch.einsum("bd,bnd->bn", guide, tokens))


def test_config_round_trip_and_errors():
    config = DistillConfig(lmvsd=LMVSDConfig(surgery=True, metric="cosine"), vmlsd=VMLSDConfig(surgery=True))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["lmvsd"]["surgery"] is True and DistillConfig.from_dict(data) == config
    old = DistillConfig().to_dict()
    old["lmvsd"].pop("surgery")  # a checkpoint written before the option: surgery off
    assert DistillConfig.from_dict(old).lmvsd.surgery is False
    with pytest.raises(ValueError, match="surgery=True works with scorer='correlation' only"):
        LMVSDConfig(scorer="late_interaction", surgery=True)
    with pytest.raises(TypeError, match="surgery must be a bool"):
        LMVSDConfig(surgery="yes")
    with pytest.raises(ValueError, match="dense must be one of"):
        towers_from_open_clip(tiny_clip(), dense="maskclip")


def test_resnet_clips_refuse_dense_features_clearly():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = open_clip.CLIP(embed_dim=32,
                              vision_cfg=dict(image_size=64, layers=(1, 1, 1, 1), width=8, head_width=64),
                              text_cfg=dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1))
    with pytest.raises(ValueError, match="needs a ViT CLIP; this is a ResNet CLIP"):
        towers_from_open_clip(clip, dense="value")
    with pytest.raises(ValueError, match="is not a CLIP ViT"):
        clip_dense_tap(clip, "visual", mode="clearclip")
    with pytest.raises(ValueError, match="no module 'vision'"):
        clip_dense_tap(clip, "vision")


def test_accuracy_variants_reach_the_example_trainer():
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.accuracy import VARIANTS

    probe = """
import json, sys
import config
from model import build_model
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    cfg = config.parse_args(argv)
    out[name] = [build_model(cfg.model).image_tower.dense, cfg.distill.lmvsd.surgery,
                 cfg.distill.vmlsd.surgery]
print(json.dumps(out))
"""
    names = ("masksd", "value_scorer", "clearclip_scorer", "surgery_scorer")
    example = Path(__file__).resolve().parents[1] / "examples" / "cris_clip"
    result = subprocess.run([sys.executable, "-c", probe, json.dumps({n: VARIANTS[n] for n in names})],
                            cwd=example, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == {"masksd": [None, False, False],
                                         "value_scorer": ["value", False, False],
                                         "clearclip_scorer": ["clearclip", False, False],
                                         "surgery_scorer": [None, True, True]}
