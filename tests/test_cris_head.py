"""Tests for the CRIS head of the reference example (examples/cris_clip/cris_head.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cris_head import CRISHead, dynamic_conv, pos2d

VIS, TXT, LEVELS = 24, 20, 3
SMALL = {"dim": 32, "nhead": 4, "dim_feedforward": 64, "proj_dim": 16, "num_layers": 2}


def make_head(**kw) -> CRISHead:
    torch.manual_seed(0)
    return CRISHead(vis_dim=VIS, text_dim=TXT, num_levels=LEVELS, **{**SMALL, **kw})


def make_inputs(b: int = 2, h: int = 8, w: int = 8, length: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(b, VIS, h, w, generator=g) for _ in range(LEVELS)]
    sentence = torch.randn(b, TXT, generator=g)
    words = torch.randn(b, length, TXT, generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):  # sample i has length - 2 - i real tokens (at least 1)
        mask[i, max(1, length - 2 - i):] = True
    return levels, sentence, words, mask


@pytest.mark.parametrize(("b", "h", "w"), [(2, 8, 8), (1, 5, 7), (3, 30, 30)])
def test_output_shape(b: int, h: int, w: int) -> None:
    head = make_head().eval()
    with torch.no_grad():
        out = head(*make_inputs(b, h, w))
    assert out.shape == (b, 1, 4 * h, 4 * w)
    assert torch.isfinite(out).all()


def test_batch_of_one_trains() -> None:
    head = make_head().train()
    head(*make_inputs(b=1)).sum().backward()


def test_eval_deterministic() -> None:
    head = make_head().eval()
    inputs = make_inputs()
    with torch.no_grad():
        assert torch.equal(head(*inputs), head(*inputs))


def test_padding_mask_respected() -> None:
    head = make_head().eval()
    levels, sentence, words, mask = make_inputs(b=3, length=9)
    assert mask.any()
    words2 = words.clone()
    words2[mask] = torch.randn(int(mask.sum()), TXT) * 100.0
    with torch.no_grad():
        a = head(levels, sentence, words, mask)
        b = head(levels, sentence, words2, mask)
        c = head(levels, sentence, words2, torch.zeros_like(mask))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, c)  # the mask is what makes the difference


def test_padding_mask_with_word_projection() -> None:
    head = CRISHead(vis_dim=VIS, text_dim=TXT, word_dim=12, **SMALL).eval()
    levels, sentence, _, mask = make_inputs()
    words = torch.randn(2, mask.shape[1], 12)
    words2 = words.clone()
    words2[mask] = 50.0
    with torch.no_grad():
        torch.testing.assert_close(head(levels, sentence, words, mask),
                                   head(levels, sentence, words2, mask), rtol=0, atol=1e-6)


def test_every_parameter_gets_gradient() -> None:
    for kw in ({}, {"dim": 20, "nhead": 4}):  # dim == text_dim: word projection is Identity
        head = make_head(**kw).train()
        head(*make_inputs()).sum().backward()
        missing = [n for n, p in head.named_parameters() if p.grad is None]
        assert not missing, missing


def test_bf16_autocast_finite() -> None:
    head = make_head().eval()
    inputs = make_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(*inputs)
    assert out.shape == (2, 1, 32, 32)
    assert torch.isfinite(out.float()).all()
    head.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(*inputs)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_dynamic_conv_matches_loop() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 9, 11, generator=g)
    weight = torch.randn(4, 6, 3, 3, generator=g)
    bias = torch.randn(4, generator=g)
    ref = torch.cat([F.conv2d(x[i:i + 1], weight[i:i + 1], bias[i:i + 1], padding=1)
                     for i in range(4)])
    out = dynamic_conv(x, weight, bias)
    assert out.shape == (4, 1, 9, 11)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pos2d_layout() -> None:
    pe = pos2d(8, 3, 5)
    assert pe.shape == (15, 8)
    grid = pe.reshape(3, 5, 8)
    # first half varies only with the column, second half only with the row
    assert torch.equal(grid[0, :, :4], grid[2, :, :4])
    assert torch.equal(grid[:, 0, 4:], grid[:, 4, 4:])


def _bad(levels, sentence, words, mask, which):
    if which == "n_levels":
        return levels[:2], sentence, words, mask
    if which == "levels_type":
        return torch.stack(levels), sentence, words, mask
    if which == "vis_dim":
        return [levels[0], levels[1], levels[2][:, :5]], sentence, words, mask
    if which == "grid":
        return [levels[0], levels[1], levels[2][:, :, :4]], sentence, words, mask
    if which == "sentence":
        return levels, sentence[:, :5], words, mask
    if which == "sentence_batch":
        return levels, sentence[:1], words, mask
    if which == "words":
        return levels, sentence, words[..., :5], mask
    if which == "words_ndim":
        return levels, sentence, words[:, 0], mask
    if which == "mask_shape":
        return levels, sentence, words, mask[:, :3]
    if which == "mask_dtype":
        return levels, sentence, words, mask.long()
    raise AssertionError(which)


@pytest.mark.parametrize(("which", "name"), [
    ("n_levels", "levels"), ("levels_type", "levels"), ("vis_dim", "levels[2]"),
    ("grid", "levels[2]"), ("sentence", "sentence"), ("sentence_batch", "sentence"),
    ("words", "words"), ("words_ndim", "words"), ("mask_shape", "word_pad_mask"),
    ("mask_dtype", "word_pad_mask"),
])
def test_bad_inputs_raise(which: str, name: str) -> None:
    head = make_head().eval()
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        head(*_bad(*make_inputs(), which))


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="dim"):
        CRISHead(vis_dim=VIS, text_dim=TXT, dim=30, nhead=4)
    with pytest.raises(ValueError, match="num_levels"):
        CRISHead(vis_dim=VIS, text_dim=TXT, num_levels=0)
