import itertools
import math
import struct

import pytest
import torch

from encoder.frequency import Frequency, frequency_encoding
from encoder.hashgrid import HashGrid
from encoder.hashgrid_ops import GridLevels, hash_grid_encode, level_layout, make_kernels
from encoder.spherical import SphericalHarmonics, spherical_harmonics

# --- hash grid: a slow, obviously-correct reference ----------------------------------------

PRIMES = (1, 2654435761, 805459861)


def f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def reference_layout(n_levels, base_resolution, per_level_scale, log2_hashmap_size):
    """Per level (scale, resolution, table size, dense), written straight from tcnn's rules:
    s = exp2f(l * log2f(pls)) * base - 1, every operation rounded to float32."""
    levels = []
    for level in range(n_levels):
        growth = f32(2.0 ** f32(level * f32(math.log2(f32(per_level_scale)))))
        scale = f32(f32(growth * base_resolution) - 1.0)
        res = math.ceil(scale) + 1
        size = min(res**3, 2**log2_hashmap_size)
        size = ((size + 7) // 8) * 8
        levels.append((scale, res, size, res**3 <= size))
    return levels


def reference_encode(x, table, layout):
    """Per point, per level, per corner: trilinear interpolation of table rows.

    x: [N, 3] float64 (may require grad); table: [T, F] -> [N, L * F] level-major.
    Differentiable in x and table by plain autograd (so second derivatives are exact)."""
    outputs = []
    for n in range(x.shape[0]):
        per_level = []
        offset = 0
        for scale, res, size, dense in layout:
            pos = x[n] * scale + 0.5
            lower = [int(math.floor(p)) for p in pos.detach().tolist()]
            frac = pos - torch.tensor(lower, dtype=x.dtype)
            value = torch.zeros(table.shape[1], dtype=table.dtype)
            for bits in itertools.product((0, 1), repeat=3):  # (bx, by, bz)
                c = [lower[d] + bits[d] for d in range(3)]
                if dense:
                    index = c[0] + c[1] * res + c[2] * res * res
                else:
                    index = ((c[0] * PRIMES[0]) ^ (c[1] * PRIMES[1]) ^ (c[2] * PRIMES[2])) & 0xFFFFFFFF
                index %= size
                weight = 1.0
                for d in range(3):
                    weight = weight * (frac[d] if bits[d] else 1.0 - frac[d])
                value = value + weight * table[offset + index]
            per_level.append(value)
            offset += size
        outputs.append(torch.cat(per_level))
    return torch.stack(outputs)


def eager_kernels(n_levels, base_resolution, per_level_scale, log2_hashmap_size, compile=False):
    return make_kernels(GridLevels.build(n_levels, base_resolution, per_level_scale, log2_hashmap_size), compile)


# base 3, x2 per level, 2^9 rows: level 0 is 3^3 = 27 cells in a 32-row table (dense, and the
# corner index up to 39 wraps modulo 32), level 1 is 6^3 = 216 dense, levels 2 and 3 hashed.
SMALL = dict(n_levels=4, base_resolution=3, per_level_scale=2.0, log2_hashmap_size=9)


@pytest.fixture
def small_grid():
    torch.manual_seed(0)
    layout = reference_layout(**SMALL)
    assert [d for *_, d in layout] == [True, True, False, False]  # both kinds of level
    n_rows = sum(size for _, _, size, _ in layout)
    assert n_rows == 32 + 216 + 512 + 512
    table = torch.randn(n_rows, 2, dtype=torch.float64)
    x = torch.rand(40, 3, dtype=torch.float64)
    # corners of the unit cube and points exactly on grid vertices of level 0 (pos integer)
    x = torch.cat([x, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.25, 0.75, 1.0], [1.0, 0.0, 0.5]],
                                   dtype=torch.float64)])
    return layout, eager_kernels(**SMALL), table, x


def test_level_layout_hand_worked_power_of_two():
    """base 16, scale 2, 3 levels, 2^12 rows: 16^3 = 4096 fits densely, 32^3 and 64^3 are hashed."""
    scales, resolutions, sizes, dense = level_layout(3, 16, 2.0, 12)
    assert scales == pytest.approx([15.0, 31.0, 63.0])
    assert resolutions == [16, 32, 64]
    assert sizes == [4096, 4096, 4096]
    assert dense == [True, False, False]


def test_level_layout_hand_worked_fractional_scale():
    """base 5, scale 1.5: s = 4, 6.5, 10.25 -> res 5, 8 (ceil 6.5 + 1), 12; 125 rows round up to 128."""
    scales, resolutions, sizes, dense = level_layout(3, 5, 1.5, 19)
    assert scales == pytest.approx([4.0, 6.5, 10.25])
    assert resolutions == [5, 8, 12]
    assert sizes == [128, 512, 1728]
    assert dense == [True, True, True]


def test_level_layout_hand_worked_exact_integer_scale():
    """base 16, scale 1.5: s = 15, 23, 35, 53 exactly in float32 (16 x 1.5^3 - 1), so res 54 and a
    dense 54^3 = 157464-row level, as tcnn sizes it; float64 maths gives 53.00000000000001 -> 55."""
    scales, resolutions, sizes, dense = level_layout(4, 16, 1.5, 19)
    assert scales == [15.0, 23.0, 35.0, 53.0]
    assert resolutions == [16, 24, 36, 54]
    assert sizes == [4096, 13824, 46656, 157464]
    assert dense == [True, True, True, True]


@pytest.mark.parametrize("args", [(16, 32, 1.3195079107728942, 19), (16, 16, 1.5, 19), (16, 16, 1.447269237440378, 19),
                                  (12, 16, 1.4587, 17), (10, 16, 1.5, 16)])
def test_level_layout_agrees_with_the_reference_rules(args):
    scales, resolutions, sizes, dense = level_layout(*args)
    assert [(s, r, z, d) for s, r, z, d in zip(scales, resolutions, sizes, dense)] == reference_layout(*args)


def test_level_layout_matches_reference_rules():
    """The module's layout agrees with the reference for a GPU-sized config."""
    args = (16, 32, 1.3195079107728942, 19)
    scales, resolutions, sizes, dense = level_layout(*args)
    reference = reference_layout(*args)
    assert scales == pytest.approx([s for s, *_ in reference], rel=1e-12)
    assert resolutions == [r for _, r, _, _ in reference]
    assert sizes == [s for _, _, s, _ in reference]
    assert dense == [d for *_, d in reference]
    # float32: s_5 = 127.00002 (not 127), so res 129; likewise 513 and 2049 at levels 10 and 15
    assert resolutions[:6] == [32, 43, 56, 74, 98, 129] and resolutions[-1] == 2049
    assert dense.count(True) == 4  # 32^3, 43^3, 56^3, 74^3 <= 2^19 < 98^3
    assert sizes[1] == 79512  # 43^3 = 79507 rounded up to a multiple of 8


def test_hash_grid_values_match_reference(small_grid):
    layout, kernels, table, x = small_grid
    torch.testing.assert_close(hash_grid_encode(x, table, kernels), reference_encode(x, table, layout))


def test_hash_grid_first_derivatives_match_reference(small_grid):
    """d/dx (positions) and d/dtable of <out, v> agree with autograd through the reference."""
    layout, kernels, table, x = small_grid
    v = torch.randn(x.shape[0], 8, dtype=torch.float64)
    x1, t1 = x.clone().requires_grad_(), table.clone().requires_grad_()
    x2, t2 = x.clone().requires_grad_(), table.clone().requires_grad_()
    gx1, gt1 = torch.autograd.grad((hash_grid_encode(x1, t1, kernels) * v).sum(), (x1, t1))
    gx2, gt2 = torch.autograd.grad((reference_encode(x2, t2, layout) * v).sum(), (x2, t2))
    torch.testing.assert_close(gx1, gx2)
    torch.testing.assert_close(gt1, gt2)
    assert gx1.abs().max() > 1.0  # the position gradient is not trivially zero


def test_hash_grid_second_order_table_gradient_matches_reference(small_grid):
    """d/dtable and d/dv of <d<out, v>/dx, u>: the term the eikonal loss backpropagates
    (v plays the MLP's d sdf / d features, which also needs its gradient)."""
    layout, kernels, table, x = small_grid
    u = torch.randn(x.shape[0], 3, dtype=torch.float64)
    v0 = torch.randn(x.shape[0], 8, dtype=torch.float64)
    results = []
    for encode in (lambda xx, tt: hash_grid_encode(xx, tt, kernels), lambda xx, tt: reference_encode(xx, tt, layout)):
        xx, tt, v = x.clone().requires_grad_(), table.clone().requires_grad_(), v0.clone().requires_grad_()
        (gx,) = torch.autograd.grad((encode(xx, tt) * v).sum(), xx, create_graph=True)
        results.append(torch.autograd.grad((gx * u).sum(), (tt, v)))
    (gt_impl, gv_impl), (gt_ref, gv_ref) = results
    torch.testing.assert_close(gt_impl, gt_ref)
    torch.testing.assert_close(gv_impl, gv_ref)
    assert gt_impl.abs().max() > 0.1


def test_hash_grid_table_gradient_spreads_unit_weight(small_grid):
    """Trilinear weights sum to 1: d(sum out)/dtable summed over rows is N per level and feature."""
    layout, kernels, table, x = small_grid
    t = table.clone().requires_grad_()
    out = hash_grid_encode(x, t, kernels)
    (gt,) = torch.autograd.grad(out.sum(), t)
    # each point puts total weight 1 per level and feature: sum over rows = N per column per level
    torch.testing.assert_close(gt.sum(0), torch.full((2,), 4.0 * x.shape[0], dtype=torch.float64))


def make_hashgrid(**overrides) -> HashGrid:
    config = HashGrid.Config(
        n_levels=4, n_features_per_level=2, log2_hashmap_size=9, base_resolution=3, per_level_scale=2.0,
        backend="torch", start_level=2, start_step=10, update_steps=5,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return HashGrid(config, 3)


def test_band_mask_schedule():
    """current_level = start_level + max(step - start_step, 0) // update_steps, capped at n_levels."""
    grid = make_hashgrid()
    assert int(grid.current_level) == 2  # start_level before any update
    expected = {0: 2, 9: 2, 10: 2, 14: 2, 15: 3, 19: 3, 20: 4, 24: 4, 1000: 4}
    for step, level in expected.items():
        grid.update_step(step)
        assert int(grid.current_level) == level, step
    assert int(make_hashgrid(start_level=9).current_level) == 4  # capped at n_levels from the start


def test_band_mask_zeroes_inactive_levels_and_their_gradients():
    """Levels >= current_level output exactly 0 and send no gradient to their table rows;
    active levels equal the full encoding."""
    torch.manual_seed(1)
    grid = make_hashgrid()
    with torch.no_grad():
        grid.table.normal_()
    x = torch.rand(64, 3)
    full = hash_grid_encode(x, grid.table.detach(), eager_kernels(**SMALL))  # [64, 8], all 4 levels
    grid.update_step(15)  # 3 active levels
    out = grid(x)
    assert out.shape == (64, 8)
    assert torch.equal(out[:, 6:], torch.zeros(64, 2))
    torch.testing.assert_close(out[:, :6], full[:, :6])
    out.sum().backward()
    assert torch.equal(grid.table.grad[32 + 216 + 512 :], torch.zeros(512, 2))  # level 3 rows
    assert grid.table.grad[: 32 + 216 + 512].abs().sum() > 0


def test_hashgrid_module_table_and_buffers():
    """Table rows = sum of level sizes, init in [-1e-4, 1e-4]; only current_level is persistent."""
    grid = make_hashgrid()
    assert grid.table.shape == (1272, 2)
    assert grid.table.abs().max() <= 1e-4
    assert grid.levels.offsets == (0, 32, 248, 760)
    assert set(grid.state_dict()) == {"table", "current_level"}


# --- spherical harmonics --------------------------------------------------------------------


def test_spherical_harmonics_are_orthonormal():
    """4 pi * mean over uniform directions of Y_i Y_j ~= identity (degree 4: 16 functions)."""
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(400_000, 3, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    Y = spherical_harmonics(dirs, 4)  # [N, 16]
    gram = 4.0 * math.pi * (Y.T @ Y) / dirs.shape[0]
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=0.02, rtol=0)


def test_spherical_harmonics_hand_values():
    """Y_0 = 1 / (2 sqrt(pi)); at d = +z: Y_2 = sqrt(3 / 4pi), Y_6 = 0.946175 - 0.315392,
    Y_12 = 0.373176 * 2; every x- or y-odd term vanishes. At d = +x: Y_3 = -sqrt(3 / 4pi)."""
    up = spherical_harmonics(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64), 4)[0]
    expected = torch.zeros(16, dtype=torch.float64)
    expected[0] = 0.28209479177387814
    expected[2] = 0.48860251190291987
    expected[6] = 0.63078313050504
    expected[12] = 0.7463526651802308
    torch.testing.assert_close(up, expected)
    assert 0.28209479177387814 == pytest.approx(1.0 / (2.0 * math.sqrt(math.pi)))
    assert 0.48860251190291987 == pytest.approx(math.sqrt(3.0 / (4.0 * math.pi)))
    right = spherical_harmonics(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), 2)[0]
    torch.testing.assert_close(right, torch.tensor([0.28209479, 0.0, 0.0, -0.48860251], dtype=torch.float64))


def test_spherical_harmonics_degrees_and_module():
    dirs = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    for degree in (1, 2, 3, 4):
        assert spherical_harmonics(dirs, degree).shape == (5, degree**2)
    torch.testing.assert_close(spherical_harmonics(dirs, 3), spherical_harmonics(dirs, 4)[:, :9])
    module = SphericalHarmonics(SphericalHarmonics.Config(degree=3), 3)
    assert module.n_output_dims == 9 and module(dirs).shape == (5, 9)
    with pytest.raises(ValueError, match="1..4"):
        spherical_harmonics(dirs, 5)


# --- frequency encoding ------------------------------------------------------------------


def test_frequency_encoding_hand_values():
    """x = 0.25, 2 frequencies: [x, sin(pi/4), cos(pi/4), sin(pi/2), cos(pi/2)]."""
    out = frequency_encoding(torch.tensor([[0.25]], dtype=torch.float64), 2, include_input=True)
    r = math.sqrt(0.5)
    torch.testing.assert_close(out, torch.tensor([[0.25, r, r, 1.0, 0.0]], dtype=torch.float64))


def test_frequency_encoding_channel_order():
    """Two channels (0.25, 0.5), one frequency: [sin(pi/4), sin(pi/2), cos(pi/4), cos(pi/2)]
    (all channels' sines, then cosines, per frequency)."""
    x = torch.tensor([[0.25, 0.5]], dtype=torch.float64)
    r = math.sqrt(0.5)
    torch.testing.assert_close(frequency_encoding(x, 1, include_input=False),
                               torch.tensor([[r, 1.0, r, 0.0]], dtype=torch.float64))
    # frequency 2^1 pi: sin(pi/2), sin(pi), cos(pi/2), cos(pi)
    torch.testing.assert_close(frequency_encoding(x, 2, include_input=False)[:, 4:],
                               torch.tensor([[1.0, 0.0, 0.0, -1.0]], dtype=torch.float64))


def test_frequency_module_output_width():
    module = Frequency(Frequency.Config(n_frequencies=3, include_input=True), 3)
    assert module.n_output_dims == 21
    assert module(torch.rand(4, 3)).shape == (4, 21)
    module = Frequency(Frequency.Config(n_frequencies=2, include_input=False), 3)
    assert module.n_output_dims == 12 and module(torch.rand(4, 3)).shape == (4, 12)


def test_compiled_kernels_match_eager_values_and_gradients(small_grid):
    """The torch.compile'd kernels (the fast CPU path) against the eager reference: values,
    first derivatives in x and table, and the second-order table term, in float32 with a
    float32 table of 2 features (the gather moves them as one 8-byte word)."""
    _, _, table64, x64 = small_grid
    table0, x0 = table64.float()[:, :2].contiguous(), x64.float()
    u = torch.randn(x0.shape[0], 3)
    v = torch.randn(x0.shape[0], 8)
    results = []
    for compile in (False, True):
        kernels = eager_kernels(**SMALL, compile=compile)
        x, table = x0.clone().requires_grad_(), table0.clone().requires_grad_()
        out = hash_grid_encode(x, table, kernels)
        (gx,) = torch.autograd.grad((out * v).sum(), x, create_graph=True)
        (gt,) = torch.autograd.grad((out * v).sum() + (gx * u).sum(), table)
        results.append((out.detach(), gx.detach(), gt))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_hash_grid_of_no_points_is_empty(small_grid):
    """A chunk without samples (a view of empty space) encodes to [0, L * F], with and without grad."""
    _, kernels, table, _ = small_grid
    x = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    assert hash_grid_encode(x, table, kernels).shape == (0, 8)
    with torch.no_grad():
        assert hash_grid_encode(x, table, kernels).shape == (0, 8)
