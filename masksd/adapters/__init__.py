"""Adapters that turn real models into masksd towers (``masksd.towers``).

``masksd.adapters.open_clip``: open_clip CLIP with a ViT image tower and the standard text tower.
"""
