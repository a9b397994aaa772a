"""Training losses, each a small pure function, and their weighted sum."""
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F


def rgb_l1(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """mean |pred - gt|.  pred, gt: [n_rays, 3]"""
    return (pred - gt).abs().mean()


def rgb_mse(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """mean (pred - gt)^2.  pred, gt: [n_rays, 3]"""
    return ((pred - gt) ** 2).mean()


def eikonal(sdf_grad: torch.Tensor) -> torch.Tensor:
    """mean (|grad sdf| - 1)^2 (Gropp et al. 2020); 0 when there are no samples.  [n_samples, 3]"""
    if sdf_grad.shape[0] == 0:
        return sdf_grad.sum() * 0.0
    return ((sdf_grad.norm(dim=-1) - 1.0) ** 2).mean()


def mask_bce(opacity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the accumulated opacity against the mask, opacity clipped to
    [1e-3, 1 - 1e-3] so that it stays finite.  opacity, mask: [n_rays]"""
    return F.binary_cross_entropy(opacity.clamp(1e-3, 1.0 - 1e-3), (mask > 0.5).float())


def sparsity(sdf: torch.Tensor, scale: float) -> torch.Tensor:
    """mean exp(-scale |sdf|): discourages surface where nothing is seen.  sdf: [n_samples]"""
    if sdf.shape[0] == 0:
        return sdf.sum() * 0.0
    return torch.exp(-scale * sdf.abs()).mean()


@dataclass
class LossConfig:
    lambda_rgb_l1: float = 1.0
    lambda_rgb_mse: float = 0.0
    lambda_eikonal: float = 0.1
    lambda_mask: float = 0.1
    lambda_sparsity: float = 0.0
    sparsity_scale: float = 1.0


def neus_losses(config: LossConfig, out: Dict, batch: Dict) -> Dict[str, torch.Tensor]:
    """The weighted loss terms that are switched on (weight > 0) and their sum under 'total'."""
    terms = {}
    if config.lambda_rgb_l1 > 0:
        terms["rgb_l1"] = config.lambda_rgb_l1 * rgb_l1(out["rgb"], batch["rgb"])
    if config.lambda_rgb_mse > 0:
        terms["rgb_mse"] = config.lambda_rgb_mse * rgb_mse(out["rgb"], batch["rgb"])
    if config.lambda_eikonal > 0:
        terms["eikonal"] = config.lambda_eikonal * eikonal(out["sdf_grad"])
    if config.lambda_mask > 0:
        terms["mask"] = config.lambda_mask * mask_bce(out["opacity"], batch["mask"])
    if config.lambda_sparsity > 0:
        terms["sparsity"] = config.lambda_sparsity * sparsity(out["sdf"], config.sparsity_scale)
    terms["total"] = sum(terms.values())
    return terms
