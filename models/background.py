"""The background outside the foreground sphere: a NeRF on contracted space (Mip-NeRF 360).

Points with |x| > radius are contracted so that infinity lands on radius 2 (in units of the
foreground radius); a small hash grid + MLP gives density (trunc_exp) and colour there.
Samples run from the ray's far intersection with the foreground sphere to `far_plane`,
uniform in disparity (so spacing grows with distance), and are kept only in cells of an
occupancy grid over the contracted cube [-2, 2]^3 (models/occupancy.py: CellGrid, the foreground's grid class; it
holds and updates it on every device; the marching itself is plain torch and cheap).
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from encoder import encoding_field, get_encoding
from models.network import make_mlp
from models.occupancy import CellGrid
from models.rendering import density_alpha, visible_front_to_back
from utils.config import Configurable


def contract(x: torch.Tensor) -> torch.Tensor:
    """Mip-NeRF 360 contraction (unit radius): x if |x| <= 1, else (2 - 1/|x|) x / |x|.

    Continuous at |x| = 1 with |contract(x)| < 2 everywhere.  x: [N, 3] -> [N, 3]
    """
    norm = x.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # [N, 1]
    return torch.where(norm <= 1.0, x, (2.0 - 1.0 / norm) * x / norm)


def ray_sphere_intersect(
    rays_o: torch.Tensor, rays_d: torch.Tensor, radius: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where rays enter and leave the sphere |x| = radius (unit directions).

    t = -o.d -+ sqrt((o.d)^2 - (|o|^2 - r^2)); rays that miss get t_near = t_far = -o.d (the
    closest approach), t_near clamped to >= 0.  rays_o, rays_d: [n_rays, 3] -> [n_rays], [n_rays]
    """
    b = (rays_o * rays_d).sum(-1)  # [n_rays]
    c = (rays_o * rays_o).sum(-1) - radius**2  # [n_rays]
    half = (b * b - c).clamp(min=0.0).sqrt()  # [n_rays]
    return (-b - half).clamp(min=0.0), (-b + half).clamp(min=0.0)


def disparity_intervals(
    t_start: torch.Tensor, far: float, n_samples: int, stratified: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n_samples intervals from t_start to far, uniform in disparity 1/t.

    With s in [0, 1]: 1/t(s) = (1 - s) / t_start + s / far. Interval k spans s in
    [k/n, (k+1)/n]; its sample sits at the middle in s, or at a uniform random s inside
    it when stratified.  t_start: [n_rays] (> 0)
    -> t_lo, t_hi, t_sample, s_lo: [n_rays, n_samples] (s_hi = s_lo + 1/n)
    """
    n_rays = t_start.shape[0]
    s_lo = torch.arange(n_samples, device=t_start.device, dtype=t_start.dtype) / n_samples  # [n]
    s_lo = s_lo.expand(n_rays, n_samples)  # [n_rays, n]
    u = torch.rand_like(s_lo) if stratified else torch.full_like(s_lo, 0.5)
    inv_start, inv_far = 1.0 / t_start[:, None], 1.0 / far  # [n_rays, 1]

    def t_of(s):
        return 1.0 / ((1.0 - s) * inv_start + s * inv_far)

    return t_of(s_lo), t_of(s_lo + 1.0 / n_samples), t_of(s_lo + u / n_samples), s_lo


class TruncExp(torch.autograd.Function):
    """exp(x) with its gradient taken at min(x, 15): densities can grow large, their
    gradients do not overflow (instant-ngp's trunc_exp)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return TruncExp.apply(x)


def _rename_estimator_keys(state_dict, prefix, *_):
    """background.estimator.* (older checkpoints) -> background.grid.estimator.*"""
    for key in [k for k in state_dict if k.startswith(prefix + "estimator.")]:
        state_dict[prefix + "grid." + key[len(prefix):]] = state_dict.pop(key)


class BackgroundField(Configurable, nn.Module):
    """Density and colour of the contracted background, with its own sampler."""

    @dataclass
    class Config:
        enabled: bool = False
        xyz_encoding: Any = encoding_field(
            {
                "otype": "HashGrid", "n_levels": 8, "log2_hashmap_size": 16, "base_resolution": 16,
                "per_level_scale": 1.5, "start_level": 8,
            }
        )
        dir_encoding: Any = encoding_field({"otype": "SphericalHarmonics", "degree": 4})
        n_neurons: int = 64
        feature_dim: int = 15
        color_hidden_layers: int = 2
        density_bias: float = -1.0  # raw density offset: starts nearly empty
        n_samples: int = 64  # intervals per ray before the grid and visibility drop some
        far_plane: float = 1000.0  # in foreground radii
        grid_resolution: int = 64  # occupancy grid over the contracted cube [-2, 2]^3
        update_every: int = 16
        ema_decay: float = 0.95
        warmup_steps: int = 256
        occ_threshold: float = 0.01
        early_stop_eps: float = 1e-4  # skip samples behind the background's own opaque surfaces

    def __init__(self, config: "BackgroundField.Config", radius: float):
        super().__init__()
        self.config = config
        self.radius = radius
        self.encoding = get_encoding(config.xyz_encoding, 3)
        self.density_mlp = make_mlp(
            [self.encoding.n_output_dims, config.n_neurons, 1 + config.feature_dim], nn.ReLU(inplace=True), False
        )
        self.dir_encoding = get_encoding(config.dir_encoding, 3)
        dims = [config.feature_dim + self.dir_encoding.n_output_dims]
        dims += [config.n_neurons] * config.color_hidden_layers + [3]
        self.color_mlp = make_mlp(dims, nn.ReLU(inplace=True), False, output_activation=nn.Sigmoid())
        self.grid = CellGrid([-2.0] * 3 + [2.0] * 3, config.grid_resolution, config.update_every, config.ema_decay,
                             config.warmup_steps, config.occ_threshold)
        # checkpoints written before the grid was a CellGrid hold background.estimator.*
        self._register_load_state_dict_pre_hook(_rename_estimator_keys)

    def set_step(self, global_step: int) -> None:
        if hasattr(self.encoding, "update_step"):
            self.encoding.update_step(global_step)

    def contracted(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised-frame points -> contracted coordinates in (-2, 2)^3.  [N, 3] -> [N, 3]"""
        return contract(x / self.radius)

    def density(self, x_c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x_c: [N, 3] contracted -> sigma [N] (per unit length of the normalised frame), feature [N, F]"""
        # float32 before the exp: under float16 autocast exp would overflow above 11
        h = self.density_mlp(self.encoding((x_c + 2.0) * 0.25)).float()  # [N, 1 + F]
        return trunc_exp(h[:, 0] + self.config.density_bias), h[:, 1:]

    def forward(self, x_c: torch.Tensor, dirs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x_c: [N, 3] contracted, dirs: [N, 3] unit -> sigma [N], rgb [N, 3] in (0, 1)"""
        sigma, feature = self.density(x_c)
        rgb = self.color_mlp(torch.cat([feature, self.dir_encoding(dirs)], dim=-1)).float()  # [N, 3]
        return sigma, rgb

    def update_occupancy(self, step: int) -> List[torch.Tensor]:
        """occ(cell) = 1 - exp(-sigma dt), dt the length of one sampling interval there:
        with n samples uniform in disparity from ~radius to infinity, dt ~ t^2 / (n radius),
        and t = radius / (2 - |x_c|) at contracted radius |x_c|."""
        c = self.config

        @torch.no_grad()
        def occupancy(x_c):  # [N, 3] -> [N]
            r_c = x_c.norm(dim=-1).clamp(min=1.0, max=1.999)  # [N]
            dt = self.radius / (c.n_samples * (2.0 - r_c) ** 2)  # [N]
            return density_alpha(self.density(x_c)[0], dt)

        return self.grid.update(step, occupancy)

    @torch.no_grad()
    def sample(self, rays_o: torch.Tensor, rays_d: torch.Tensor, stratified: bool) -> Dict[str, torch.Tensor]:
        """Packed background samples of the rays, beyond the foreground sphere, in occupied
        cells and not hidden behind opaque background. rays_o, rays_d: [n_rays, 3] ->
        ray_indices [n_samples] (sorted), t_starts, t_ends, t_sample (where the field is
        evaluated), s_starts, s_ends (the intervals in normalised disparity, for distortion)."""
        c = self.config
        _, t_exit = ray_sphere_intersect(rays_o, rays_d, self.radius)  # [n_rays]
        t_lo, t_hi, t_sample, s_lo = disparity_intervals(t_exit.clamp(min=1e-3), c.far_plane * self.radius,
                                                          c.n_samples, stratified)  # [n_rays, n]
        x_c = self.contracted(rays_o[:, None, :] + t_sample[..., None] * rays_d[:, None, :])  # [n_rays, n, 3]
        keep = self.grid.occupied(x_c)  # [n_rays, n]
        if c.early_stop_eps > 0:  # not behind the background's own opaque surfaces

            def alpha_of(ray, k):  # [m], [m] -> [m]
                return density_alpha(self.density(x_c[ray, k])[0], t_hi[ray, k] - t_lo[ray, k])

            keep = visible_front_to_back(keep, alpha_of, c.early_stop_eps)
        ray_indices, k = torch.nonzero(keep, as_tuple=True)  # sorted by ray
        samples = {
            "ray_indices": ray_indices,
            "t_starts": t_lo[ray_indices, k],
            "t_ends": t_hi[ray_indices, k],
            "t_sample": t_sample[ray_indices, k],
            "s_starts": s_lo[ray_indices, k],
        }
        samples["s_ends"] = samples["s_starts"] + 1.0 / c.n_samples
        return samples
