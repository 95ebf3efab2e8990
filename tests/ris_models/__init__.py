"""Tiny third-party-style RIS models for testing hook-based wrapping of *unchanged* models.

Each module is self-contained (no ``masksd`` import), randomly initialised and fast on CPU, and
is written the way the public referring-image-segmentation codebase it imitates writes its
model. Each module also provides ``make_batch(...)`` returning what that codebase's training
loop feeds to the model.

* :mod:`ris_models.cris_style` -- ``CRIS``: late fusion (CRIS.pytorch style). ``open_clip.CLIP``
  with a ``ModifiedResNet`` vision tower driven stage by stage, FPN neck gated by the sentence
  feature, transformer decoder over words, dynamic-conv projector. Train:
  ``(pred.detach(), mask, loss)``; eval: ``pred.detach()`` ``[B, 1, H/4, W/4]``.
* :mod:`ris_models.lavt_style` -- ``LAVTOne``: early text->image fusion (LAVT ``lavt_one``
  style). Swin-like hierarchical backbone with a pixel-word attention module (PWAM) in every
  stage and a Hugging Face ``BertModel`` text encoder. Returns two-class logits
  ``[B, 2, H, W]`` in both modes; the loss (``lavt_loss``) is computed outside.
* :mod:`ris_models.timm_style` -- ``TimmRIS``: timm ``VisionTransformer`` image encoder driven
  through ``forward_features`` + a small ``nn.TransformerEncoder`` text encoder, late fusion in
  a conv neck. Returns logits ``[B, 1, H/4, W/4]`` in both modes; loss (``bce_loss``) outside.

:mod:`ris_models.specs` holds each model's ``HookSpec`` (it imports masksd; the tests and
``benchmarks.step_cost_ris`` share it).
"""

__all__ = ["cris_style", "lavt_style", "timm_style"]
