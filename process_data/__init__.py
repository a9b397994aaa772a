"""Scene loaders (one module per format), the base config and ray sampling they share (base.py),
and the reading of image and mask files shared with the command-line tools (loading.py)."""
from process_data import blender, colmap, demo, dtu  # noqa: F401  (they register themselves)
from process_data.registry import DATASETS

__all__ = ["DATASETS"]
