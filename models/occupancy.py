"""Occupancy grids (`CellGrid`: the foreground's over [-radius, radius]^3, the background's over
its contracted cube) and fixed-step ray marching through the foreground's.

A grid's state and its periodic EMA update are nerfacc's `OccGridEstimator` on every device
(pure torch, it runs on CPU). Marching is nerfacc's CUDA `sampling` on CUDA with
`backend: nerfacc`, and otherwise `march_rays`, the torch twin written here: samples at
t = near + k * step whose midpoint falls in an occupied cell, returned packed; each ray marches
only its own steps, from the first whole step before the occupied cells' box (`clip_to_box`).
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


def cell_index(x: torch.Tensor, aabb: torch.Tensor, shape) -> Tuple[torch.Tensor, torch.Tensor]:
    """The cell of a grid of `shape` (x, y, z cells) over aabb [6] that holds each point:
    cell = floor((x - min) / (max - min) * res), as a row-major flat index (clamped into the grid),
    and whether the point is inside the grid at all. x: [..., 3] -> flat [...] int64, inside [...] bool"""
    res = torch.tensor(shape, device=x.device)  # [3]
    cell = ((x - aabb[:3]) / (aabb[3:] - aabb[:3]) * res).floor().long()  # [..., 3]
    inside = ((cell >= 0) & (cell < res)).all(-1)  # [...]
    cell = torch.minimum(cell.clamp(min=0), res - 1)
    return (cell[..., 0] * res[1] + cell[..., 1]) * res[2] + cell[..., 2], inside


def occupied_at(x: torch.Tensor, binaries: torch.Tensor, aabb: torch.Tensor) -> torch.Tensor:
    """Whether points lie in an occupied cell of `binaries` [res, res, res] over aabb [6] (outside
    the box: False). x: [..., 3] -> bool [...]"""
    flat, inside = cell_index(x, aabb, binaries.shape)  # [...]
    return inside & binaries.reshape(-1)[flat]


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
    # each ray's own steps, packed (not n_rays x the longest span): ceil(span / step) of them
    # covers every k with near + (k + 1/2) step < far
    n_steps = torch.ceil((t_far - t_near).clamp(min=0.0) / step_size).long()  # [n_rays]
    ray_of = torch.repeat_interleave(torch.arange(len(n_steps), device=device), n_steps)  # [M] sorted
    first = torch.cumsum(n_steps, 0) - n_steps  # [n_rays]
    k = torch.arange(len(ray_of), device=device) - first[ray_of]  # [M] step index along its ray
    t_starts = t_near[ray_of] + step_size * k  # [M]
    t_mid = t_starts + 0.5 * step_size  # [M]
    x = rays_o[ray_of] + t_mid[:, None] * rays_d[ray_of]  # [M, 3]
    keep = (t_mid < t_far[ray_of]) & occupied_at(x, binaries, aabb)  # [M]
    t0 = t_starts[keep]  # [n_samples]
    return ray_of[keep], t0, t0 + step_size


def clip_to_box(rays_o: torch.Tensor, rays_d: torch.Tensor, t_near: torch.Tensor, t_far: torch.Tensor,
                box: torch.Tensor, step_size: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Marching bounds that skip the whole steps before `box` (the occupied cells' box) and end a
    step after it, so that march_rays takes the same samples t_near + k step (the same lattice) that
    it keeps without the box, from a shorter span. A ray that misses the box gets t_far < t_near.
    rays_o, rays_d: [n_rays, 3]; t_near, t_far: [n_rays]; box: [6] -> t_near, t_far [n_rays]"""
    box_near, box_far, _ = ray_aabb_intersect(rays_o, rays_d, box)  # [n_rays]
    # a sample ending at or before the box's entry has its midpoint outside: skip those
    skip = torch.floor((box_near - t_near) / step_size).clamp(min=0.0)  # [n_rays]
    return t_near + skip * step_size, torch.minimum(t_far, box_far + step_size)


def alpha_reach(alpha_fn: Callable[[torch.Tensor], torch.Tensor], threshold: float, max_distance: float,
                n: int = 4097, device: Optional[torch.device] = None) -> float:
    """How far outside the surface a head-on alpha stays at or above `threshold`: the smallest d
    on a grid of n points over [0, max_distance] beyond which alpha_fn(sdf) < threshold
    (alpha_fn decreasing for sdf >= 0, as NeuS's head-on alpha). max_distance when it never falls.
    alpha_fn: sdf [n] (on `device`) -> alpha [n]"""
    d = torch.linspace(0.0, max_distance, n, device=device)  # [n]
    above = torch.nonzero(alpha_fn(d) >= threshold)  # [k, 1]
    if above.numel() == 0:
        return 0.0
    return min(max_distance, float(d[above.max()]) + max_distance / (n - 1))


def screened_sdf(sdf_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, aabb: torch.Tensor,
                 coarse_res: int, band: Tuple[float, float], lipschitz: float) -> torch.Tensor:
    """sdf_fn(x) where it may lie inside band = (lo, hi), a coarse estimate elsewhere, for far
    fewer evaluations than sdf_fn(x) when most of x is far from the surface (a whole-grid update).

    The sdf is taken at the centres c of a coarse_res^3 lattice of cells of size h over aabb. For a
    field of Lipschitz constant L, every x in c's cell has |sdf(x) - sdf(c)| <= L h sqrt(3) / 2 =: m,
    so where sdf(c) > hi + m or sdf(c) < lo - m the true sdf is outside band as well and sdf(c)
    stands in for it; the other points are evaluated.

    x: [N, 3] inside aabb [6] -> sdf [N]
    """
    lo, hi = band
    size = aabb[3:] - aabb[:3]  # [3]
    h = size / coarse_res  # [3]
    axis = [aabb[i] + (torch.arange(coarse_res, device=x.device) + 0.5) * h[i] for i in range(3)]
    centres = torch.stack(torch.meshgrid(*axis, indexing="ij"), -1).reshape(-1, 3)  # [coarse_res^3, 3]
    coarse = sdf_fn(centres)  # [coarse_res^3]
    margin = lipschitz * float(h.norm()) / 2
    estimate = coarse[cell_index(x, aabb, (coarse_res,) * 3)[0]]  # [N]
    near = (estimate <= hi + margin) & (estimate >= lo - margin)  # [N]
    sdf = estimate.clone()  # [N]
    if near.any():
        sdf[near] = sdf_fn(x[near])
    return sdf


class CellGrid(nn.Module):
    """An occupancy grid over an axis-aligned box, for the foreground (OccupancyGrid) and the
    contracted background alike: nerfacc's OccGridEstimator (one level) holds the EMA occupancies
    and binaries; `update` is its periodic EMA update, `occupied` looks points up."""

    def __init__(self, aabb: List[float], resolution: int, update_every: int, ema_decay: float,
                 warmup_steps: int, threshold: float):
        super().__init__()
        self.update_every, self.ema_decay, self.warmup_steps, self.threshold = (
            update_every, ema_decay, warmup_steps, threshold)
        self.register_buffer("aabb", torch.tensor(aabb, dtype=torch.float32), persistent=False)  # [6]
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=aabb, resolution=resolution, levels=1)

    @property
    def binaries(self) -> torch.Tensor:
        return self.estimator.binaries[0]  # [res, res, res] bool

    def occupied(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., 3] -> bool [...]: in an occupied cell"""
        return occupied_at(x, self.binaries, self.aabb)

    def evaluates_all_cells(self, step: int) -> bool:
        """Whether the update at `step` evaluates every cell (a warm-up update), not a quarter."""
        return step < self.warmup_steps and step % self.update_every == 0

    def update(self, step: int, occupancy_fn: Callable[[torch.Tensor], torch.Tensor]) -> List[torch.Tensor]:
        """Every `update_every` steps: occ = max(ema_decay * occ, occupancy_fn(x)) at sampled cells
        (all of them during warm-up) -> the tensors it changed (EMA occupancies, binaries; [] between
        updates)."""
        if step % self.update_every != 0:  # nerfacc's update_every_n_steps, kept here to say what changed
            return []
        self.estimator._update(step=step, occ_eval_fn=occupancy_fn, occ_thre=self.threshold,
                               ema_decay=self.ema_decay, warmup_steps=self.warmup_steps)
        return [self.estimator.occs, self.estimator.binaries]

    def occupied_box(self) -> torch.Tensor:
        """The box of the occupied cells, [6] (min xyz, max xyz); an empty box when none is."""
        binaries = self.binaries  # [res, res, res]
        bounds = torch.zeros(6, device=binaries.device)  # [6] in cells
        for dim in range(3):
            other = tuple(d for d in range(3) if d != dim)
            filled = torch.nonzero(binaries.any(dim=other))[:, 0]  # [k] occupied slabs along dim
            if filled.numel():
                bounds[dim], bounds[dim + 3] = filled.min(), filled.max() + 1
        res = torch.tensor(binaries.shape, device=binaries.device).repeat(2)  # [6]
        return self.aabb[:3].repeat(2) + bounds / res * (self.aabb[3:] - self.aabb[:3]).repeat(2)


class OccupancyGrid(Configurable, CellGrid):
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
        super().__init__([-radius] * 3 + [radius] * 3, config.resolution, config.update_every, config.ema_decay,
                         config.warmup_steps, config.occ_threshold)
        self.config = config
        # chosen once at start-up (systems/backends.py); a grid built directly with `auto` runs torch
        self.backend = "torch" if config.backend == "auto" else config.backend

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
            t_near, t_far = clip_to_box(rays_o, rays_d, t_near, t_far, self.occupied_box(), step_size)
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


def is_ninja_available() -> bool:
    """torch's check, imported only when asked (torch.utils.cpp_extension imports setuptools)."""
    from torch.utils.cpp_extension import is_ninja_available as torch_is_ninja_available

    return torch_is_ninja_available()


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
