"""What every adapter's dense scoring must satisfy, shared by the open_clip and HF CLIP tests."""

from __future__ import annotations

import torch

from masksd.towers import Encoded, scoring_tokens


def assert_dense_encoded(encoded: Encoded, plain: Encoded, expected: torch.Tensor) -> None:
    """``encoded`` (dense scoring on) against ``plain`` (off) and a hand-computed ``expected``
    ``[B, N, D]``: lazy, computed once without gradient, equal to the reference, and the decoder's
    inputs those of the plain tower bit for bit."""
    assert callable(encoded.scoring)  # lazy: nothing computed before a scorer asks
    dense = scoring_tokens(encoded)
    assert dense.shape == expected.shape and not dense.requires_grad
    assert scoring_tokens(encoded) is dense  # computed once
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)
    assert (torch.equal(encoded.tokens, plain.tokens)
            and torch.equal(encoded.global_feature, plain.global_feature))
    assert all(torch.equal(a, b)
               for a, b in zip(encoded.features["levels"], plain.features["levels"], strict=True))
    assert plain.scoring is None and scoring_tokens(plain) is plain.tokens
    assert not torch.allclose(dense, plain.tokens, atol=1e-3)
