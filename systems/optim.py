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


def fit_state_to_parameter_shapes(optimizer: torch.optim.Optimizer) -> None:
    """Reshape each loaded moment (exp_avg, exp_avg_sq) to its parameter's shape where only the
    shape differs: the hash table is [T, F] under the torch backend and flat [T F] under tcnn,
    so a checkpoint resumes under the other backend. Scalars (step) are left alone."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if value.dim() > 0 and value.shape != param.shape and value.numel() == param.numel():
                    state[key] = value.reshape(param.shape)


def build_scheduler(optimizer: torch.optim.Optimizer, config: SchedulerConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
