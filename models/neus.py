"""NeuS: an SDF, a colour field and a learned sharpness, rendered with occupancy-grid sampling."""
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from models.background import BackgroundField, ray_sphere_intersect
from models.network import ColorNetwork, SDFNetwork, VarianceNetwork, normalize
from models.occupancy import OccupancyGrid, alpha_reach, screened_sdf
from models.registry import MODELS
from models.rendering import composite_background, density_alpha, neus_alpha, opacity_above_plane, packed_ops
from utils.config import ConfigError, Configurable
from utils.misc import map_in_chunks

# a whole-grid occupancy update (the warm-up) evaluates the sdf only near the surface, found on a
# lattice of this many cells a side, for a field of at most this Lipschitz constant
SCREEN_RESOLUTION = 32
SCREEN_LIPSCHITZ = 1.5


def cos_anneal_ratio(step: int, steps: int, knots: List[List[float]]) -> float:
    """NeuS's cos-anneal ratio r at a training step: with knots [[step_0, r_0], [step_1, r_1], ...]
    (steps increasing) piecewise linear through them, r_0 before the first and the last r after the
    last; without knots r = min(1, step / steps), and 1 when steps <= 0 (the true cos from the start)."""
    if knots:
        return float(np.interp(step, [k[0] for k in knots], [k[1] for k in knots]))
    return 1.0 if steps <= 0 else min(1.0, step / steps)


def render_step_at(step: int, base: float, knots: List[List[float]]) -> float:
    """The marching step at a training step: with knots [[step_0, size_0], [step_1, size_1], ...]
    (steps increasing) piecewise CONSTANT, size_k from step_k on; `base` before the first knot
    and without knots."""
    size = base
    for knot_step, knot_size in knots:
        if step >= knot_step:
            size = float(knot_size)
    return size


def check_knots(knots: List[List[float]], path: str, value: str, valid: Callable[[float], bool], rule: str) -> None:
    """Raise ConfigError unless knots are [step, value] pairs, steps increasing, each value
    valid(value) (`rule` says what that is in the message)."""
    for i, knot in enumerate(knots):
        if len(knot) != 2 or not valid(knot[1]):
            raise ConfigError(f"{path}[{i}]: expected a [step, {value}] pair with the {value} {rule}, got {list(knot)}")
        if i and knot[0] <= knots[i - 1][0]:
            raise ConfigError(f"{path}: the steps must increase, got {knots[i - 1][0]} then {knot[0]}")


def check_step_knots(knots: List[List[float]], path: str = "model.render_step_knots") -> None:
    """Raise ConfigError unless knots are [step, size] pairs, steps increasing, sizes > 0."""
    check_knots(knots, path, "size", lambda size: size > 0, "> 0")


def check_anneal_knots(knots: List[List[float]], path: str = "model.cos_anneal_knots") -> None:
    """Raise ConfigError unless knots are [step, ratio] pairs, steps increasing, ratios in [0, 1]."""
    check_knots(knots, path, "ratio", lambda ratio: 0.0 <= ratio <= 1.0, "in [0, 1]")


def chunked(fn, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over x [N, ...] in chunks (halved on out-of-memory) -> fn's outputs concatenated"""
    if x.shape[0] == 0:
        return fn(x)
    return torch.cat(map_in_chunks(lambda a, b: fn(x[a:b]), x.shape[0], chunk, "evaluating points")[0])


@MODELS.register("neus")
class NeuSModel(Configurable, nn.Module):
    @dataclass
    class Config:
        name: str = "neus"
        radius: float = 1.0  # the scene (normalised frame) lies in [-radius, radius]^3
        render_step_size: float = 0.0034  # ray-marching step, normalised units
        # or a schedule: [[step, size], ...], piecewise constant, size from that step on (training
        # and every render after it; render_step_size before the first knot)
        render_step_knots: List[List[float]] = field(default_factory=list)
        cos_anneal_steps: int = 0  # steps over which NeuS anneals cos (0: true cos from the start)
        # or a schedule: [[step, ratio], ...], piecewise linear (replaces cos_anneal_steps when given)
        cos_anneal_knots: List[List[float]] = field(default_factory=list)
        occupancy_chunk: int = 65536  # points per SDF evaluation when updating the grid
        geometry: SDFNetwork.Config = field(default_factory=SDFNetwork.Config)
        texture: ColorNetwork.Config = field(default_factory=ColorNetwork.Config)
        variance: VarianceNetwork.Config = field(default_factory=VarianceNetwork.Config)
        sampler: OccupancyGrid.Config = field(default_factory=OccupancyGrid.Config)
        # a NeRF outside the sphere of `radius` for scenes without masks; when enabled the
        # foreground (SDF) is rendered inside that sphere only
        background: BackgroundField.Config = field(default_factory=BackgroundField.Config)

    def __init__(self, config: "NeuSModel.Config"):
        """`config` with its backends resolved (systems/backends.py: with_backends); `auto` left
        in it builds the torch reference."""
        super().__init__()
        check_anneal_knots(config.cos_anneal_knots)
        check_step_knots(config.render_step_knots)
        self.config = config
        self.geometry = SDFNetwork(config.geometry, config.radius)
        self.texture = ColorNetwork(config.texture, config.geometry.feature_dim)
        self.variance = VarianceNetwork(config.variance)
        self.occupancy = OccupancyGrid(config.sampler, config.radius)
        # packed weights and accumulation: nerfacc's kernels where it samples (CUDA), else torch
        self.packed = packed_ops(self.occupancy.backend)
        self.background = BackgroundField(config.background, config.radius) if config.background.enabled else None
        # state of the schedules, saved with the model so that renders after a reload match
        self.register_buffer("cos_anneal_ratio", torch.tensor(1.0))
        self.register_buffer("render_step", torch.tensor(float(config.render_step_size), dtype=torch.float64))
        # (n, d) of a plane n . x + d = 0 in the normalised frame, n = 0 for none: with one, forward
        # also gives the foreground's opacity gathered above it (set_prior_plane)
        self.register_buffer("prior_plane", torch.zeros(4))
        self._register_load_state_dict_pre_hook(self._checkpoint_without_new_buffers)

    def _checkpoint_without_new_buffers(self, state_dict, prefix, *_) -> None:
        """Checkpoints written before render_step_knots were trained at render_step_size throughout;
        those written before prior_plane had none."""
        state_dict.setdefault(prefix + "render_step", torch.tensor(float(self.config.render_step_size),
                                                                   dtype=torch.float64))
        state_dict.setdefault(prefix + "prior_plane", torch.zeros(4))

    def set_prior_plane(self, normal, offset: float) -> None:
        """From now on forward also gives opacity_above_plane: the foreground's opacity gathered
        where normal . x + offset > 0 (normal: [3] unit, normalised frame)."""
        self.prior_plane.copy_(torch.tensor([*normal, offset], dtype=torch.float32))

    @property
    def has_prior_plane(self) -> bool:
        return bool(self.prior_plane[:3].abs().sum() > 0)

    @property
    def step_size(self) -> float:
        """The marching step now (render_step_knots at the last set_step; saved with the model)."""
        return float(self.render_step)

    def parameter_groups(self) -> Dict[str, list]:
        groups = {
            "geometry": list(self.geometry.parameters()),
            "texture": list(self.texture.parameters()),
            "variance": list(self.variance.parameters()),
        }
        if self.background is not None:
            groups["background"] = list(self.background.parameters())
        return groups

    def set_step(self, global_step: int) -> None:
        """Schedules that follow the training step: cos annealing, marching step and hash-grid levels."""
        self.cos_anneal_ratio.fill_(
            cos_anneal_ratio(global_step, self.config.cos_anneal_steps, self.config.cos_anneal_knots))
        self.render_step.fill_(render_step_at(global_step, self.config.render_step_size, self.config.render_step_knots))
        self.geometry.update_step(global_step)
        self.texture.update_step(global_step)
        if self.background is not None:
            self.background.set_step(global_step)

    def update_occupancy(self, global_step: int) -> List[torch.Tensor]:
        """The occupancy grids' periodic EMA updates (training only) -> the tensors they changed."""
        screen = self.occupancy.evaluates_all_cells(global_step)
        changed = self.occupancy.update(global_step, lambda x: self.occupancy_alpha(x, screen))
        if self.background is not None:
            changed += self.background.update_occupancy(global_step)
        return changed

    @torch.no_grad()
    def occupancy_alpha(self, x: torch.Tensor, screen: bool = False) -> torch.Tensor:
        """NeuS alpha of one marching step taken head-on at x, zero deeper inside than
        sampler.shell_width (when set): [N, 3] -> [N].
        screen (a whole-grid update): the sdf is evaluated only where a coarse lattice says the
        alpha may reach the grid's threshold (models/occupancy.py: screened_sdf); the SDF is
        taken to be SCREEN_LIPSCHITZ-Lipschitz (the sphere init is 1-Lipschitz, the eikonal loss
        keeps it near 1)."""
        inv_s, step = self.variance.inv_s(), self.step_size

        def head_on_alpha(sdf: torch.Tensor) -> torch.Tensor:
            return neus_alpha(sdf, torch.full_like(sdf, -1.0), torch.full_like(sdf, step), inv_s)

        def sdf_fn(points: torch.Tensor) -> torch.Tensor:
            return chunked(self.geometry.sdf, points, self.config.occupancy_chunk)

        shell = self.config.sampler.shell_width
        if screen:
            reach = alpha_reach(head_on_alpha, self.config.sampler.occ_threshold, 2.0 * self.config.radius,
                                device=x.device)
            band = (-shell if shell > 0 else -math.inf, reach)
            sdf = screened_sdf(sdf_fn, x, self.occupancy.aabb, SCREEN_RESOLUTION, band, SCREEN_LIPSCHITZ)  # [N]
        else:
            sdf = sdf_fn(x)  # [N]
        alpha = head_on_alpha(sdf)  # [N]
        return alpha * (sdf > -shell) if shell > 0 else alpha

    def mesh_sdf(self, x: torch.Tensor) -> torch.Tensor:
        """The field whose zero level set is exported as the mesh: x [N, 3] -> [N].
        With a background model the foreground ends at the sphere of `radius` (beyond it lies
        background, and the SDF there is never rendered), so the SDF is intersected with that
        sphere: max(sdf, |x| - radius)."""
        sdf = self.geometry.sdf(x)  # [N]
        if self.background is None:
            return sdf
        return torch.maximum(sdf, x.norm(dim=-1) - self.config.radius)

    @torch.no_grad()
    def surface_colors(self, x: torch.Tensor, chunk: int, dirs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Colour of surface points seen head-on (view direction = -normal): x [N, 3] -> [N, 3].
        With occupancy sampling the colour field is not smeared off the surface, so this is
        the colour the renders show (see the seed's note on mesh colours).
        With dirs [N, K, 3] (unit view directions, camera -> point): the colour seen along each
        -> [N, K, 3] (the geometry evaluated once a point)."""

        def colour(packed):
            points = packed[:, :3]
            _, feature, grad = self.geometry.forward_with_grad(points, create_graph=False)
            feature = self.texture.point_features(self.geometry.unit_box(points), feature)
            normal = normalize(grad)
            if dirs is None:
                return self.texture(feature, -normal, normal)
            view = packed[:, 3:].reshape(len(points), -1, 3)  # [n, K, 3]
            k = view.shape[1]
            rgb = self.texture(feature.repeat_interleave(k, 0), view.reshape(-1, 3), normal.repeat_interleave(k, 0))
            return rgb.view(len(points), k, 3)

        packed = x if dirs is None else torch.cat([x, dirs.reshape(len(x), -1).to(x)], dim=1)  # [N, 3 (+ 3K)]
        return chunked(colour, packed, chunk)

    def march(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
              inv_s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The foreground's packed samples: occupied cells, not hidden behind opaque surface (a
        gradient-free head-on alpha at inv_s), inside the sphere when a background lies beyond.
        rays_o, rays_d: [n_rays, 3] -> ray_indices, t_starts, t_ends [n_samples]"""

        def visibility_alpha(t_starts, t_ends, ray_indices):
            x = rays_o[ray_indices] + 0.5 * (t_starts + t_ends)[:, None] * rays_d[ray_indices]  # [m, 3]
            sdf = self.geometry.sdf(x)  # [m]
            return neus_alpha(sdf, torch.full_like(sdf, -1.0), t_ends - t_starts, inv_s)

        t_max = None if self.background is None else ray_sphere_intersect(rays_o, rays_d, self.config.radius)[1]
        return self.occupancy.sample(rays_o, rays_d, self.step_size, stratified=self.training,
                                     alpha_fn=visibility_alpha, t_max=t_max)

    def forward(self, rays_o: torch.Tensor, rays_d: torch.Tensor, background: torch.Tensor) -> Dict[str, Any]:
        """Render rays. rays_o, rays_d: [n_rays, 3] (unit directions, normalised frame);
        background: [n_rays, 3] or [1, 3], the colour behind everything. Returns rgb [n_rays, 3],
        opacity [n_rays] (foreground), depth [n_rays], normal [n_rays, 3], sdf [n_samples],
        sdf_grad [n_samples, 3], n_samples (int), inv_s [], rgb_foreground [n_rays, 3] (over
        black), with a background model background (its colour and packed weights) and with a
        prior plane (set_prior_plane) opacity_above_plane [n_rays]."""
        n_rays = rays_o.shape[0]
        inv_s = self.variance.inv_s()
        with record_function("march"):  # named scopes: scripts/benchmark.py --profile reports them
            ray_indices, t_starts, t_ends = self.march(rays_o, rays_d, inv_s.detach())
        t_mid = 0.5 * (t_starts + t_ends)  # [n_samples]
        dirs = rays_d[ray_indices]  # [n_samples, 3]
        x = rays_o[ray_indices] + t_mid[:, None] * dirs  # [n_samples, 3]
        with record_function("sdf and its gradient"):
            sdf, feature, grad = self.geometry.forward_with_grad(x, create_graph=self.training)
        with record_function("colour network"):
            normal = normalize(grad)  # [n_samples, 3]
            feature = self.texture.point_features(self.geometry.unit_box(x), feature)  # [n_samples, F (+ E)]
            rgb = self.texture(feature, dirs, normal)  # [n_samples, 3]
        with record_function("compositing"):
            # the networks' outputs are float32 (also under autocast): alpha and compositing stay exact
            alpha = neus_alpha(sdf, (dirs * grad).sum(-1), t_ends - t_starts, inv_s, self.cos_anneal_ratio)
            weights, opacity, comp_rgb = self.composite(alpha, ray_indices, n_rays, rgb)
            accumulate = self.packed.accumulate
            out = {
                "rgb_foreground": comp_rgb,
                "opacity": opacity[:, 0],
                "depth": accumulate(weights, ray_indices, n_rays, t_mid[:, None])[:, 0],
                "normal": accumulate(weights, ray_indices, n_rays, normal),
                "sdf": sdf,
                "sdf_grad": grad,
                "n_samples": int(ray_indices.numel()),
                "inv_s": inv_s,
            }
            if self.has_prior_plane:
                out["opacity_above_plane"] = opacity_above_plane(weights, x, ray_indices, n_rays, self.prior_plane,
                                                                 accumulate)
        if self.background is not None:
            with record_function("background"):
                out["background"] = self.render_background(rays_o, rays_d, background)
            background = out["background"]["rgb"]
        out["rgb"] = composite_background(comp_rgb, opacity, background)
        return out

    def composite(
        self, alpha: torch.Tensor, ray_indices: torch.Tensor, n_rays: int, rgb: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed samples' alpha [n_samples] and colour [n_samples, 3] -> weights [n_samples]
        (alpha times transmittance), opacity [n_rays, 1] and colour [n_rays, 3] over black;
        for the foreground and the background alike."""
        weights, _ = self.packed.weights_from_alpha(alpha, ray_indices, n_rays)  # [n_samples]
        opacity = self.packed.accumulate(weights, ray_indices, n_rays)  # [n_rays, 1]
        comp_rgb = self.packed.accumulate(weights, ray_indices, n_rays, rgb)  # [n_rays, 3]
        return weights, opacity, comp_rgb

    def render_background(self, rays_o: torch.Tensor, rays_d: torch.Tensor, fill: torch.Tensor) -> Dict[str, Any]:
        """The background model's colour of each ray beyond the foreground sphere, over `fill`
        where it stays transparent. -> rgb [n_rays, 3], opacity [n_rays], and the packed
        weights [n_samples], ray_indices, s_starts, s_ends (for the distortion loss)."""
        n_rays = rays_o.shape[0]
        samples = self.background.sample(rays_o, rays_d, stratified=self.training)
        ray_indices = samples["ray_indices"]  # [n_samples]
        dirs = rays_d[ray_indices]  # [n_samples, 3]
        x_c = self.background.contracted(rays_o[ray_indices] + samples["t_sample"][:, None] * dirs)  # [n_samples, 3]
        sigma, rgb = self.background(x_c, dirs)  # [n_samples], [n_samples, 3]
        alpha = density_alpha(sigma, samples["t_ends"] - samples["t_starts"])  # [n_samples]
        weights, opacity, comp_rgb = self.composite(alpha, ray_indices, n_rays, rgb)
        return {
            "rgb": composite_background(comp_rgb, opacity, fill),
            "opacity": opacity[:, 0],
            "weights": weights,
            "ray_indices": ray_indices,
            "s_starts": samples["s_starts"],
            "s_ends": samples["s_ends"],
            "n_samples": int(ray_indices.numel()),
        }
