"""Benchmarks of masksd. Run them from the repository root as modules, e.g.
``python -m benchmarks.step_cost`` (they import the reference model as ``examples.cris_clip.model``)."""
