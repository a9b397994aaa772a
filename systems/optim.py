"""Optimizer (AdamW, one learning rate per module) and the learning-rate schedule."""
from dataclasses import dataclass, field
from typing import Dict, List

import torch


@dataclass
class OptimizerConfig:
    lr_geometry: float = 0.01
    lr_texture: float = 0.01
    lr_variance: float = 0.001
    lr_background: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-15
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    """lr(step) = lr0 * f(step): linear warm-up from warmup_start_factor over warmup_steps,
    then constant until decay_start, then gamma ** (step - decay_start)."""

    warmup_steps: int = 500
    warmup_start_factor: float = 0.01
    decay_start: int = 500
    gamma: float = 1.0


def lr_factor(step: int, config: SchedulerConfig) -> float:
    if step < config.warmup_steps:
        t = step / max(config.warmup_steps, 1)
        return config.warmup_start_factor + (1.0 - config.warmup_start_factor) * t
    if step < config.decay_start:
        return 1.0
    return config.gamma ** (step - config.decay_start)


def build_optimizer(groups: Dict[str, list], config: OptimizerConfig) -> torch.optim.Optimizer:
    lrs = {
        "geometry": config.lr_geometry,
        "texture": config.lr_texture,
        "variance": config.lr_variance,
        "background": config.lr_background,
    }
    missing = set(groups) - set(lrs)
    if missing:
        raise KeyError(f"no learning rate configured for parameter group(s) {sorted(missing)}")
    param_groups = [{"params": params, "lr": lrs[name], "name": name} for name, params in groups.items() if params]
    return torch.optim.AdamW(
        param_groups, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: SchedulerConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
