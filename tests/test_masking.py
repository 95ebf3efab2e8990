"""Properties of the pure tensor ops in ``masksd.masking`` (hypothesis + statistical checks)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masksd.masking import (
    correlation_scores,
    kept_counts,
    masked_counts,
    replace_tokens,
    sample_mask,
    select_top_k,
)

SETTINGS = settings(max_examples=60, deadline=None)

top_ks = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)
ratios = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def expected_kept(n: int, top_k: float) -> int:
    """The documented rule: ``max(1, floor(top_k * n + 1/2))``, 0 when there is no valid token."""
    return 0 if n == 0 else max(1, math.floor(top_k * n + 0.5))


@st.composite
def masks(draw, min_b: int = 1, max_b: int = 6, max_n: int = 40):
    """A ``[B, N]`` bool mask; some rows are empty, some full, the rest random."""
    b = draw(st.integers(min_b, max_b))
    n = draw(st.integers(1, max_n))
    rows = []
    for _ in range(b):
        kind = draw(st.sampled_from(["random", "random", "empty", "full"]))
        if kind == "empty":
            rows.append([False] * n)
        elif kind == "full":
            rows.append([True] * n)
        else:
            rows.append(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return torch.tensor(rows, dtype=torch.bool)


@st.composite
def scored_masks(draw):
    """``(scores [B, N] float, valid [B, N] bool)``; scores sometimes have many ties."""
    valid = draw(masks())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        scores = torch.randn(valid.shape, generator=g)
    else:  # few distinct values: lots of ties
        scores = torch.randint(0, 3, valid.shape, generator=g).float()
    return scores, valid


# ----------------------------------------------------------------------------- correlation


@SETTINGS
@given(
    b=st.integers(1, 6),
    n=st.integers(1, 40),
    d=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
)
def test_correlation_scores_dot_and_cosine(b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    glob = torch.randn(b, d, generator=g)
    tokens = torch.randn(b, n, d, generator=g)
    dot = correlation_scores(glob, tokens)
    assert dot.shape == (b, n) and dot.dtype == torch.float32
    manual = torch.einsum("bd,bnd->bn", glob, tokens)
    torch.testing.assert_close(dot, manual)
    manual_loop = torch.stack([tokens[i] @ glob[i] for i in range(b)])
    torch.testing.assert_close(dot, manual_loop)
    cos = correlation_scores(glob, tokens, metric="cosine")
    assert cos.shape == (b, n)
    assert bool((cos >= -1 - 1e-5).all() and (cos <= 1 + 1e-5).all())
    torch.testing.assert_close(
        cos, torch.nn.functional.cosine_similarity(glob[:, None], tokens, dim=-1), atol=1e-5, rtol=1e-5
    )


def test_correlation_scores_float32_under_bf16():
    g = torch.Generator().manual_seed(0)
    glob = torch.randn(3, 8, generator=g)
    tokens = torch.randn(3, 5, 8, generator=g)
    reference = correlation_scores(glob, tokens)
    scores = correlation_scores(glob.bfloat16(), tokens.bfloat16())
    assert scores.dtype == torch.float32
    torch.testing.assert_close(
        scores, torch.einsum("bd,bnd->bn", glob.bfloat16().float(), tokens.bfloat16().float())
    )
    # Under autocast the einsum must not drop back to bf16.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_scores = correlation_scores(glob, tokens)
        cosine = correlation_scores(glob, tokens, metric="cosine")
    assert autocast_scores.dtype == torch.float32 and cosine.dtype == torch.float32
    assert torch.equal(autocast_scores, reference)


# ------------------------------------------------------------------------------ top-K filter


@SETTINGS
@given(data=scored_masks(), top_k=top_ks)
def test_select_top_k_properties(data, top_k):
    scores, valid = data
    kept = select_top_k(scores, valid, top_k=top_k)
    assert kept.shape == valid.shape and kept.dtype == torch.bool
    assert not bool((kept & ~valid).any()), "kept must be a subset of valid"
    for row in range(valid.shape[0]):
        n = int(valid[row].sum())
        assert int(kept[row].sum()) == expected_kept(n, top_k)
        kept_scores = scores[row][kept[row]]
        dropped = scores[row][valid[row] & ~kept[row]]
        if kept_scores.numel() and dropped.numel():
            assert float(kept_scores.min()) >= float(dropped.max())
    counts = kept_counts(valid.sum(dim=1), top_k)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [expected_kept(int(n), top_k) for n in valid.sum(dim=1)]


@SETTINGS
@given(data=scored_masks())
def test_select_top_k_one_keeps_all_valid(data):
    scores, valid = data
    assert torch.equal(select_top_k(scores, valid, top_k=1.0), valid)
    assert torch.equal(select_top_k(scores, valid, top_k=1), valid)


def test_select_top_k_ties_prefer_lower_index_and_ignore_invalid_scores():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 9.0, 1.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, True]])
    kept = select_top_k(scores, valid, top_k=0.5)
    assert kept.tolist() == [[True, True, False, False], [True, False, False, True]]


def test_kept_counts_small_sentences():
    # RefCOCO-like: 1..5 words with top_k = 0.5 keeps 1, 1, 2, 2, 3.
    assert kept_counts(torch.tensor([0, 1, 2, 3, 4, 5]), 0.5).tolist() == [0, 1, 1, 2, 2, 3]


# ---------------------------------------------------------------------------- guided masking


@SETTINGS
@given(kept=masks(), ratio=ratios, seed=st.integers(0, 2**31 - 1))
def test_sample_mask_properties(kept, ratio, seed):
    masked = sample_mask(kept, ratio=ratio, generator=torch.Generator().manual_seed(seed))
    assert masked.shape == kept.shape and masked.dtype == torch.bool
    assert not bool((masked & ~kept).any()), "masked must be a subset of kept"
    for t, m in zip(kept.sum(dim=1).tolist(), masked.sum(dim=1).tolist()):
        expected = ratio * t
        assert math.floor(expected) <= m <= math.ceil(expected)
    again = sample_mask(kept, ratio=ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(masked, again), "same seed must give the same mask"


@SETTINGS
@given(kept=masks(), seed=st.integers(0, 2**31 - 1))
def test_sample_mask_extreme_ratios(kept, seed):
    g = torch.Generator().manual_seed(seed)
    assert not bool(sample_mask(kept, ratio=0.0, generator=g).any())
    assert torch.equal(sample_mask(kept, ratio=1.0, generator=g), kept)
    assert torch.equal(sample_mask(kept, ratio=1, generator=g), kept)


@SETTINGS
@given(
    valid=masks(),
    top_k=top_ks,
    ratio=ratios,
    seed=st.integers(0, 2**31 - 1),
)
def test_pipeline_masked_subset_kept_subset_valid(valid, top_k, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(valid.shape, generator=g)
    kept = select_top_k(scores, valid, top_k=top_k)
    masked = sample_mask(kept, ratio=ratio, generator=g)
    assert not bool((masked & ~kept).any())
    assert not bool((kept & ~valid).any())


def test_different_seeds_eventually_differ():
    kept = torch.ones(2, 10, dtype=torch.bool)
    first = sample_mask(kept, ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert any(
        not torch.equal(first, sample_mask(kept, ratio=0.5, generator=torch.Generator().manual_seed(s)))
        for s in range(1, 20)
    )


@pytest.mark.parametrize(
    ("t", "ratio"),
    [(2, 0.1), (3, 0.25), (1, 0.1), (5, 0.5), (7, 0.3), (4, 0.25)],
)
def test_masked_count_is_unbiased(t, ratio):
    """E[#masked] = ratio·T: a floored count would mask nothing for T=2, ratio=0.1."""
    draws = 4000
    g = torch.Generator().manual_seed(1234)
    expected = ratio * t
    p = expected - math.floor(expected)
    standard_error = math.sqrt(p * (1 - p) / draws)
    counts = masked_counts(torch.full((draws,), t, dtype=torch.int64), ratio, generator=g)
    kept = torch.zeros(draws, 9, dtype=torch.bool)
    kept[:, :t] = True
    from_masks = sample_mask(kept, ratio=ratio, generator=g).sum(dim=1)
    for sample in (counts, from_masks):
        assert set(sample.unique().tolist()) <= {math.floor(expected), math.ceil(expected)}
        mean = sample.double().mean().item()
        if p == 0:
            assert mean == expected
        else:
            assert abs(mean - expected) <= 4 * standard_error, (mean, expected, standard_error)
    if p > 0:
        assert 0 < from_masks.sum() < draws * math.ceil(expected)


@pytest.mark.parametrize("ratio", [0.4, 0.3])
def test_masked_positions_are_uniform_among_kept(ratio):
    draws = 4000
    kept_row = torch.tensor([False, True, False, True, True, False, True, True])
    kept = kept_row.expand(draws, -1).clone()
    masked = sample_mask(kept, ratio=ratio, generator=torch.Generator().manual_seed(7))
    per_position = masked.sum(dim=0).double()
    assert per_position[~kept_row].sum() == 0
    observed = per_position[kept_row]
    expected = observed.sum() / kept_row.sum()
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    # 4 degrees of freedom: P(chi² > 30) ≈ 5e-6.
    assert chi_square < 30.0, (observed.tolist(), chi_square)


# --------------------------------------------------------------------------- replace tokens


@SETTINGS
@given(masked=masks(max_n=20), c=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_replace_tokens_values_and_gradients(masked, c, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(*masked.shape, c, generator=g, requires_grad=True)
    mask_token = torch.randn(c, generator=g, requires_grad=True)
    out = replace_tokens(tokens, masked, mask_token)
    assert out.shape == tokens.shape and out.dtype == tokens.dtype
    assert torch.equal(out[masked], mask_token.detach().expand(int(masked.sum()), c))
    assert torch.equal(out[~masked], tokens.detach()[~masked])
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    assert tokens.grad is not None and mask_token.grad is not None
    assert torch.equal(tokens.grad[~masked], weights[~masked])
    assert bool((tokens.grad[masked] == 0).all())
    torch.testing.assert_close(mask_token.grad, weights[masked].sum(dim=0))


@SETTINGS
@given(valid=masks(max_n=20), seed=st.integers(0, 2**31 - 1))
def test_ratio_zero_replace_is_identity(valid, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(*valid.shape, 4, generator=g)
    masked = sample_mask(valid, ratio=0.0, generator=g)
    assert torch.equal(replace_tokens(tokens, masked, torch.zeros(4)), tokens)


def test_replace_tokens_keeps_dtype_and_mask_token_in_graph():
    tokens = torch.randn(2, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    mask_token = torch.randn(4, requires_grad=True)
    masked = torch.zeros(2, 3, dtype=torch.bool)
    out = replace_tokens(tokens, masked, mask_token)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert mask_token.grad is not None and bool((mask_token.grad == 0).all())


# ------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("top_k", "error"),
    [
        (0, ValueError),
        (0.0, ValueError),
        (1.5, ValueError),
        (-0.2, ValueError),
        (True, TypeError),
        ("0.5", TypeError),
    ],
)
def test_bad_top_k(top_k, error):
    valid = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(error, match="top_k"):
        select_top_k(torch.randn(2, 5), valid, top_k=top_k)
    with pytest.raises(error, match="top_k"):
        kept_counts(valid.sum(dim=1), top_k)


@pytest.mark.parametrize(
    ("ratio", "error"), [(-0.1, ValueError), (1.1, ValueError), (True, TypeError), (None, TypeError)]
)
def test_bad_ratio(ratio, error):
    kept = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(error, match="ratio"):
        sample_mask(kept, ratio=ratio)
    with pytest.raises(error, match="ratio"):
        masked_counts(kept.sum(dim=1), ratio)


def test_bad_masks_and_shapes():
    scores = torch.randn(2, 5)
    valid = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="valid"):
        select_top_k(scores, valid.int(), top_k=0.5)
    with pytest.raises(ValueError, match="valid"):
        select_top_k(scores[0], valid[0], top_k=0.5)
    with pytest.raises(ValueError, match="scores"):
        select_top_k(torch.randn(2, 6), valid, top_k=0.5)
    with pytest.raises(TypeError, match="scores"):
        select_top_k(torch.ones(2, 5, dtype=torch.long), valid, top_k=0.5)
    with pytest.raises(TypeError, match="kept"):
        sample_mask(valid.float(), ratio=0.5)
    with pytest.raises(TypeError, match="generator"):
        sample_mask(valid, ratio=0.5, generator=0)
    tokens = torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match="masked"):
        replace_tokens(tokens, valid.long(), torch.zeros(4))
    with pytest.raises(ValueError, match="masked"):
        replace_tokens(tokens, torch.ones(2, 6, dtype=torch.bool), torch.zeros(4))
    with pytest.raises(ValueError, match="mask_token"):
        replace_tokens(tokens, valid, torch.zeros(3))
    with pytest.raises(ValueError, match="mask_token"):
        replace_tokens(tokens, valid, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="tokens"):
        replace_tokens(tokens[0], valid, torch.zeros(4))
    with pytest.raises(ValueError, match="global_feature"):
        correlation_scores(torch.randn(2, 3), tokens)
    with pytest.raises(ValueError, match="global_feature"):
        correlation_scores(torch.randn(3, 4), tokens)
    with pytest.raises(ValueError, match="tokens"):
        correlation_scores(torch.randn(2, 4), tokens[0])
    with pytest.raises(ValueError, match="metric"):
        correlation_scores(torch.randn(2, 4), tokens, metric="l2")
