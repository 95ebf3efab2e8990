"""LAVT's default setup: BERT outside the segmentation model (two modules, two DDP wrappers, two
entries in the checkpoint). masksd needs both calls inside one forward; a five-line glue module
holds the two unchanged models, and each still saves and loads with LAVT's own code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("timm")

from ris_models import lavt_style  # noqa: E402

import masksd  # noqa: E402
from masksd import HookSpec, Maskable, ModalitySpec, Tap  # noqa: E402


class LAVTWithBert(nn.Module):
    """LAVT's train loop's two calls as one module (the glue; both models unchanged)."""

    def __init__(self, model: nn.Module, bert: nn.Module) -> None:
        super().__init__()
        self.model, self.bert = model, bert

    def forward(self, image, sentences, attentions):
        embedding = self.bert(sentences, attention_mask=attentions)[0].permute(0, 2, 1)  # [B, C, L]
        return self.model(image, embedding, l_mask=attentions.unsqueeze(-1))


PWAM = "model.backbone.layers.2.fusion.image_lang_att"
SPEC = HookSpec(
    image=ModalitySpec(embed="model.backbone.patch_embed", layout="bchw",
                       tokens=Tap(f"{PWAM}.f_query.0", layout="bcn"), reuse=("model.backbone.layers.*",)),
    text=ModalitySpec(embed="bert.embeddings.word_embeddings",
                      maskable=Maskable(ids="sentences", never=(lavt_style.CLS, lavt_style.SEP),
                                        attention_mask="attentions"),
                      tokens=Tap(f"{PWAM}.f_key", layout="bcn"), reuse=("bert",),
                      mask_token=f"embedding:bert.embeddings.word_embeddings:{lavt_style.MASK}"),
    two_class=True,
)


def test_glued_lavt_trains_as_its_loop_and_saves_as_two_models(tmp_path):
    torch.manual_seed(0)
    model, bert = lavt_style.LAVT(), lavt_style.tiny_bert()
    glue = LAVTWithBert(model, bert)
    wrapper = masksd.wrap(glue, SPEC, criterion=lavt_style.lavt_loss)
    batch = lavt_style.make_batch()
    report = wrapper.check(batch.image, batch.input_ids, batch.attention_mask, target=batch.target)
    assert report.fusion == "text->image" and report.calls["masked image"].get("bert", 0) == 0  # BERT reused
    torch.manual_seed(7)  # dropout and drop-path draw from the global stream in both runs
    embedding = bert(batch.input_ids, attention_mask=batch.attention_mask)[0].permute(0, 2, 1)
    own = model(batch.image, embedding, l_mask=batch.attention_mask.unsqueeze(-1))  # LAVT's train loop
    torch.manual_seed(7)
    out = wrapper.train()(batch.image, batch.input_ids, batch.attention_mask, target=batch.target)
    assert torch.equal(out.output, own)
    torch.testing.assert_close(out.losses["seg"], lavt_style.lavt_loss(own, batch.target).detach())
    out.loss.backward()
    assert all(p.grad is not None for p in bert.parameters() if p.requires_grad)

    # LAVT's checkpoint: {'model': model.state_dict(), 'bert_model': bert.state_dict()}, unchanged keys
    torch.save({"model": model.state_dict(), "bert_model": bert.state_dict()}, tmp_path / "checkpoint.pth")
    state = torch.load(tmp_path / "checkpoint.pth")
    fresh_model, fresh_bert = lavt_style.LAVT(), lavt_style.tiny_bert()
    fresh_model.load_state_dict(state["model"], strict=True)
    fresh_bert.load_state_dict(state["bert_model"], strict=True)
    with torch.no_grad():
        fresh = fresh_model.eval()(batch.image,
                                   fresh_bert.eval()(batch.input_ids, attention_mask=batch.attention_mask)[0]
                                   .permute(0, 2, 1), l_mask=batch.attention_mask.unsqueeze(-1))
        assert torch.equal(wrapper.eval()(batch.image, batch.input_ids, batch.attention_mask), fresh)
