"""Scene loaders (one module per format) and the ray sampling they share (base.py)."""
from process_data import blender, colmap, demo, dtu  # noqa: F401  (they register themselves)
from process_data.registry import DATASETS

__all__ = ["DATASETS"]
