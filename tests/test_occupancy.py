"""Occupancy grid culling on an analytic sphere: sdf(x) = |x| - 0.5 in [-1, 1]^3, 32^3 cells.

The grid is filled with the head-on NeuS alpha of one cell-sized step (2/32) at inv_s 200, as
NeuSModel.occupancy_alpha does. Worked bounds (cell half-diagonal 0.0625 * sqrt(3) / 2 = 0.054):
- alpha(sdf) > 1e-3 (the threshold) iff sdf < ~0.066: outside that, 1 - sigmoid(200 (sdf - 1/32))
  plus the 1e-5 guard is below 1e-3; inside the sphere alpha ~= 1.
- each cell is evaluated at one random point in it, so a cell whose centre has |c| <= 0.5 is
  surely occupied (all its points have sdf < 0.054) and one with |c| >= 0.63 surely empty
  (all its points have sdf > 0.076).
"""
import math

import pytest
import torch

from models.occupancy import OccupancyGrid
from models.rendering import exclusive_transmittance, neus_alpha

RES = 32
INV_S = torch.tensor(200.0)
CELL_STEP = 2.0 / RES


def sphere_sdf(x: torch.Tensor) -> torch.Tensor:
    return x.norm(dim=-1) - 0.5


def sphere_occupancy(x: torch.Tensor) -> torch.Tensor:
    """Head-on NeuS alpha of a step of one cell: x [N, 3] -> [N]"""
    sdf = sphere_sdf(x)
    return neus_alpha(sdf, torch.full_like(sdf, -1.0), torch.full_like(sdf, CELL_STEP), INV_S)


def cell_centres() -> torch.Tensor:
    """[RES, RES, RES, 3] centres, indexed [ix, iy, iz] like the grid's binaries."""
    axis = -1.0 + (torch.arange(RES) + 0.5) * CELL_STEP
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)


@pytest.fixture(scope="module")
def grid():
    torch.manual_seed(0)
    config = OccupancyGrid.Config(resolution=RES, update_every=16, warmup_steps=256, occ_threshold=1e-3,
                                  early_stop_eps=1e-4, backend="torch")
    occupancy = OccupancyGrid(config, radius=1.0)
    occupancy.update(0, sphere_occupancy)  # step 0 < warmup_steps: every cell is evaluated
    return occupancy


def cell_of(points: torch.Tensor) -> torch.Tensor:
    """[N, 3] in [-1, 1]^3 -> integer cell [N, 3]"""
    return ((points + 1.0) / CELL_STEP).floor().long().clamp(0, RES - 1)


def test_grid_holds_the_sphere_and_nothing_far_outside(grid):
    radius = cell_centres().norm(dim=-1)  # [R, R, R]
    binaries = grid.binaries
    assert binaries.shape == (RES, RES, RES)
    assert not binaries[radius > 0.7].any()
    assert not binaries[radius >= 0.63].any()
    assert binaries[radius <= 0.5].all()  # interior and the cells straddling the surface
    assert binaries[(radius > 0.45) & (radius <= 0.5)].numel() > 500  # the surface shell is there
    # occupied volume: a ball a bit bigger than the sphere's 4/3 pi 0.5^3 = 0.524
    volume = binaries.sum().item() * CELL_STEP**3
    assert 0.6 < volume < 4.0 / 3.0 * math.pi * 0.63**3
    # inside cells hold alpha ~ 1, far cells the 1e-5 floor of the formula
    occs = grid.estimator.occs.view(RES, RES, RES)
    assert occs[radius < 0.4].min() > 0.99
    assert occs[radius > 0.8].max() < 1e-4


def test_update_only_every_n_steps_and_ema_decay(grid):
    """update() at a step that is not a multiple of update_every changes nothing; at step 16
    (still warm-up: all cells) an all-zero occupancy decays every cell by ema_decay 0.95."""
    fresh = OccupancyGrid(grid.config, radius=1.0)
    fresh.estimator.load_state_dict(grid.estimator.state_dict())
    before = fresh.estimator.occs.clone()
    fresh.update(5, lambda x: torch.ones(x.shape[0]))
    assert torch.equal(fresh.estimator.occs, before)
    fresh.update(16, lambda x: torch.zeros(x.shape[0]))
    torch.testing.assert_close(fresh.estimator.occs, 0.95 * before)


def rays_at_sphere(n_side: int = 5):
    """Rays from z = -3 along +z at (x, y) within 0.3 of the axis, plus rays from random
    directions at distance 3 aimed at the origin."""
    offsets = torch.linspace(-0.3, 0.3, n_side)
    xy = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).reshape(-1, 2)
    o1 = torch.cat([xy, torch.full((xy.shape[0], 1), -3.0)], dim=-1)
    d1 = torch.tensor([[0.0, 0.0, 1.0]]).expand_as(o1)
    gen = torch.Generator().manual_seed(5)
    dirs = torch.nn.functional.normalize(torch.randn(16, 3, generator=gen), dim=-1)
    return torch.cat([o1, 3.0 * dirs]), torch.cat([d1, -dirs])


def test_samples_of_rays_at_the_sphere_lie_in_the_occupied_band(grid):
    rays_o, rays_d = rays_at_sphere()
    step = 1.0 / 64
    ray_indices, t_starts, t_ends = grid.sample(rays_o, rays_d, step, stratified=False)
    mids = rays_o[ray_indices] + (0.5 * (t_starts + t_ends))[:, None] * rays_d[ray_indices]
    cells = cell_of(mids)
    assert grid.binaries[cells[:, 0], cells[:, 1], cells[:, 2]].all()
    radius = mids.norm(dim=-1)
    assert radius.max() < 0.68  # farthest point of a cell that can be occupied: 0.566 + 0.108
    torch.testing.assert_close(t_ends - t_starts, torch.full_like(t_starts, step))
    counts = torch.bincount(ray_indices, minlength=rays_o.shape[0])
    assert (counts > 0).all()  # every ray is aimed at the sphere
    # the ray through the centre: samples fill its chord, |z| up to 0.5..0.68, no more
    centre = 12  # (x, y) = (0, 0) in the 5 x 5 fan
    assert torch.allclose(rays_o[centre, :2], torch.zeros(2))
    z = mids[ray_indices == centre, 2]
    assert 0.5 <= -z.min() < 0.68 and 0.5 <= z.max() < 0.68
    assert torch.all(torch.diff(z) > 0)
    assert 1.0 / step <= counts[centre] <= 1.36 / step


def test_stratified_samples_stay_in_occupied_cells(grid):
    torch.manual_seed(1)
    rays_o, rays_d = rays_at_sphere()
    ray_indices, t_starts, t_ends = grid.sample(rays_o, rays_d, 1.0 / 64, stratified=True)
    mids = rays_o[ray_indices] + (0.5 * (t_starts + t_ends))[:, None] * rays_d[ray_indices]
    cells = cell_of(mids)
    assert ray_indices.numel() > 500
    assert grid.binaries[cells[:, 0], cells[:, 1], cells[:, 2]].all()


def test_rays_that_miss_the_sphere_get_no_samples(grid):
    """Rays along +z at distance 0.75 and 0.9 from the axis (min |x| > 0.68), and along x at
    y = z = 0.8, never enter an occupied cell."""
    rays_o = torch.tensor([[0.75, 0.0, -3.0], [0.0, -0.9, -3.0], [0.64, 0.64, -3.0], [-3.0, 0.8, 0.8]])
    rays_d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    ray_indices, t_starts, _ = grid.sample(rays_o, rays_d, 1.0 / 64, stratified=False)
    assert ray_indices.numel() == 0 and t_starts.numel() == 0


def test_early_stop_drops_samples_behind_the_surface(grid):
    """With alpha_fn (head-on alpha of the true sdf, inv_s 200, one sample ~0.956 opaque inside)
    the axis ray keeps the samples in front of the surface (z = -0.5, t = 2.5) and at most a
    few behind it: exactly those whose transmittance is above 1e-4."""
    rays_o = torch.tensor([[0.0, 0.0, -3.0]])
    rays_d = torch.tensor([[0.0, 0.0, 1.0]])
    step = 1.0 / 64

    def alpha_fn(t_starts, t_ends, ray_indices):
        x = rays_o[ray_indices] + (0.5 * (t_starts + t_ends))[:, None] * rays_d[ray_indices]
        sdf = sphere_sdf(x)
        return neus_alpha(sdf, torch.full_like(sdf, -1.0), t_ends - t_starts, INV_S)

    all_idx, all_t0, _ = grid.sample(rays_o, rays_d, step, stratified=False)
    idx, t0, t1 = grid.sample(rays_o, rays_d, step, stratified=False, alpha_fn=alpha_fn)
    assert t0.numel() > 0
    assert torch.equal(t0, all_t0[: t0.numel()])  # a prefix of the unculled samples
    t_mid = 0.5 * (t0 + t1)
    assert t_mid[0] > 3.0 - 0.68 and (t_mid < 2.5).sum() >= 1  # samples in front of the surface kept
    assert t_mid.max() < 2.5 + 6 * step  # 0.044^k < 1e-4 needs only a few samples inside
    assert all_t0.numel() > t0.numel() + 50  # most of the chord (1.0 long) was dropped
    # the cut is where transmittance first falls below early_stop_eps
    trans = exclusive_transmittance(alpha_fn(all_t0, all_t0 + step, all_idx), all_idx, 1)
    assert (trans[: t0.numel()] > 1e-4).all() and trans[t0.numel()] <= 1e-4
