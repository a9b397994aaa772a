"""Image metrics (PSNR, SSIM), whole image or inside a mask."""
from typing import Optional

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """PSNR = -10 log10(MSE) for images in [0, 1]. pred, gt: [..., 3]; mask: [...] (bool/0-1)"""
    err = ((pred - gt) ** 2).mean(-1)  # [...]
    if mask is not None:
        keep = mask > 0.5
        if not keep.any():
            return float("nan")
        err = err[keep]
    return float(-10.0 * torch.log10(err.mean().clamp(min=1e-10)))


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, size, size]


def ssim(pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), averaged
    over channels and over the pixels of the SSIM map (those inside `mask` when given).
    pred, gt: [H, W, 3] in [0, 1]; mask: [H, W]"""
    c1, c2 = 0.01**2, 0.03**2
    window = _gaussian_window(11, 1.5, pred.device).expand(3, 1, 11, 11)
    a = pred.permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    b = gt.permute(2, 0, 1)[None].float()

    def blur(x):
        return F.conv2d(x, window, padding=5, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    ssim_map = ssim_map[0].mean(0)  # [H, W]
    if mask is not None:
        keep = mask > 0.5
        if not keep.any():
            return float("nan")
        return float(ssim_map[keep].mean())
    return float(ssim_map.mean())
