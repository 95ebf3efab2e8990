"""Non-reentrant activation checkpointing inside a model driven by the hook backend.

``torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)`` recomputes ``fn`` in backward
with masksd's hooks inert. That is harmless where the checkpointed function holds no module
whose output masksd *changes*: checkpointing inside a hooked module (a Swin stage's blocks, BERT's
layers), or a checkpointed call of a reused module (its main-branch output is replayed in the
branch that skips it). Main branch, masked branches, the loss and every gradient then equal the
run without checkpointing bit for bit. A checkpointed function that contains the *embedding*
module cannot work (the recomputation would not mask the tokens): masksd refuses it with a
message instead of torch's "A different number of tensors was saved" (non-reentrant) or silently
unmasked gradients (reentrant), on every torch release it supports (2.1.2 tested by .ci/run).
"""

from __future__ import annotations

import pytest
import torch
from hook_models import PAD, TinyRIS, make_batch, tiny_spec
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import masksd


def _call(fn, *args: Tensor, ckpt: bool | str) -> Tensor:
    """``fn(*args)``, checkpointed (non-reentrant) when ``ckpt``, reentrant when ``ckpt == "reentrant"``."""
    if not ckpt:
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=ckpt == "reentrant")


class CheckpointedLayers(nn.Sequential):
    """A backbone that checkpoints its own layers (as Swin's ``use_checkpoint``): the hooks sit on
    the backbone, the recomputed function is inside it."""

    ckpt = True

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = _call(layer, x, ckpt=self.ckpt)
        return x


class CheckpointingRIS(TinyRIS):
    """``TinyRIS`` with checkpointing at one of three places (``where``):

    * ``"inside"``: inside the hooked, reused ``backbone`` (each layer);
    * ``"text"``: a checkpointed call of the reused ``text_encoder`` (hooked) from ``forward``;
    * ``"embed"``: a checkpointed function holding the image embedding ``patch_embed``.
    """

    def __init__(self, where: str, ckpt: bool | str) -> None:
        super().__init__()
        self.where, self.ckpt = where, ckpt
        if where == "inside":
            self.backbone.__class__ = CheckpointedLayers
            self.backbone.ckpt = ckpt

    def forward(self, img: Tensor, ids: Tensor) -> Tensor:
        ckpt = self.ckpt
        if self.where == "embed":
            v = _call(lambda x: self.backbone(self.patch_embed(x)), img, ckpt=ckpt)
        else:
            v = self.backbone(self.patch_embed(img))
        encode = lambda e: self.text_encoder(e, src_key_padding_mask=ids == PAD)  # noqa: E731
        w = _call(encode, self.word_embed(ids), ckpt=ckpt and self.where == "text")
        keep = (ids != PAD).float()[..., None]
        s = (w * keep).sum(1) / keep.sum(1)
        return self.decoder(v * s[:, :, None, None])


def _step(where: str, ckpt: bool) -> tuple[masksd.DistillOutput, dict[str, Tensor]]:
    torch.manual_seed(0)
    branches = dict(lmvsd=masksd.LMVSDConfig(ratio=0.5), vmlsd=masksd.VMLSDConfig(top_k=1.0, ratio=0.5))
    wrapper = masksd.wrap(CheckpointingRIS(where, ckpt), tiny_spec(), **branches).train()
    images, ids, target = make_batch()
    out = wrapper(images, ids, target=target, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = {name: p.grad for name, p in wrapper.named_parameters()}
    assert all(g is not None for g in grads.values())
    return out, grads


@pytest.mark.parametrize("where", ["inside", "text"])
def test_checkpointing_inside_hooked_modules_changes_nothing(where):
    plain, plain_grads = _step(where, ckpt=False)
    out, grads = _step(where, ckpt=True)
    assert torch.equal(out.logits, plain.logits)  # main branch
    for name in ("lmvsd", "vmlsd"):  # masked branches: same masks, same logits
        assert out.selections[name]["masked"].any()
        assert torch.equal(out.selections[name]["masked"], plain.selections[name]["masked"])
        assert torch.equal(out.selections[name]["logits"], plain.selections[name]["logits"])
    assert torch.equal(out.loss, plain.loss)
    for name, grad in plain_grads.items():  # mask tokens included
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("ckpt", [True, "reentrant"])
def test_checkpointed_function_holding_the_embedding_is_refused_with_masksds_message(ckpt):
    """Non-reentrant: torch's own error would be "A different number of tensors was saved";
    reentrant: the masked branch's gradients would silently be the unmasked ones."""
    torch.manual_seed(0)
    wrapper = masksd.wrap(CheckpointingRIS("embed", ckpt=ckpt), tiny_spec()).train()
    images, ids, target = make_batch()
    with pytest.raises(ValueError,
                       match=r"HookSpec.image.embed 'patch_embed' runs inside a torch.utils.checkpoint"):
        wrapper(images, ids, target=target)
    wrapper.eval()  # inference and the bare model are unaffected
    with torch.no_grad():
        assert wrapper(images, ids).shape == (4, 1, 4, 4)
