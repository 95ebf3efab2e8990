"""Sanity checks for the third-party-style RIS test models in ``tests/ris_models``.

They stand in for unchanged public RIS models (CRIS, LAVT, a timm-ViT model), so these tests only
pin what later wrapping tests rely on: a training step works, output shapes, which parameters get
gradients, and the fusion direction (LAVT's image features depend on the text; CRIS's do not).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These models are tiny; with 2 intra-op threads on a shared 2-core box a step is 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cris_style() -> ModuleType:
    pytest.importorskip("open_clip")
    return importlib.import_module("ris_models.cris_style")


@pytest.fixture(scope="module")
def lavt_style() -> ModuleType:
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    return importlib.import_module("ris_models.lavt_style")


@pytest.fixture(scope="module")
def timm_style() -> ModuleType:
    pytest.importorskip("timm")
    return importlib.import_module("ris_models.timm_style")


def params_without_grad(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}


def capture_output(
    module: nn.Module, store: dict[str, Tensor], key: str
) -> torch.utils.hooks.RemovableHandle:
    """Forward hook that keeps ``module``'s (tensor) output under ``store[key]``."""

    def hook(_mod: nn.Module, _args: tuple, out: Tensor) -> None:
        store[key] = out

    return module.register_forward_hook(hook)


def grad_from_words(image_feat: Tensor, word_emb: Tensor) -> Tensor | None:
    return torch.autograd.grad(image_feat.sum(), word_emb, retain_graph=True, allow_unused=True)[0]


def test_cris_train_step_and_eval(cris_style: ModuleType) -> None:
    torch.manual_seed(0)
    model, batch = cris_style.CRIS(), cris_style.make_batch(batch_size=4)
    assert type(model.backbone.visual).__name__ == "ModifiedResNet"
    model.train()
    pred, mask, loss = model(*batch)
    assert pred.shape == mask.shape == (4, 1, 16, 16)
    assert not pred.requires_grad and torch.isfinite(loss)
    loss.backward()
    # CLIP's contrastive temperature is never used by a segmentation forward (as in CRIS).
    assert params_without_grad(model) == {"backbone.logit_scale"}
    model.eval()
    with torch.no_grad():
        out = model(batch.img, batch.word)
    assert out.shape == (4, 1, 16, 16) and torch.isfinite(out).all()


def test_cris_image_features_do_not_depend_on_text(cris_style: ModuleType) -> None:
    torch.manual_seed(0)
    model, batch = cris_style.CRIS(), cris_style.make_batch(batch_size=2)
    store: dict[str, Tensor] = {}
    capture_output(model.backbone.token_embedding, store, "words")
    capture_output(model.backbone.visual.layer4, store, "c5")
    capture_output(model.backbone.visual.avgpool, store, "stem")
    model.train()
    _, _, loss = model(*batch)
    assert grad_from_words(store["c5"], store["words"]) is None
    # ...while the prediction depends on both embeddings (fusion happens after the encoders).
    assert grad_from_words(loss, store["words"]).abs().sum() > 0
    assert grad_from_words(loss, store["stem"]).abs().sum() > 0


def test_lavt_train_step_and_eval(lavt_style: ModuleType) -> None:
    torch.manual_seed(0)
    model, batch = lavt_style.LAVTOne(), lavt_style.make_batch(batch_size=4)
    assert len(set(batch.attention_mask.sum(dim=1).tolist())) > 1  # varied sentence lengths
    model.train()
    logits = model(batch.image, batch.input_ids, batch.attention_mask)
    assert logits.shape == (4, 2, 64, 64)
    loss = lavt_style.lavt_loss(logits, batch.target)
    assert torch.isfinite(loss)
    loss.backward()
    assert params_without_grad(model) == set()
    model.eval()
    with torch.no_grad():
        out = model(batch.image, batch.input_ids, batch.attention_mask)
    assert out.shape == (4, 2, 64, 64) and torch.isfinite(out).all()


# torch 2.1's oneDNN GELU backward on the CPU returns garbage (random, sometimes nan) when the
# incoming gradient is not contiguous (pytorch/pytorch#107876, fixed in 2.2): LAVT's PWAM
# (Conv1d -> GELU -> permute) hits it, so there the gradient is taken with oneDNN off.
GELU_BACKWARD_NEEDS_ONEDNN_OFF = torch.__version__ < (2, 2)  # torch's TorchVersion compares to tuples


def test_lavt_image_features_depend_on_text(lavt_style: ModuleType) -> None:
    with torch.backends.mkldnn.flags(enabled=not GELU_BACKWARD_NEEDS_ONEDNN_OFF):
        _check_lavt_image_features_depend_on_text(lavt_style)


def _check_lavt_image_features_depend_on_text(lavt_style: ModuleType) -> None:
    torch.manual_seed(0)
    model, batch = lavt_style.LAVTOne(), lavt_style.make_batch(batch_size=2)
    store: dict[str, Tensor] = {}
    capture_output(model.text_encoder.embeddings.word_embeddings, store, "words")
    capture_output(model.backbone.patch_embed, store, "patches")
    capture_output(model.backbone.norm2, store, "last_stage")
    model.train()
    model(batch.image, batch.input_ids, batch.attention_mask)
    assert store["patches"].shape == (2, 16, 16, 16)  # bchw
    grad = grad_from_words(store["last_stage"], store["words"])
    assert grad is not None and grad.abs().sum() > 0
    # Pad positions are masked out of the pixel-word attention (and BERT's attention).
    pads = batch.attention_mask == 0
    assert pads.any() and grad[pads].abs().max() == 0


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_timm_train_step_and_eval(timm_style: ModuleType) -> None:
    torch.manual_seed(0)
    model, batch = timm_style.TimmRIS(), timm_style.make_batch(batch_size=4)
    store: dict[str, Tensor] = {}
    capture_output(model.image_encoder.patch_embed, store, "patches")
    capture_output(model.text_encoder.token_embedding, store, "words")
    capture_output(model.image_encoder.blocks, store, "blocks")
    model.train()
    logits = model(batch.images, batch.ids)
    assert logits.shape == (4, 1, 16, 16)
    assert store["patches"].shape == (4, 64, 32)  # bnc
    assert grad_from_words(store["blocks"], store["words"]) is None
    loss = timm_style.bce_loss(logits, batch.mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert params_without_grad(model) == set()
    model.eval()
    with torch.no_grad():
        out = model(batch.images, batch.ids)
    assert out.shape == (4, 1, 16, 16) and torch.isfinite(out).all()
