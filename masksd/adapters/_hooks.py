"""Run a library's own forward with one submodule's output replaced (forward-hook adapters).

The Hugging Face and timm adapters mask tokens right after the model's embedding module (the
patch conv, the word-embedding table) and then run the rest of the model through the library's
public forward (``vision_model(...)``, ``forward_intermediates(...)``), so position embeddings,
class/register tokens, interpolation and pooling stay exactly the library's. The embedding
module still runs inside that forward (a cheap conv or table lookup); its result is discarded
and the (masked) embedded tokens are returned in its place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn


@contextmanager
def substitute_output(module: nn.Module, replacement: Tensor, *, name: str) -> Iterator[None]:
    """While active, ``module(...)`` returns ``replacement`` instead of its own output.

    Args:
        module: the embedding module whose output is replaced (e.g. a patch ``Conv2d``).
        replacement: a tensor of exactly the shape ``module`` produces for the same input.
        name: how the module is called in error messages (e.g. ``"vision_model.embeddings.
            patch_embedding"``).

    Raises:
        ValueError: the module produced an output of another shape (the raw input in
            ``Embedded.extras`` no longer matches the embedded tokens).
        RuntimeError: the module was not called exactly once by the wrapped forward (an
            unsupported model variant; substituting would be silently wrong).
    """
    calls = 0

    def hook(_module: nn.Module, _args: object, output: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if not isinstance(output, Tensor) or tuple(output.shape) != tuple(replacement.shape):
            found = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"{name} produced {found} but the embedded tokens give {tuple(replacement.shape)}; "
                "encode() must get the Embedded returned by this tower's embed() (only its tokens "
                "may be replaced)"
            )
        return replacement.to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if calls != 1:
        raise RuntimeError(
            f"{name} was called {calls} times during encode (expected once); this model variant "
            "is not supported by the adapter"
        )
