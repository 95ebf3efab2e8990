"""The ``HookSpec`` of each RIS-style test model (the recipes of docs/wrapping.md with the tiny
models' token ids and widths), shared by the tests and ``benchmarks.step_cost_ris``.

Unlike the models next to it, this module imports masksd.
"""

from __future__ import annotations

from typing import Any

import torch

from masksd import HookSpec, Maskable, ModalitySpec, Tap

__all__ = ["cris_spec", "lavt_spec", "rela_spec", "rela_words", "timm_spec"]


def cris_spec() -> HookSpec:
    """CRIS (CLIP ResNet + FPN + transformer decoder; forward(img, word, mask) ->
    (pred.detach(), mask, loss))."""
    return HookSpec(
        image=ModalitySpec(
            embed="backbone.visual.avgpool", layout="bchw", width=16,  # CLIP RN stem output [B, 16, H/4, W/4]
            # C5 in CLIP space [B, 32, H/32, W/32]
            tokens=Tap("neck", kind="input", select="[0][2]", layout="bchw"),
            reuse=("backbone.visual.layer*", "backbone.visual.attnpool.connect"),
        ),
        text=ModalitySpec(
            embed="backbone.token_embedding",
            maskable=Maskable(ids="word", never=(0, 98, 99)),  # pad, SOT, EOT
            tokens=Tap("backbone.ln_final", project="backbone.text_projection"),
            global_=Tap("neck", kind="input", select="[1]"),  # CRIS's sentence state
            reuse=("backbone.transformer", "backbone.ln_final"),
        ),
        logits=Tap("proj"),  # the training forward returns pred.detach()
        target="mask",
        loss="[2]",  # CRIS's own BCE is the segmentation term
    )


def lavt_spec() -> HookSpec:
    """LAVT-One (Swin with PWAM fusion in every stage + BERT; two-class logits)."""
    pwam = "backbone.layers.2.fusion.image_lang_att"
    return HookSpec(
        image=ModalitySpec(embed="backbone.patch_embed", layout="bchw",
                           tokens=Tap(f"{pwam}.f_query", layout="bcn"),  # PWAM's pixel-word space
                           reuse=("backbone.layers.*",)),
        text=ModalitySpec(embed="text_encoder.embeddings.word_embeddings",
                          maskable=Maskable(ids="input_ids", never=(2, 3), attention_mask="attention_mask"),
                          tokens=Tap(f"{pwam}.f_key", layout="bcn"), reuse=("text_encoder",),
                          mask_token="embedding:text_encoder.embeddings.word_embeddings:4"),  # BERT [MASK]
        two_class=True,
    )


def timm_spec() -> HookSpec:
    """A timm ViT (driven through forward_features) + a small text transformer."""
    return HookSpec(
        image=ModalitySpec(embed="image_encoder.patch_embed", layout="bnc",  # [B, 64, 32], 8x8 grid
                           tokens=Tap("image_encoder.norm", select="[:, 1:]"),  # drop the class token
                           reuse=("image_encoder.blocks", "image_encoder.norm")),
        text=ModalitySpec(embed="text_encoder.token_embedding", maskable=Maskable(ids="ids", never=(0,)),
                          tokens=Tap("text_encoder.norm"), reuse=("text_encoder",)),
    )


def rela_words(arguments: dict[str, Any]) -> torch.Tensor:
    """Maskable words of a ReLA batch: the ids live in ``batched_inputs``' dicts, so the rule reads
    them there; real tokens other than [CLS] (101) and [SEP] (102): ``[B, L]`` bool."""
    batch = arguments["batched_inputs"]
    ids = torch.cat([x["lang_tokens"] for x in batch])
    real = torch.cat([x["lang_mask"] for x in batch]).bool()
    return real & (ids != 101) & (ids != 102)


def rela_spec() -> HookSpec:
    """ReLA / GRES (detectron2; ``forward(batched_inputs: list[dict])`` returns a loss dict in
    training): ResNet stem, BERT, pixel-word attention in the head (late fusion)."""
    return HookSpec(
        image=ModalitySpec(embed="backbone.stem", layout="bchw",
                           tokens=Tap("sem_seg_head.pixel_query", layout="bchw"),  # res5 grid: the units
                           reuse=("backbone.res*",)),
        text=ModalitySpec(embed="text_encoder.embeddings.word_embeddings", maskable=Maskable(fn=rela_words),
                          tokens=Tap("sem_seg_head.word_key"), reuse=("text_encoder",),
                          mask_token="embedding:text_encoder.embeddings.word_embeddings:103"),  # BERT [MASK]
        logits=Tap("sem_seg_head", select="['pred_masks']"),
        two_class=True,
        loss="",  # the training forward returns the loss dict itself
    )
