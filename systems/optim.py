"""Optimizer (AdamW, one learning rate per module) and the learning-rate schedule.

Both are written here rather than taken from torch.optim: torch.optim's Optimizer imports
torch._dynamo at its first use (2 s of single-threaded Python on a 2-core machine, 20% of the
time to the first step), although nothing here is compiled. `AdamW` is torch.optim.AdamW's
single-tensor algorithm (tests/test_optim.py compares them), and both classes keep
torch.optim's state_dict layout, so checkpoints load either way. Its step runs the formula below in
one pass over each group's tensors (torch's fused AdamW kernel, `torch._fused_adamw_`, the one
torch.optim.AdamW(fused=True) calls) for CPU float32 tensors, the single-tensor path elsewhere.
The update is dense over the hash tables (millions of entries): over 6.3M entries on 2 cores the
single-tensor path's passes took 19 ms and the fused kernel 3.7 ms; a scan 24 training step went
from 0.150 to 0.144 s (scripts/benchmark.py).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

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


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), per parameter p with gradient g,
    at step t (counted per parameter, from 1), learning rate lr of p's group:

        p   <- p * (1 - lr * weight_decay)
        m   <- beta1 * m + (1 - beta1) * g
        v   <- beta2 * v + (1 - beta2) * g^2
        p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    torch.optim.AdamW's defaults otherwise (no amsgrad, no maximize); parameters without a
    gradient are left alone. param_groups and state as in torch.optim (state[p]: step [] float32,
    exp_avg and exp_avg_sq like p), so schedulers, GradScaler and checkpoints see the same thing."""

    def __init__(self, param_groups: Sequence[Dict[str, Any]], betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, fused: bool = True):
        # fused: one kernel per group over its CPU float32 tensors where torch has it, else (and
        # always for fused=False) the single-tensor reference below
        self.fused = fused and hasattr(torch, "_fused_adamw_")
        defaults = {"betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups: List[Dict[str, Any]] = [
            {**defaults, **{k: v for k, v in group.items() if k != "params"}, "params": list(group["params"])}
            for group in param_groups
        ]
        self.state: Dict[torch.Tensor, Dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad.zero_()

    def _state(self, param: torch.Tensor) -> Dict[str, torch.Tensor]:
        state = self.state.get(param)
        if state is None:
            state = self.state[param] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
        return state

    @staticmethod
    def _fusable(param: torch.Tensor) -> bool:
        """CPU float32 (the state's step counts live on the CPU, where the CPU kernel reads them)."""
        return param.device.type == "cpu" and param.dtype == torch.float32 and not param.grad.is_sparse

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            fused, single = [], []
            for p in group["params"]:
                if p.grad is not None:
                    (fused if self.fused and self._fusable(p) else single).append(p)
            if fused:
                self._fused_step(group, fused)
            for param in single:
                self._single_step(group, param)

    def _fused_step(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        """The formula of the class docstring over params (CPU float32) in one kernel."""
        states = [self._state(p) for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        (beta1, beta2) = group["betas"]
        torch._fused_adamw_(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], steps, lr=float(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            eps=group["eps"], amsgrad=False, maximize=False)

    def _single_step(self, group: Dict[str, Any], param: torch.Tensor) -> None:
        """The reference: the formula of the class docstring, one tensor at a time."""
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grad = param.grad  # like param
        state = self._state(param)
        state["step"] += 1
        t = state["step"].item()
        if decay != 0:
            param.mul_(1.0 - lr * decay)
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = lr / (1.0 - beta1 ** t)
        denom = (state["exp_avg_sq"].sqrt() / (1.0 - beta2 ** t) ** 0.5).add_(eps)
        param.addcdiv_(state["exp_avg"], denom, value=-step_size)

    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's layout: parameters by their index over the groups, in order."""
        index = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for param in group["params"]:
                ids.append(index.setdefault(param, len(index)))
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[p]: {k: v.clone() for k, v in s.items()} for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """A state_dict of this class or of torch.optim.AdamW / Adam over the same groups: the
        groups' settings (lr, betas, eps, weight_decay, initial_lr, ...) and each parameter's
        moments, cast to the parameter's device and dtype."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError("the optimizer state has other parameter groups than this model")
        params = {}
        for saved_group, group in zip(saved, self.param_groups):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved_group.items() if k != "params"})
            params.update(zip(saved_group["params"], group["params"]))
        self.state = {}
        for i, values in state_dict["state"].items():
            param = params[int(i)]
            self.state[param] = {
                k: (v.detach().to(torch.float32).cpu().reshape(()) if k == "step" else v.detach().to(param)).clone()
                for k, v in values.items()
            }


class LambdaSchedule:
    """lr of group i = base_lrs[i] * factor(last_epoch), set at construction (last_epoch 0) and by
    each step(); base_lrs are the groups' `initial_lr` (set to their lr when missing), as
    torch.optim.lr_scheduler.LambdaLR, whose state_dict keys it keeps (base_lrs, last_epoch, _last_lr)."""

    def __init__(self, optimizer: AdamW, factor):
        self.optimizer = optimizer
        self.factor = factor
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = -1
        self.step()

    def step(self) -> None:
        self.last_epoch += 1
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_epoch)

    def get_last_lr(self) -> List[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        """LambdaLR's keys (lr_lambdas None: the factor is code, not state), so either loads it."""
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch, "_step_count": self.last_epoch + 1,
                "_last_lr": self.get_last_lr(), "lr_lambdas": [None] * len(self.base_lrs)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """This class's or LambdaLR's state; the groups' current lr come with the optimizer's."""
        self.base_lrs = list(state["base_lrs"])
        self.last_epoch = int(state["last_epoch"])


def build_optimizer(groups: Dict[str, list], config: OptimizerConfig) -> AdamW:
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
    return AdamW(param_groups, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)


def fit_state_to_parameter_shapes(optimizer: AdamW) -> None:
    """Reshape each loaded moment (exp_avg, exp_avg_sq) to its parameter's shape where only the
    shape differs: the hash table is [T, F] under the torch backend and flat [T F] under tcnn,
    so a checkpoint resumes under the other backend. Scalars (step) are left alone."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if value.dim() > 0 and value.shape != param.shape and value.numel() == param.numel():
                    state[key] = value.reshape(param.shape)


def build_scheduler(optimizer: AdamW, config: SchedulerConfig) -> LambdaSchedule:
    return LambdaSchedule(optimizer, lambda step: lr_factor(step, config))
