"""The README's quick-start block runs as written."""

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
