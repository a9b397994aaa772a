"""Models: networks (models/network.py), rendering maths (models/rendering.py), the occupancy
grid (models/occupancy.py) and the NeuS model that ties them (models/neus.py)."""
from models import neus  # noqa: F401  (registers itself)
from models.registry import MODELS

__all__ = ["MODELS"]
