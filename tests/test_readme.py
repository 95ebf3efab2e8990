"""The README's python blocks run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs() -> None:
    pytest.importorskip("open_clip")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict[str, object] = {"__name__": "readme_quick_start"}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    out = namespace["out"]
    assert set(out.losses) == {"seg", "lmvsd", "vmlsd"}
    assert tuple(namespace["logits"].shape) == (4, 1, 16, 16)


def test_wrap_your_existing_model_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "masksd.wrap(" in b)
    spec_lines = block[block.index("spec = masksd.HookSpec("):].split("\n)\n")[0].count("\n") + 1
    assert spec_lines <= 15, f"the README's spec has {spec_lines} lines"
    namespace: dict[str, object] = {"__name__": "readme_wrap"}
    exec(compile(block, str(README), "exec"), namespace)
    assert set(namespace["out"].losses) == {"seg", "lmvsd", "vmlsd"}
    assert set(namespace["extra"]) == {"objectives.lmvsd.mask_token", "objectives.vmlsd.mask_token"}
