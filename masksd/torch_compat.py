"""What differs between the torch releases masksd supports (``torch>=2.1``, pyproject's floor)."""

from __future__ import annotations

from collections.abc import Callable

import torch

_is_compiling: Callable[[], bool] | None = getattr(torch.compiler, "is_compiling", None)
if _is_compiling is None:  # torch 2.1 / 2.2
    import torch._dynamo

    _is_compiling = torch._dynamo.is_compiling


def is_compiling() -> bool:
    """Whether dynamo is tracing the calling code.

    ``torch.compiler.is_compiling`` exists from torch 2.3; 2.1 and 2.2 have
    ``torch._dynamo.is_compiling``, which dynamo also answers with ``True`` while tracing.
    """
    return bool(_is_compiling())


def aminmax(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.aminmax(values)``; float16 / bfloat16 on the CPU compared in float32 (exact), since
    torch 2.1 has no CPU kernel for them ("aminmax_cpu" not implemented for 'Half')."""
    if values.device.type == "cpu" and values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    return torch.aminmax(values)
