"""Occupancy grid over [-radius, radius]^3 and fixed-step ray marching through it.

The grid's state and its periodic EMA update are nerfacc's `OccGridEstimator` on every
device (pure torch, it runs on CPU). Marching is nerfacc's CUDA `sampling` on CUDA with
`backend: nerfacc`, and otherwise `march_rays`, the torch twin written here: samples at
t = near + k * step whose midpoint falls in an occupied cell, returned packed.
"""
import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, List, Literal, Optional, Tuple

import nerfacc
import torch
from torch import nn
from torch.utils.cpp_extension import is_ninja_available

from models.rendering import visible_samples
from utils.config import Configurable
from utils.misc import choose_cuda_backend


def ray_aabb_intersect(
    rays_o: torch.Tensor, rays_d: torch.Tensor, aabb: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test. rays_o, rays_d: [n_rays, 3]; aabb: [6] (min xyz, max xyz)
    -> t_near [n_rays] (>= 0), t_far [n_rays], hit [n_rays] bool
    """
    inv_d = 1.0 / torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)  # [n_rays, 3]
    t0 = (aabb[:3] - rays_o) * inv_d
    t1 = (aabb[3:] - rays_o) * inv_d
    t_near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)  # [n_rays]
    t_far = torch.maximum(t0, t1).amin(-1)  # [n_rays]
    return t_near, t_far, t_far > t_near


def march_rays(
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    t_near: torch.Tensor,
    t_far: torch.Tensor,
    binaries: torch.Tensor,
    aabb: torch.Tensor,
    step_size: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-step samples [near + k step, near + (k+1) step] whose midpoint lies before far and
    in an occupied cell of `binaries` (torch twin of nerfacc's traverse_grids, one level: the
    last sample may end up to half a step beyond far, as there).

    rays_o, rays_d: [n_rays, 3]; t_near, t_far: [n_rays]; binaries: [res, res, res] bool over aabb [6]
    -> ray_indices [n_samples] int64 (sorted), t_starts [n_samples], t_ends [n_samples]
    """
    device = rays_o.device
    span = (t_far - t_near).clamp(min=0.0)  # [n_rays]
    n_steps = int(torch.ceil(span.max() / step_size).item()) if span.numel() else 0
    if n_steps == 0:
        empty = torch.zeros(0, device=device)
        return torch.zeros(0, dtype=torch.long, device=device), empty, empty
    res = torch.tensor(binaries.shape, device=device)  # [3]
    t_starts = t_near[:, None] + step_size * torch.arange(n_steps, device=device)  # [n_rays, K]
    t_mid = t_starts + 0.5 * step_size  # [n_rays, K]
    inside = t_mid < t_far[:, None]  # [n_rays, K]
    cell = (rays_o[:, None, :] + t_mid[..., None] * rays_d[:, None, :] - aabb[:3]) / (aabb[3:] - aabb[:3])
    cell = (cell * res).long()  # [n_rays, K, 3]
    in_grid = ((cell >= 0) & (cell < res)).all(-1)  # [n_rays, K]
    cell = torch.minimum(cell.clamp(min=0), res - 1)
    flat = (cell[..., 0] * res[1] + cell[..., 1]) * res[2] + cell[..., 2]  # [n_rays, K]
    keep = inside & in_grid & binaries.reshape(-1)[flat]  # [n_rays, K]
    ray_indices, step_indices = torch.nonzero(keep, as_tuple=True)  # sorted by ray
    t0 = t_starts[ray_indices, step_indices]  # [n_samples]
    return ray_indices, t0, t0 + step_size


def update_estimator(estimator: nerfacc.OccGridEstimator, step: int, occupancy_fn: Callable, every: int,
                     threshold: float, ema_decay: float, warmup_steps: int) -> List[torch.Tensor]:
    """nerfacc's EMA update of `estimator` when step % every == 0 (its update_every_n_steps,
    with the rule here so that the caller learns what changed) -> [occs, binaries] or []."""
    if step % every != 0:
        return []
    estimator._update(step=step, occ_eval_fn=occupancy_fn, occ_thre=threshold, ema_decay=ema_decay,
                      warmup_steps=warmup_steps)
    return [estimator.occs, estimator.binaries]


class OccupancyGrid(Configurable, nn.Module):
    """Which cells of [-radius, radius]^3 hold surface, and sampling of rays through them."""

    @dataclass
    class Config:
        resolution: int = 128
        update_every: int = 16  # steps between grid updates
        ema_decay: float = 0.95
        warmup_steps: int = 256  # every cell is re-evaluated during warm-up; then 1/4 + occupied
        occ_threshold: float = 0.001  # a cell is occupied when its alpha (EMA) exceeds this
        # skip samples behind the surface: transmittance (from a gradient-free alpha) below this
        early_stop_eps: float = 1e-4
        # skip samples whose gradient-free (head-on, so upper-bound) alpha is below this
        alpha_threshold: float = 0.0
        # cells deeper than this inside the surface (sdf < -shell_width) count as empty, so rays
        # skip the interior (only reached through an opaque surface); 0 keeps them occupied
        shell_width: float = 0.0
        backend: Literal["auto", "torch", "nerfacc"] = "auto"  # nerfacc: CUDA

    def __init__(self, config: "OccupancyGrid.Config", radius: float):
        super().__init__()
        self.config = config
        # chosen once at start-up (systems/backends.py); a grid built directly with `auto` runs torch
        self.backend = "torch" if config.backend == "auto" else config.backend
        aabb = [-radius] * 3 + [radius] * 3
        self.register_buffer("aabb", torch.tensor(aabb, dtype=torch.float32), persistent=False)
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=aabb, resolution=config.resolution, levels=1)

    @property
    def binaries(self) -> torch.Tensor:
        return self.estimator.binaries[0]  # [res, res, res] bool

    def update(self, step: int, occupancy_fn: Callable[[torch.Tensor], torch.Tensor]) -> List[torch.Tensor]:
        """Every `update_every` steps: occ = max(ema_decay * occ, occupancy_fn(x)) at sampled cells
        -> the tensors it changed (EMA occupancies, binaries; [] between updates)."""
        c = self.config
        return update_estimator(self.estimator, step, occupancy_fn, c.update_every, c.occ_threshold, c.ema_decay,
                                c.warmup_steps)

    @torch.no_grad()
    def sample(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        step_size: float,
        stratified: bool,
        alpha_fn: Optional[Callable] = None,
        t_max: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed samples of the rays inside occupied cells (and before t_max [n_rays] when
        given); with `alpha_fn(t_starts, t_ends, ray_indices)`, samples hidden behind the surface
        (transmittance < early_stop_eps) are dropped.
        rays_o, rays_d: [n_rays, 3] -> ray_indices, t_starts, t_ends: [n_samples]
        """
        t_near, t_far, _ = ray_aabb_intersect(rays_o, rays_d, self.aabb)
        if t_max is not None:
            t_far = torch.minimum(t_far, t_max)
        if self.backend == "nerfacc":
            # traversal only: with an alpha_fn nerfacc would filter by its own rule (alpha_thre
            # lowered to the grid's mean occupancy), so both backends filter below, alike
            ray_indices, t_starts, t_ends = self.estimator.sampling(
                rays_o, rays_d, t_min=t_near, t_max=t_far, render_step_size=step_size, stratified=stratified
            )
        else:
            if stratified:
                t_near = t_near + torch.rand_like(t_near) * step_size
            ray_indices, t_starts, t_ends = march_rays(
                rays_o, rays_d, t_near, t_far, self.binaries, self.aabb, step_size
            )
        c = self.config
        if alpha_fn is not None and (c.early_stop_eps > 0 or c.alpha_threshold > 0) and ray_indices.numel() > 0:
            alphas = alpha_fn(t_starts, t_ends, ray_indices)  # [n_samples]
            keep = visible_samples(alphas, ray_indices, rays_o.shape[0], c.early_stop_eps, c.alpha_threshold)
            ray_indices, t_starts, t_ends = ray_indices[keep], t_starts[keep], t_ends[keep]
        return ray_indices, t_starts, t_ends


NERFACC_FIRST_USE = (
    "nerfacc compiles its CUDA code on first use unless its prebuilt wheel is installed: the first "
    "step can take a few minutes (once; torch caches the build)"
)


def nvcc_cuda_version() -> Optional[str]:
    """The CUDA version of the nvcc on PATH ("12.4"), or None when it does not say."""
    try:
        banner = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", banner)
    return match.group(1) if match else None


def nerfacc_cuda_error() -> Optional[str]:
    """None when nerfacc's CUDA code is there (prebuilt wheel) or can be built here (nvcc on
    PATH of torch's CUDA major version, and ninja, which torch's extension builder needs), else
    why not. Looks only: importing nerfacc's backend would start the build."""
    if importlib.util.find_spec("nerfacc.csrc") is not None:
        return None
    if shutil.which("nvcc") is None:
        return ("no prebuilt nerfacc CUDA extension and no CUDA toolkit (nvcc) to build one: install the CUDA "
                "toolkit matching torch's CUDA version")
    if not is_ninja_available():
        return "nerfacc builds its CUDA code with ninja, which is not installed: pip install ninja"
    nvcc, torch_cuda = nvcc_cuda_version(), torch.version.cuda
    if nvcc and torch_cuda and nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"the CUDA toolkit on PATH (nvcc {nvcc}) does not match torch's CUDA {torch_cuda}, so nerfacc's "
                f"CUDA code cannot be built against this torch: put CUDA {torch_cuda}'s nvcc first on PATH")
    return None


def choose_occupancy_backend(requested: str, device: torch.device) -> str:
    """auto | torch | nerfacc -> the backend that samples (and renders packed samples): nerfacc
    only on CUDA with its CUDA code available (auto falls back to torch); an explicit nerfacc
    that cannot run raises ConfigError saying why."""
    return choose_cuda_backend(
        requested, device, "occupancy", "nerfacc", nerfacc_cuda_error,
        f"backend 'nerfacc' samples and renders with nerfacc's CUDA kernels, but this run's device is "
        f"{device.type}; set backend: torch (or auto) to march rays in plain torch",
        lambda error: f"backend 'nerfacc' needs nerfacc's CUDA code: {error} (or install nerfacc's prebuilt "
        "wheel), or set backend: torch",
    )
