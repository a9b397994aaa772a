"""Training: the generic trainer (trainer.py) and its checkpoints (checkpointing.py), the NeuS
task (neus.py), its evaluation (evaluation.py) and mesh export (export.py), losses and
optimisation."""
from systems import neus  # noqa: F401  (registers itself)
from systems.export import ExportConfig
from systems.registry import SYSTEMS
from systems.trainer import RunPaths, StepResult, Trainer, TrainerConfig

__all__ = ["SYSTEMS", "ExportConfig", "RunPaths", "StepResult", "Trainer", "TrainerConfig"]
