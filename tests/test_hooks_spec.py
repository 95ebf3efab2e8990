"""Spec features of the hook backend not covered by ``test_hooks.py``: the ``nbc`` layout, ``call=``
(a module that runs more than once per forward), ``Maskable.fn``, a callable scorer, what
``check()`` reports about the taps, and the refusal of a DDP-wrapped model.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hook_models import DIM, PAD, LossReturningRIS, TinyRIS, make_batch, tiny_spec
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import masksd
from masksd import HookSpec, LMVSDConfig, Maskable, ModalitySpec, Tap, VMLSDConfig
from masksd.masking import select_top_k


# ------------------------------------------------------------------------ models and helpers
class SeqFirstRIS(TinyRIS):
    """Sequence-first text, as older RIS code writes it: ``ids [L, B]``, word embeddings and
    encoder outputs ``[L, B, D]`` (``nbc``)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(DIM, 2, 2 * DIM, dropout=0.0)  # batch_first=False
        self.text_encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, img: Tensor, ids: Tensor) -> Tensor:  # ids [L, B]
        v = self.backbone(self.patch_embed(img))
        w = self.text_encoder(self.word_embed(ids), src_key_padding_mask=(ids == PAD).T)  # [L, B, D]
        keep = (ids != PAD).float()[..., None]
        s = (w * keep).sum(0) / keep.sum(0)
        return self.decoder(v * s[:, :, None, None])


def seq_first_maskable(arguments: dict) -> Tensor:
    """``Maskable.fn`` for ``SeqFirstRIS``: ``ids [L, B]`` -> ``[B, L]``, padding never maskable."""
    return arguments["ids"].T != PAD


def odd_positions(arguments: dict) -> Tensor:
    """``Maskable.fn``: only odd word positions may be masked (``[B, L]``)."""
    ids = arguments["ids"]
    return (torch.arange(ids.shape[1]) % 2 == 1).expand(ids.shape)


class PromptRIS(TinyRIS):
    """The word embedding and the text encoder run twice per forward: on a fixed prompt
    (call 0, ``[1, 3]``) and on the sentence (call 1, ``[B, L]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("prompt", torch.tensor([[3, 4, 5]]))

    def forward(self, img: Tensor, ids: Tensor) -> Tensor:
        prompt = self.text_encoder(self.word_embed(self.prompt)).mean(1)  # [1, D]
        v = self.backbone(self.patch_embed(img))
        w = self.text_encoder(self.word_embed(ids), src_key_padding_mask=ids == PAD)
        keep = (ids != PAD).float()[..., None]
        s = (w * keep).sum(1) / keep.sum(1) + prompt
        return self.decoder(v * s[:, :, None, None])


def prompt_spec(embed_call: int | None = 1, tap_call: int | None = 1) -> HookSpec:
    return tiny_spec(text=ModalitySpec(
        embed="word_embed", call=embed_call, maskable=Maskable(ids="ids", never=(PAD,)),
        tokens=Tap("text_encoder", call=tap_call), reuse=("text_encoder",)))


def later_positions_first(context, modality: str) -> Tensor:
    """A callable scorer: units further along the sequence (or the grid) score higher."""
    maskable = context.view(modality).units.maskable
    return torch.arange(maskable.shape[1], dtype=torch.float32).expand(maskable.shape)


def wrong_shape_scorer(context, modality: str) -> Tensor:
    return torch.zeros(1, 3)


def record_embeddings(wrapper, module: nn.Module, run: str) -> list[Tensor]:
    """Outputs of ``module`` in one kind of run (hook registered after masksd's: sees replacements)."""
    seen: list[Tensor] = []

    def hook(mod, args, output):
        current = wrapper.runner.recorder.run  # the run in progress
        if current is not None and current.label == run:
            seen.append(output.detach())

    module.register_forward_hook(hook)
    return seen


def step(wrapper, *args, seed: int = 0, **kwargs):
    wrapper.train()
    return wrapper(*args, generator=torch.Generator().manual_seed(seed), **kwargs)


# ----------------------------------------------------------------------------------- tests
def test_nbc_text_layout_with_a_maskable_fn_and_its_serialisation():
    spec = tiny_spec(text=ModalitySpec(
        embed="word_embed", layout="nbc", maskable=Maskable(fn=seq_first_maskable),
        tokens=Tap("text_encoder", layout="nbc"), reuse=("text_encoder",)))
    data = spec.to_dict()
    assert data["text"]["maskable"]["fn"] == {"__callable__": f"{__name__}:seq_first_maskable"}
    restored = HookSpec.from_dict(data)
    assert restored == spec and restored.text.maskable.fn is seq_first_maskable
    torch.manual_seed(0)
    wrapper = masksd.wrap(SeqFirstRIS(), restored, vmlsd=VMLSDConfig(top_k=1.0, ratio=0.5))
    seen = record_embeddings(wrapper, wrapper.unwrap().word_embed, "masked text")
    images, ids, masks = make_batch()
    out = step(wrapper, images, ids.T, target=masks)
    masked = out.selections["vmlsd"]["masked"]  # [B, L]
    assert masked.shape == ids.shape and masked.any()
    assert not (masked & (ids == PAD)).any()  # the fn's rule holds
    embedded = seen[-1]  # [L, B, D] as the model produced it, masked positions replaced
    token = wrapper.objectives["vmlsd"].mask_token.detach()
    assert torch.equal((embedded == token).all(-1), masked.T)
    out.loss.backward()
    assert wrapper.objectives["vmlsd"].mask_token.grad is not None
    wrapper.eval()
    with torch.no_grad():
        assert torch.equal(wrapper(images, ids.T), wrapper.unwrap()(images, ids.T))


def test_maskable_fn_is_combined_with_the_ids_rule():
    spec = tiny_spec(text=ModalitySpec(
        embed="word_embed", maskable=Maskable(ids="ids", never=(PAD,), fn=odd_positions),
        tokens=Tap("text_encoder"), reuse=("text_encoder",)))
    torch.manual_seed(0)
    wrapper = masksd.wrap(TinyRIS(), spec, vmlsd=VMLSDConfig(top_k=1.0, ratio=1.0))
    images, ids, masks = make_batch()
    kept = step(wrapper, images, ids, target=masks).selections["vmlsd"]["kept"]
    assert torch.equal(kept, (ids != PAD) & odd_positions({"ids": ids}))  # top_k 1: every maskable word


def test_call_picks_which_run_of_a_module_holds_the_tokens():
    images, ids, masks = make_batch()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"'word_embed' ran 2 times.*ModalitySpec\(call=\.\.\.\)"):
        step(masksd.wrap(PromptRIS(), prompt_spec(embed_call=None)), images, ids, target=masks)
    with pytest.raises(ValueError, match=r"'text_encoder' ran 2 times; set Tap\(call=\.\.\.\)"):
        step(masksd.wrap(PromptRIS(), prompt_spec(tap_call=None)), images, ids, target=masks)
    torch.manual_seed(0)
    wrapper = masksd.wrap(PromptRIS(), prompt_spec(), vmlsd=VMLSDConfig(top_k=1.0, ratio=0.5))
    seen = record_embeddings(wrapper, wrapper.unwrap().word_embed, "masked text")
    report = wrapper.check(images, ids, target=masks)
    assert report.calls["main"]["word_embed"] == 2 and report.replayed["masked image"]["text_encoder"] == 2
    assert report.taps["main"]["text_encoder [text.tokens]"] == 2
    seen.clear()
    out = step(wrapper, images, ids, target=masks)
    prompt, sentence = seen  # the prompt's call is left alone, the sentence's call is masked
    token = wrapper.objectives["vmlsd"].mask_token.detach()
    assert not (prompt == token).all(-1).any()
    masked = out.selections["vmlsd"]["masked"]
    assert masked.shape == ids.shape and masked.any()
    assert torch.equal((sentence == token).all(-1), masked)
    torch.manual_seed(0)
    from_end = masksd.wrap(PromptRIS(), prompt_spec(tap_call=-1), vmlsd=VMLSDConfig(top_k=1.0, ratio=0.5))
    again = step(from_end, images, ids, target=masks)
    assert torch.equal(again.selections["vmlsd"]["masked"], masked)
    torch.testing.assert_close(again.losses, out.losses)


def test_callable_scorer_decides_what_is_kept_and_serialises():
    torch.manual_seed(0)
    config = masksd.DistillConfig(lmvsd=LMVSDConfig(scorer=later_positions_first, top_k=0.5),
                                  vmlsd=VMLSDConfig(scorer=later_positions_first, top_k=0.5))
    assert masksd.DistillConfig.from_dict(config.to_dict()) == config
    wrapper = masksd.wrap(TinyRIS(), tiny_spec(), config=config)
    images, ids, masks = make_batch()
    out = step(wrapper, images, ids, target=masks)
    words = out.selections["vmlsd"]["kept"]
    order = torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape)
    assert torch.equal(words, select_top_k(order, ids != PAD, top_k=0.5))  # the last real words
    units = out.selections["lmvsd"]["kept"]  # 4x4 units of the backbone: the last 8
    assert units.shape == (4, 16) and units[:, 8:].all() and not units[:, :8].any()
    bad = masksd.wrap(TinyRIS(), tiny_spec(), lmvsd=LMVSDConfig(scorer=wrong_shape_scorer))
    with pytest.raises(ValueError, match=r"wrong_shape_scorer.*shape \(4, 16\), got \(1, 3\)"):
        step(bad, images, ids, target=masks)


def test_check_counts_the_tap_hooks_per_run():
    spec = tiny_spec(logits=Tap("decoder"), target="mask", loss="[2]",
                     fused=Tap("decoder", kind="input", select="[0]", layout="bchw"))
    torch.manual_seed(0)
    wrapper = masksd.wrap(LossReturningRIS(), spec)
    images, ids, masks = make_batch()
    report = wrapper.check(images, ids, masks)
    expected = {"decoder [logits]": 1, "decoder (input) [fused]": 1,
                "backbone [image.tokens]": 1, "text_encoder [text.tokens]": 1}
    assert report.taps["main"] == expected
    assert report.taps["masked image"] == expected and report.taps["masked text"] == expected
    assert report.taps["probe"]["decoder [logits]"] == 1
    text = str(report)
    assert "  main run:\n    modules ran: " in text
    assert ("    taps fired: backbone [image.tokens] ×1, decoder (input) [fused] ×1, decoder [logits] ×1"
            in text)
    assert text.index("probe run:") < text.index("main run:") < text.index("masked image run:")


def test_a_ddp_wrapped_model_is_refused(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(TinyRIS())
        with pytest.raises(TypeError, match=r"DistributedDataParallel: wrap the bare model first.*"
                                            r"DDP\(masksd\.wrap\(model, spec\)\)"):
            masksd.wrap(ddp, tiny_spec())
        with pytest.raises(TypeError, match="wrap the bare model first"):
            masksd.MaskedSelfDistill.from_model(ddp, tiny_spec())
    finally:
        dist.destroy_process_group()
