"""Scene loaders (one module per format) and the ray sampling they share (base.py)."""
from process_data import dtu  # noqa: F401  (registers itself)
from process_data.registry import DATASETS

__all__ = ["DATASETS"]
