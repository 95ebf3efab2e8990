"""Adapters that turn real models into masksd towers (``masksd.towers``).

None of them imports its library at ``import masksd`` time; install the matching extra.

``masksd.adapters.open_clip`` (extra ``clip``)
    open_clip CLIP with a ViT or a ResNet (``ModifiedResNet``) image tower and the standard text
    tower: ``towers_from_open_clip(clip)``.
``masksd.adapters.hf_clip`` (extra ``hf``)
    Hugging Face ``transformers.CLIPModel``, image and text: ``towers_from_hf_clip(model)``.
``masksd.adapters.timm`` (extra ``timm``)
    timm ``VisionTransformer`` image tower: ``tower_from_timm_vit(model)``.

See docs/adapters.md for what each tower embeds, encodes and never masks.
"""
