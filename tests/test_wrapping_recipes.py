"""The CRIS and LAVT recipes of docs/wrapping.md run as written on the RIS-style test models.

Each recipe block is executed with only the real models' numbers swapped for the tiny models'
(token ids, the stem width, the stage index), every swap asserted to apply, so a recipe whose
argument names, module paths or calls stop fitting the model fails here. The test models get the
real codebases' interface where ``tests/ris_models`` simplifies it: CRIS.pytorch calls CLIP's
attention pool as a module (spatial output plus the residual ``connect``), and LAVT's
``LAVTOne.forward`` is ``(x, text, l_mask)``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import masksd
from masksd import HookSpec, Maskable, ModalitySpec, Tap
from masksd.scorer_health import MasksdWarning

pytest.importorskip("open_clip")
pytest.importorskip("transformers")
from open_clip.modified_resnet import AttentionPool2d  # noqa: E402
from ris_models import cris_style, lavt_style  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
DOC = Path(__file__).resolve().parents[1] / "docs" / "wrapping.md"


def _recipe(heading: str, swaps: dict[str, str]) -> str:
    text = DOC.read_text()
    section = text[text.index(heading):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    for old, new in swaps.items():
        assert old in block, f"docs/wrapping.md's recipe under {heading!r} no longer holds {old!r}"
        block = block.replace(old, new)
    return block


def _run(block: str, **names: object) -> dict[str, object]:
    namespace = dict(masksd=masksd, HookSpec=HookSpec, ModalitySpec=ModalitySpec, Tap=Tap, Maskable=Maskable,
                     torch=torch, F=F, **names)
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


class SpatialAttentionPool(AttentionPool2d):
    """CRIS.pytorch's ``AttentionPool2d.forward``: spatial attention pool + ``connect`` residual."""

    def forward(self, x: Tensor) -> Tensor:
        view = SimpleNamespace(backbone=SimpleNamespace(visual=SimpleNamespace(attnpool=self)),
                               training=self.training)
        return cris_style.CRIS.spatial_attnpool(view, x)


class CRISPoolModule(cris_style.CRIS):
    """``cris_style.CRIS`` whose attention pool runs as a module, as in CRIS.pytorch."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone.visual.attnpool.__class__ = SpatialAttentionPool

    def encode_image(self, img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v = self.backbone.visual
        x = v.act1(v.bn1(v.conv1(img)))
        x = v.act2(v.bn2(v.conv2(x)))
        x = v.avgpool(v.act3(v.bn3(v.conv3(x))))
        v3 = v.layer2(v.layer1(x))
        v4 = v.layer3(v3)
        return v3, v4, v.attnpool(v.layer4(v4))


class LAVTOne(lavt_style.LAVTOne):
    """``lavt_style.LAVTOne`` with LAVT-RIS's forward signature."""

    def forward(self, x: Tensor, text: Tensor, l_mask: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, text, l_mask)


def test_cris_recipe():
    block = _recipe("### CLIP ResNet (CRIS",
                    {"width=64": "width=16", "never=(0, 49406, 49407)": "never=(0, 98, 99)"})
    torch.manual_seed(0)
    model = CRISPoolModule()
    batch = cris_style.make_batch()
    names = _run(block, model=model, img=batch.img, word=batch.word, mask=batch.mask)
    out, wrapped = names["out"], names["wrapped"]
    assert set(out.losses) == {"seg", "lmvsd", "vmlsd"}
    torch.testing.assert_close(out.losses["seg"], out.output[2].detach())  # CRIS's own BCE
    out.loss.backward()
    report = wrapped.check(batch.img, batch.word, batch.mask)
    assert report.fusion == "late" and report.no_grad == []  # logit_scale frozen: DDP without find_unused
    assert "backbone.visual.attnpool" in report.passes["vmlsd"]  # the whole pool is reused
    assert report.replayed["masked text"]["backbone.visual.attnpool"] == 1
    assert "backbone.visual.attnpool" not in report.calls["masked text"]
    with pytest.raises(ValueError, match=r"binary mask"):  # a 0/255 mask is refused before CRIS runs
        wrapped(batch.img, batch.word, batch.mask * 255)


def test_lavt_recipe():
    block = _recipe("### Swin + BERT", {"layers.3": "layers.2", "never=(101, 102)": "never=(2, 3)",
                                        "word_embeddings:103": "word_embeddings:4"})
    torch.manual_seed(0)
    batch = lavt_style.make_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MasksdWarning)  # f_query.0: no degenerate scores
        names = _run(block, model=LAVTOne(), image=batch.image, sentences=batch.input_ids,
                     attentions=batch.attention_mask, target=batch.target)
    out, wrapped = names["out"], names["wrapped"]
    assert torch.equal(out.losses["seg"], lavt_style.lavt_loss(out.output, batch.target).detach())
    out.loss.backward()
    report = wrapped.check(batch.image, batch.input_ids, l_mask=batch.attention_mask, target=batch.target)
    assert report.fusion == "text->image" and report.warnings == []
    assert report.passes["vmlsd"] == "full forward" and "text_encoder" in report.passes["lmvsd"]
