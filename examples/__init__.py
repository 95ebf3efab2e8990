"""Runnable examples. Each folder is a program (run its scripts as files, e.g.
``python examples/cris_clip/train.py``); tests and benchmarks import the modules that import
no sibling as ``examples.<folder>.<module>``."""
