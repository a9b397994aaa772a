"""Training losses, each a small pure function, and their weighted sum."""
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from models.rendering import exclusive_sum


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


def foreground_opacity(opacity: torch.Tensor) -> torch.Tensor:
    """mean_r O_r, O_r = sum_i w_ri the foreground's opacity along ray r: with a background model
    behind it, a prior that what both can explain is background. Its gradient, 1 / n_rays a
    ray, is outweighed by the L1 colour term's |c_fg - c_bg| / n_rays wherever the foreground's
    colour differs from the background's by more than the weight.  opacity: [n_rays] or [n_rays, 1]"""
    return opacity.mean()


def distortion(
    weights: torch.Tensor, s_starts: torch.Tensor, s_ends: torch.Tensor, ray_indices: torch.Tensor, n_rays: int
) -> torch.Tensor:
    """Mip-NeRF 360's distortion loss, mean over rays, in linear time per ray:
        L = sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 (s_i1 - s_i0),   m_i = (s_i0 + s_i1) / 2
    with the double sum over sorted samples = 2 sum_i w_i (m_i W_<i - (w m)_<i), W_<i and
    (w m)_<i exclusive sums along the ray. Pulls each ray's weight into one compact interval.
    weights, s_starts, s_ends, ray_indices: [n_samples] (sorted by ray, then by s)
    """
    if weights.shape[0] == 0:
        return weights.sum() * 0.0
    mid = 0.5 * (s_starts + s_ends)  # [n_samples]
    prefix = exclusive_sum(torch.stack([weights, weights * mid], dim=-1), ray_indices, n_rays)  # [n_samples, 2]
    pairs = 2.0 * weights * (mid * prefix[:, 0] - prefix[:, 1])  # [n_samples]
    own = weights**2 * (s_ends - s_starts) / 3.0  # [n_samples]
    return (pairs + own).sum() / n_rays


@dataclass
class LossConfig:
    lambda_rgb_l1: float = 1.0
    lambda_rgb_mse: float = 0.0
    lambda_eikonal: float = 0.1
    lambda_mask: float = 0.1
    lambda_sparsity: float = 0.0
    sparsity_scale: float = 1.0
    lambda_distortion_bg: float = 0.0  # distortion of the background's weights (needs model.background)
    # the foreground's opacity, mean over rays (needs model.background): what the background can
    # explain as well (a backdrop) is left to it rather than painted on a surface inside the region
    lambda_opacity: float = 0.0
    # ... counted above the plane the object stands on only (found in the photos' triangulated
    # points before training; needs export.isolate and export.isolate_from_points): below the
    # export's cut (export.isolate_points_margin) nothing reaches the mesh, and there the prior
    # would only push the table's underside and what is seen past its edge to the background
    opacity_spares_support: bool = False


SAMPLE_MEAN_TERMS = ("eikonal", "sparsity")  # means over samples; every other term is a mean over rays


def with_sample_weight(terms: Dict[str, torch.Tensor], weight: float) -> Dict[str, torch.Tensor]:
    """The terms with the per-sample means (SAMPLE_MEAN_TERMS) times `weight`, total re-summed.

    Data-parallel ranks draw equally many rays but not equally many samples, so the mean of
    their per-sample means is not the mean over all samples. A rank that passes
    weight = world_size * n_samples_here / n_samples_all_ranks makes the average of the
    ranks' gradients exactly the gradient of the mean over all samples."""
    scaled = {k: v * weight if k in SAMPLE_MEAN_TERMS else v for k, v in terms.items() if k != "total"}
    scaled["total"] = sum(scaled.values())
    return scaled


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
    if config.lambda_distortion_bg > 0 and "background" in out:
        bg = out["background"]
        terms["distortion_bg"] = config.lambda_distortion_bg * distortion(
            bg["weights"], bg["s_starts"], bg["s_ends"], bg["ray_indices"], out["rgb"].shape[0]
        )
    if config.lambda_opacity > 0 and "background" in out:
        # the model gives opacity_above_plane when the task set it a plane (opacity_spares_support)
        terms["opacity"] = config.lambda_opacity * foreground_opacity(out.get("opacity_above_plane", out["opacity"]))
    terms["total"] = sum(terms.values())
    return terms
