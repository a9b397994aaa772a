"""Training systems: the shared loop (base.py), NeuS (neus.py), losses and optimisation."""
from systems import neus  # noqa: F401  (registers itself)
from systems.base import ExportConfig, RunPaths, TrainerConfig
from systems.registry import SYSTEMS

__all__ = ["SYSTEMS", "ExportConfig", "RunPaths", "TrainerConfig"]
