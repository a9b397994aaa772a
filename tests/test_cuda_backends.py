"""The CUDA backends against the torch reference (the choice of backends: test_backend_choice.py;
mixed precision: test_mixed_precision.py).

On CUDA (skipped elsewhere, and for tcnn also where tinycudann does not import) in float32:
- tcnn's HashGrid against the torch HashGrid with the torch table copied into tcnn's flat
  parameters: values, d/dx, d/dparams and the second-order d/dparams of <d out / dx, u> (what
  the eikonal loss backpropagates);
- nerfacc's OccGridEstimator.sampling against the torch march_rays on a fixed grid: the same
  kept samples (with and without early stopping);
- nerfacc's packed render_weight_from_alpha / accumulate_along_rays against models/rendering.py:
  values and gradients.
Each comparison is a harness function. On CPU the same harness runs the torch code against an
independent slow reference, so that the harness itself cannot break unnoticed where no GPU is.
"""
import dataclasses

import pytest
import torch

from encoder.hashgrid import HashGrid, tcnn_import_error, tcnn_params_from_table
from models.occupancy import OccupancyGrid, march_rays, nerfacc_cuda_error, ray_aabb_intersect
from models.rendering import NERFACC_OPS, TORCH_OPS, PackedOps, neus_alpha
from tests.test_encoders import reference_encode, reference_layout

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA not available")
needs_nerfacc = pytest.mark.skipif(
    not CUDA or nerfacc_cuda_error() is not None,
    reason="CUDA not available" if not CUDA else f"nerfacc's CUDA code cannot run here ({nerfacc_cuda_error()})",
)
needs_tcnn = pytest.mark.skipif(
    not CUDA or tcnn_import_error() is not None,
    reason="CUDA not available" if not CUDA else f"tinycudann not importable ({tcnn_import_error()})",
)


def assert_same(a: dict, b: dict, rtol: float, rel_atol: float) -> None:
    """Every tensor of a equals b's within rtol, and an absolute rel_atol of b's largest magnitude."""
    assert a.keys() == b.keys()
    for key in a:
        scale = float(b[key].abs().max()) if b[key].numel() else 0.0
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=rel_atol * scale + 1e-30, msg=key)


# --- harness: hash grid ---------------------------------------------------------------------------
def hash_grid_results(encode, params: torch.Tensor, x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> dict:
    """encode(x) -> [N, L F], differentiable in the leaf `params`. -> value, d<out, v>/dx,
    d<out, v>/dparams, and d<d<out, v>/dx, u>/dparams (the eikonal loss's path to the table)."""
    x = x.clone().requires_grad_(True)
    out = encode(x)
    (grad_x,) = torch.autograd.grad((out * v).sum(), x, create_graph=True)
    (grad_params,) = torch.autograd.grad((out * v).sum(), params, retain_graph=True)
    (grad_params_eikonal,) = torch.autograd.grad((grad_x * u).sum(), params)
    return {"value": out.detach(), "grad_x": grad_x.detach(), "grad_params": grad_params,
            "grad_params_eikonal": grad_params_eikonal}


def full_band_config(**sizes) -> HashGrid.Config:
    """A torch-backend hash grid with every level active (no band mask in the way)."""
    return HashGrid.Config(backend="torch", start_level=sizes["n_levels"], **sizes)


def test_hash_grid_harness_torch_against_the_per_point_reference():
    """The torch module against test_encoders' per-point loop, with the loop's table passed as
    tcnn's flat parameter vector (tcnn_params_from_table), in float64."""
    sizes = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=9, base_resolution=3, per_level_scale=2.0)
    grid = HashGrid(full_band_config(**sizes), 3).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        grid.table.copy_(torch.randn(grid.table.shape, generator=gen, dtype=torch.float64))
    flat = tcnn_params_from_table(grid.table.detach(), grid.table.numel()).clone().requires_grad_(True)
    layout = reference_layout(**{k: sizes[k] for k in ("n_levels", "base_resolution", "per_level_scale",
                                                        "log2_hashmap_size")})
    x = torch.rand(24, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(24, 8, generator=gen, dtype=torch.float64)
    u = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    ours = hash_grid_results(grid, grid.table, x, v, u)
    reference = hash_grid_results(lambda p: reference_encode(p, flat.view(-1, 2), layout), flat, x, v, u)
    for key in ("grad_params", "grad_params_eikonal"):
        reference[key] = reference[key].view(-1, 2)  # tcnn's flat layout back to table rows
    assert_same(ours, reference, rtol=1e-10, rel_atol=1e-12)
    assert ours["grad_params_eikonal"].abs().max() > 0.1


def test_tcnn_flat_parameters_are_the_table_row_major():
    """Level l, entry e, feature f sits at (offset_l + e) F + f; a size mismatch is refused."""
    grid = HashGrid(full_band_config(n_levels=3, n_features_per_level=2, log2_hashmap_size=9,
                                     base_resolution=3, per_level_scale=2.0), 3)
    table = torch.arange(grid.table.numel(), dtype=torch.float32).view(grid.table.shape)
    flat = tcnn_params_from_table(table, table.numel())
    offset, entry, feature = grid.levels.offsets[2], 5, 1
    assert flat[(offset + entry) * 2 + feature] == table[offset + entry, feature]
    with pytest.raises(ValueError, match="lays levels out differently"):
        tcnn_params_from_table(table, table.numel() + 8)


def points_away_from_cell_faces(levels, n: int, gen: torch.Generator, margin: float = 1e-3) -> torch.Tensor:
    """n points in [0, 1]^3 whose grid position s_l x + 0.5 is at least `margin` from a cell face at
    every level: the x-gradient jumps across faces, and the backends round positions differently."""
    x = torch.rand(4 * n, 3, generator=gen, dtype=torch.float64)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    for scale in levels.scales:
        frac = torch.frac(x * scale + 0.5)
        keep &= ((frac > margin) & (frac < 1.0 - margin)).all(-1)
    return x[keep][:n].float()


@needs_tcnn
def test_tcnn_hash_grid_matches_torch():
    """Tolerance: tcnn's kernels form p = s x + 0.5 with the GPU's fast-math exp2f for s and one
    fused multiply-add, torch with the host's float32 s (grid_scale) and two roundings: p differs by
    a couple of ulp (~5e-5 at the finest resolution, 216), i.e. trilinear weights by ~1e-4 relative; tcnn's
    backward sums by float32 atomics in another order. So 1e-4 relative (of each tensor's largest
    magnitude), at points kept 1e-3 away from cell faces."""
    # 1.45, not 1.5: 16 x 1.5^l - 1 is an integer (23, 35) at dense levels, and one ulp more from the
    # GPU's fast-math exp2f would give tcnn's kernels another resolution than its host's tables
    sizes = dict(n_levels=8, n_features_per_level=2, log2_hashmap_size=14, base_resolution=16, per_level_scale=1.45)
    torch_grid = HashGrid(full_band_config(**sizes), 3).cuda()
    tcnn_grid = HashGrid(dataclasses.replace(full_band_config(**sizes), backend="tcnn"), 3).cuda()
    assert tcnn_grid.backend == "tcnn" and not all(torch_grid.levels.dense)
    gen = torch.Generator().manual_seed(0)
    table = 0.5 * torch.randn(torch_grid.table.shape, generator=gen)
    params = tcnn_grid.tcnn_encoding.params
    with torch.no_grad():
        torch_grid.table.copy_(table)
        params.copy_(tcnn_params_from_table(table, params.numel()))
    x = points_away_from_cell_faces(torch_grid.levels, 4000, gen).cuda()
    v = torch.randn(x.shape[0], 16, generator=gen).cuda()
    u = torch.randn(x.shape[0], 3, generator=gen).cuda()
    ours = hash_grid_results(tcnn_grid, params, x, v, u)
    for key in ("grad_params", "grad_params_eikonal"):
        ours[key] = ours[key].view(-1, 2)
    reference = hash_grid_results(torch_grid, torch_grid.table, x, v, u)
    assert ours["value"].dtype == torch.float32
    assert_same(ours, reference, rtol=1e-4, rel_atol=1e-4)


# --- harness: occupancy sampling --------------------------------------------------------------
RES = 16
AABB = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)


def shell_binaries(device) -> torch.Tensor:
    """[16, 16, 16] cells whose centre lies 0.3..0.7 from the origin; the border cells stay empty,
    so no kept sample reaches the box's faces (where the two backends cut a last sample differently)."""
    axis = -1.0 + (torch.arange(RES) + 0.5) * (2.0 / RES)
    centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).norm(dim=-1)
    return ((centres > 0.3) & (centres < 0.7)).to(device)


def exact_rays(device):
    """Rays along +z, -x and +y through cell centres from 3 away: entry at t = 2, and with a step
    of 1/32 every t and midpoint is exact in float32 and off every cell face."""
    centres = -1.0 + (torch.arange(RES, dtype=torch.float32) + 0.5) * (2.0 / RES)
    a, b = torch.meshgrid(centres[::3], centres[1::3], indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    three = torch.full_like(a, 3.0)
    origins = torch.cat([torch.stack([a, b, -three], -1), torch.stack([three, a, b], -1), torch.stack([a, -three, b], -1)])
    dirs = torch.cat([torch.tensor([[0.0, 0.0, 1.0]]).expand(a.shape[0], 3), torch.tensor([[-1.0, 0.0, 0.0]]).expand(
        a.shape[0], 3), torch.tensor([[0.0, 1.0, 0.0]]).expand(a.shape[0], 3)])
    return origins.to(device), dirs.contiguous().to(device)


def oblique_rays(device, n: int = 256):
    gen = torch.Generator().manual_seed(4)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    target = 0.3 * (torch.rand(n, 3, generator=gen) - 0.5)
    return (target - 3.0 * dirs).to(device), dirs.to(device)


def step_samples(samples, rays_o, rays_d, step: float) -> dict:
    """(ray_indices, t_starts, t_ends) -> {(ray, k): t_start} with k the marching step index,
    t_start = t_near + k step: samples are named by integers, whatever the float drift."""
    ray_indices, t_starts, t_ends = (s.double().cpu() for s in samples)
    torch.testing.assert_close(t_ends - t_starts, torch.full_like(t_starts, step), rtol=0, atol=1e-5)
    t_near, _, _ = ray_aabb_intersect(rays_o.double().cpu(), rays_d.double().cpu(), torch.tensor(AABB, dtype=torch.float64))
    k = torch.round((t_starts - t_near[ray_indices.long()]) / step).long()
    return {(int(r), int(i)): float(t) for r, i, t in zip(ray_indices.long(), k, t_starts)}


def assert_same_samples(a, b, rays_o, rays_d, step: float, face_tol: float = 0.0) -> None:
    """The same (ray, step) samples at the same t (1e-5). With face_tol > 0 a sample that only one
    side keeps must have its midpoint within face_tol (in cells) of a cell face: there rounding of
    the ray's position decides the cell."""
    sa, sb = step_samples(a, rays_o, rays_d, step), step_samples(b, rays_o, rays_d, step)
    common = sa.keys() & sb.keys()
    for key in common:
        assert abs(sa[key] - sb[key]) < 1e-5, key
    only = [(key, side[key]) for side in (sa, sb) for key in side.keys() - common]
    for (ray, _), t_start in only:
        mid = rays_o[ray].double().cpu() + (t_start + 0.5 * step) * rays_d[ray].double().cpu()
        cells = (mid + 1.0) * (RES / 2.0)
        distance = (cells - torch.round(cells)).abs().min().item()
        assert distance < face_tol, (ray, t_start, distance)
    assert len(only) <= 0.01 * max(len(common), 1)


def naive_march(rays_o, rays_d, binaries, step: float):
    """One ray at a time, nerfacc's rule: from the box entry, steps of `step`; keep those whose
    midpoint (before the box exit) lies in an occupied cell. float64."""
    aabb = torch.tensor(AABB, dtype=torch.float64)
    t_near, t_far, _ = ray_aabb_intersect(rays_o.double(), rays_d.double(), aabb)
    kept = []
    for ray in range(rays_o.shape[0]):
        k = 0
        while t_near[ray] + (k + 0.5) * step < t_far[ray]:
            t = float(t_near[ray]) + k * step
            mid = rays_o[ray].double() + (t + 0.5 * step) * rays_d[ray].double()
            cell = ((mid + 1.0) * (RES / 2.0)).floor().long()
            if ((cell >= 0) & (cell < RES)).all() and binaries[cell[0], cell[1], cell[2]]:
                kept.append((ray, t, t + step))
            k += 1
    ray_indices, t_starts, t_ends = (torch.tensor(c) for c in zip(*kept))
    return ray_indices, t_starts, t_ends


def test_sampling_harness_torch_against_the_naive_march():
    binaries = shell_binaries("cpu")
    aabb = torch.tensor(AABB)
    for rays_o, rays_d, step, face_tol in ((*exact_rays("cpu"), 1.0 / 32, 0.0), (*oblique_rays("cpu", 64), 1.0 / 64, 1e-4)):
        t_near, t_far, _ = ray_aabb_intersect(rays_o, rays_d, aabb)
        ours = march_rays(rays_o, rays_d, t_near, t_far, binaries, aabb, step)
        reference = naive_march(rays_o, rays_d, binaries, step)
        assert ours[0].numel() > 100
        assert_same_samples(ours, reference, rays_o, rays_d, step, face_tol)


def fixed_grids(device):
    """A torch-backend and a nerfacc-backend sampler holding the same binaries."""
    grids = []
    for backend in ("torch", "nerfacc"):
        config = OccupancyGrid.Config(resolution=RES, early_stop_eps=1e-4, alpha_threshold=0.0, backend=backend)
        grid = OccupancyGrid(config, radius=1.0).to(device)
        grid.estimator.binaries[0] = shell_binaries(device)
        grids.append(grid)
    return grids


@needs_nerfacc
def test_nerfacc_sampling_matches_march_rays():
    torch_grid, nerfacc_grid = fixed_grids("cuda")
    assert nerfacc_grid.backend == "nerfacc"
    for rays_o, rays_d, step, face_tol in ((*exact_rays("cuda"), 1.0 / 32, 0.0), (*oblique_rays("cuda"), 1.0 / 64, 1e-4)):
        ours = nerfacc_grid.sample(rays_o, rays_d, step, stratified=False)
        reference = torch_grid.sample(rays_o, rays_d, step, stratified=False)
        assert reference[0].numel() > 100 and ours[0].dtype == torch.int64
        assert_same_samples(ours, reference, rays_o, rays_d, step, face_tol)


@needs_nerfacc
def test_nerfacc_early_stop_keeps_the_same_samples():
    """With a sphere's head-on NeuS alpha both backends cut each ray where its transmittance falls
    below early_stop_eps; only a sample whose transmittance lies within 1% of it may differ
    (float32 products in another order)."""
    torch_grid, nerfacc_grid = fixed_grids("cuda")
    rays_o, rays_d = exact_rays("cuda")
    step = 1.0 / 32

    def alpha_fn(t_starts, t_ends, ray_indices):
        x = rays_o[ray_indices] + (0.5 * (t_starts + t_ends))[:, None] * rays_d[ray_indices]
        sdf = x.norm(dim=-1) - 0.5
        return neus_alpha(sdf, torch.full_like(sdf, -1.0), t_ends - t_starts, torch.tensor(64.0, device="cuda"))

    ours = nerfacc_grid.sample(rays_o, rays_d, step, stratified=False, alpha_fn=alpha_fn)
    reference = torch_grid.sample(rays_o, rays_d, step, stratified=False, alpha_fn=alpha_fn)
    everything = torch_grid.sample(rays_o, rays_d, step, stratified=False)
    assert everything[0].numel() > reference[0].numel() + 50  # the cut drops samples
    sa, sb = (step_samples(s, rays_o, rays_d, step) for s in (ours, reference))
    differ = sa.keys() ^ sb.keys()
    if differ:
        _, trans = TORCH_OPS.weights_from_alpha(alpha_fn(everything[1], everything[2], everything[0]), everything[0],
                                                rays_o.shape[0])
        all_keys = list(step_samples(everything, rays_o, rays_d, step))
        for key in differ:
            t = float(trans[all_keys.index(key)])
            assert abs(t - 1e-4) < 1e-6, (key, t)


# --- harness: packed rendering ---------------------------------------------------------------
def packed_rendering_results(ops: PackedOps, alphas, values, ray_indices, n_rays: int, coeffs) -> dict:
    """Weights, transmittance, opacity and colour by `ops`, and the gradients of a fixed linear
    mix of them in alphas and values."""
    alphas, values = alphas.clone().requires_grad_(True), values.clone().requires_grad_(True)
    weights, trans = ops.weights_from_alpha(alphas, ray_indices, n_rays)
    opacity = ops.accumulate(weights, ray_indices, n_rays)  # [n_rays, 1]
    rgb = ops.accumulate(weights, ray_indices, n_rays, values)  # [n_rays, 3]
    mix = (weights * coeffs).sum() + (trans * coeffs.flip(0)).sum() + (opacity[:, 0] * torch.arange(
        n_rays, device=alphas.device)).sum() + (rgb * rgb).sum()
    grad_alphas, grad_values = torch.autograd.grad(mix, (alphas, values))
    return {"weights": weights.detach(), "trans": trans.detach(), "opacity": opacity.detach(), "rgb": rgb.detach(),
            "grad_alphas": grad_alphas, "grad_values": grad_values}


def naive_weights_from_alpha(alphas, ray_indices, n_rays):
    """Per ray: T = exclusive product of (1 - alpha) by a loop, w = T alpha."""
    trans = []
    for ray in range(n_rays):
        t = alphas.new_ones(())
        for a in alphas[ray_indices == ray]:
            trans.append(t)
            t = t * (1.0 - a)
    trans = torch.stack(trans) if trans else alphas[:0]
    return trans * alphas, trans


def naive_accumulate(weights, ray_indices, n_rays, values=None):
    src = weights[:, None] if values is None else weights[:, None] * values
    return torch.stack([src[ray_indices == ray].sum(0) for ray in range(n_rays)])


def packed_case(device, dtype, max_alpha: float = 0.9):
    """Six rays: 0, 1, 3, 40 and 200 samples (and one more empty), alphas uniform in [0, max_alpha]."""
    gen = torch.Generator().manual_seed(2)
    counts = torch.tensor([3, 0, 1, 40, 200, 0])
    ray_indices = torch.repeat_interleave(torch.arange(6), counts)
    n = int(counts.sum())
    alphas = max_alpha * torch.rand(n, generator=gen, dtype=dtype)
    values = torch.rand(n, 3, generator=gen, dtype=dtype)
    coeffs = torch.randn(n, generator=gen, dtype=dtype)
    return alphas.to(device), values.to(device), ray_indices.to(device), 6, coeffs.to(device)


def test_rendering_harness_torch_against_the_naive_loops():
    case = packed_case("cpu", torch.float64)
    ours = packed_rendering_results(TORCH_OPS, *case)
    reference = packed_rendering_results(PackedOps(naive_weights_from_alpha, naive_accumulate), *case)
    assert_same(ours, reference, rtol=1e-10, rel_atol=1e-12)


@needs_nerfacc
def test_nerfacc_packed_rendering_matches_torch():
    """float32 (nerfacc's scans are float32 only). Tolerance: the 200-sample ray's products are
    formed in another order by nerfacc's parallel scan, ~n eps = 1e-5 relative."""
    case = packed_case("cuda", torch.float32)
    ours = packed_rendering_results(NERFACC_OPS, *case)
    reference = packed_rendering_results(TORCH_OPS, *case)
    assert_same(ours, reference, rtol=1e-4, rel_atol=1e-5)


@needs_nerfacc
def test_nerfacc_packed_rendering_values_with_an_opaque_sample():
    """alpha = 1 exactly: the values agree; nerfacc's gradient through (1 - alpha) = 0 is 0 instead
    of the true one (a documented nerfacc limitation), so only the torch gradient is exact there."""
    alphas, values, ray_indices, n_rays, coeffs = packed_case("cuda", torch.float32)
    alphas[10] = 1.0
    for key in ("weights", "trans"):
        ours = NERFACC_OPS.weights_from_alpha(alphas, ray_indices, n_rays)[("weights", "trans").index(key)]
        reference = TORCH_OPS.weights_from_alpha(alphas, ray_indices, n_rays)[("weights", "trans").index(key)]
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


def test_nerfacc_ops_refuse_cpu_tensors():
    """Never nerfacc's CUDA kernels with CPU tensors (it would try to compile, or refuse)."""
    alphas, values, ray_indices, n_rays, _ = packed_case("cpu", torch.float32)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        NERFACC_OPS.weights_from_alpha(alphas, ray_indices, n_rays)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        NERFACC_OPS.accumulate(alphas, ray_indices, n_rays, values)
