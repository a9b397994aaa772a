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


def test_alpha_reach_of_the_head_on_alpha():
    """Head-on alpha at inv_s 200, step 1/16: for sdf d > step/2 it is ~ 2 sinh(200/32) e^(-200 d)
    = 518 e^(-200 d), below 1e-3 beyond d = ln(518000) / 200 = 0.0658."""
    def alpha(sdf):
        return neus_alpha(sdf, torch.full_like(sdf, -1.0), torch.full_like(sdf, CELL_STEP), INV_S)

    from models.occupancy import alpha_reach

    assert alpha_reach(alpha, 1e-3, 2.0) == pytest.approx(0.0658, abs=1e-3)
    assert alpha_reach(alpha, 2.0, 2.0) == 0.0  # alpha never reaches 2
    assert alpha_reach(lambda d: torch.ones_like(d), 0.5, 2.0) == 2.0  # never falls


def test_screened_sdf_evaluates_only_near_the_band():
    """Sphere |x| - 0.5 on a 4^3 lattice over [-1, 1]^3 (h = 0.5, margin L h sqrt(3) / 2 = 0.433 at
    L = 1), band (-0.1, 0.1): a point in the corner cell (centre (0.75, 0.75, 0.75), sdf 0.799 >
    0.533) keeps the coarse value; a point in the cell of centre (0.25, 0.25, 0.25) (sdf -0.067)
    is evaluated."""
    from models.occupancy import screened_sdf

    calls = []

    def sdf_fn(x):
        calls.append(len(x))
        return sphere_sdf(x)

    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    x = torch.tensor([[0.9, 0.9, 0.9], [0.3, 0.2, 0.1]])
    sdf = screened_sdf(sdf_fn, x, aabb, 4, (-0.1, 0.1), 1.0)
    assert calls == [64, 1]  # the lattice, then the one near point
    torch.testing.assert_close(sdf, torch.tensor([0.75 * math.sqrt(3) - 0.5, math.sqrt(0.14) - 0.5]))


def test_screened_warm_up_update_gives_the_dense_grid(monkeypatch):
    """A model at its sphere init: the whole-grid update with screening marks exactly the cells the
    dense evaluation marks (same random points), with fewer sdf evaluations (a 32^3 grid screened
    on a 16^3 lattice here, to be quick)."""
    import models.neus
    from models.neus import NeuSModel
    from systems.config import load_config

    config = load_config("confs/neus-dtu-wmask-cpu.yaml", [
        "dataset.root_dir=unused", "model.geometry.xyz_encoding.compile=false", "model.sampler.resolution=32",
        "model.geometry.xyz_encoding.n_levels=6", "model.geometry.xyz_encoding.log2_hashmap_size=14",
    ]).model
    monkeypatch.setattr(models.neus, "SCREEN_RESOLUTION", 16)
    torch.manual_seed(0)
    model = NeuSModel(config)
    dense, screened = [], []
    evaluated = []
    sdf = model.geometry.sdf
    model.geometry.sdf = lambda x: evaluated.append(len(x)) or sdf(x)
    for screen, out in ((False, dense), (True, screened)):
        evaluated.clear()
        torch.manual_seed(1)
        model.occupancy.estimator.occs.zero_()
        model.occupancy.update(0, lambda x: model.occupancy_alpha(x, screen))
        out.extend([model.occupancy.binaries.clone(), sum(evaluated)])
    assert model.occupancy.evaluates_all_cells(0) and not model.occupancy.evaluates_all_cells(16)
    assert 0.05 < dense[0].float().mean() < 0.5  # a shell around the init sphere
    assert torch.equal(dense[0], screened[0])
    # the init shell holds a quarter of the cells (inv_s 20 is soft), the screen evaluates about half
    assert dense[1] == 32 ** 3 and screened[1] < 0.7 * dense[1]


def test_occupied_box_of_the_sphere_grid(grid):
    """Occupied cells reach |c| < 0.63 (above): the box is the cells' outer faces, a whole number of
    cells (1/16) from -0.625..-0.5625 to 0.5625..0.625 on each axis."""
    box = grid.occupied_box()
    assert box.shape == (6,)
    torch.testing.assert_close(box * 16, (box * 16).round())  # on cell faces
    assert (box[:3] >= -0.625).all() and (box[:3] <= -0.5625).all()
    assert (box[3:] >= 0.5625).all() and (box[3:] <= 0.625).all()
    empty = OccupancyGrid(grid.config, radius=1.0)
    rays_o, rays_d = rays_at_sphere()
    assert empty.sample(rays_o, rays_d, 1.0 / 64, stratified=False)[0].numel() == 0


def test_clipping_to_the_occupied_box_keeps_the_same_samples(grid):
    """march_rays over the whole aabb and over the box-clipped span keep the same samples (same
    lattice t_near + k step, stratified offsets included), from a shorter span; a ray that misses
    the box gets none."""
    from models.occupancy import clip_to_box, march_rays, ray_aabb_intersect

    torch.manual_seed(3)
    rays_o, rays_d = rays_at_sphere()
    rays_o = torch.cat([rays_o, torch.tensor([[0.9, 0.9, -3.0]])])  # misses the box
    rays_d = torch.cat([rays_d, torch.tensor([[0.0, 0.0, 1.0]])])
    step = 1.0 / 64
    t_near, t_far, _ = ray_aabb_intersect(rays_o, rays_d, grid.aabb)
    t_near = t_near + torch.rand_like(t_near) * step
    full = march_rays(rays_o, rays_d, t_near, t_far, grid.binaries, grid.aabb, step)
    c_near, c_far = clip_to_box(rays_o, rays_d, t_near, t_far, grid.occupied_box(), step)
    clipped = march_rays(rays_o, rays_d, c_near, c_far, grid.binaries, grid.aabb, step)
    assert full[0].numel() > 500
    torch.testing.assert_close(clipped[0], full[0])
    torch.testing.assert_close(clipped[1], full[1])
    assert (c_far - c_near).max() < 0.65 * (t_far - t_near).max()  # 1.6 (box 1.25 wide) vs 2.8 (cube)
    assert c_far[-1] <= c_near[-1]


def dense_march(rays_o, rays_d, t_near, t_far, binaries, aabb, step):
    """The reference: every ray marched to the longest span ([n_rays, K] lattice), then filtered."""
    from models.occupancy import occupied_at

    n_steps = int(torch.ceil((t_far - t_near).clamp(min=0.0).max() / step))
    t_starts = t_near[:, None] + step * torch.arange(n_steps)  # [n_rays, K]
    t_mid = t_starts + 0.5 * step
    x = rays_o[:, None, :] + t_mid[..., None] * rays_d[:, None, :]  # [n_rays, K, 3]
    keep = (t_mid < t_far[:, None]) & occupied_at(x, binaries, aabb)
    ray_indices, k = torch.nonzero(keep, as_tuple=True)
    return ray_indices, t_starts[ray_indices, k]


def test_packed_march_matches_the_dense_lattice():
    """Random rays through a random 16^3 grid (30% occupied), spans of all lengths (some empty):
    the packed march keeps exactly the dense lattice's samples, in the same order."""
    from models.occupancy import march_rays, ray_aabb_intersect

    gen = torch.Generator().manual_seed(7)
    binaries = torch.rand(16, 16, 16, generator=gen) < 0.3
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    rays_o = 3.0 * torch.nn.functional.normalize(torch.randn(64, 3, generator=gen), dim=-1)
    rays_d = torch.nn.functional.normalize(0.6 * torch.randn(64, 3, generator=gen) - rays_o, dim=-1)
    t_near, t_far, _ = ray_aabb_intersect(rays_o, rays_d, aabb)
    t_near = t_near + 0.02 * torch.rand(64, generator=gen)
    ray_indices, t_starts, t_ends = march_rays(rays_o, rays_d, t_near, t_far, binaries, aabb, 0.05)
    ref_indices, ref_starts = dense_march(rays_o, rays_d, t_near, t_far, binaries, aabb, 0.05)
    assert ref_indices.numel() > 300 and (t_far <= t_near).any()  # some rays miss the box
    assert torch.equal(ray_indices, ref_indices)
    torch.testing.assert_close(t_starts, ref_starts, rtol=0, atol=1e-6)
    torch.testing.assert_close(t_ends - t_starts, torch.full_like(t_starts, 0.05))
