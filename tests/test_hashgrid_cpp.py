"""The hash grid's C++ CPU kernels (`backend: cpp`, encoder/csrc/hashgrid_cpu.cpp) against the
eager torch reference: values and gradients (table, x, and the table through d out / d x, as
the eikonal loss needs), dense and hashed levels, points on cell boundaries and on the faces of
the cube, several feature counts and no points at all. Skipped, with the reason, where the
extension cannot be built."""
import pytest
import torch

from encoder import hashgrid_cpp
from encoder.hashgrid import HashGrid
from encoder.hashgrid_ops import GridLevels, hash_grid_encode, make_cpp_kernels, make_kernels

BUILD_ERROR = hashgrid_cpp.build_error()
pytestmark = pytest.mark.skipif(BUILD_ERROR is not None, reason=f"C++ kernels do not build here: {BUILD_ERROR}")

# base 4, scale 2: resolutions 4, 8, 16, 32 with 512-row tables: levels 0-1 dense, 2-3 hashed
LEVELS = GridLevels.build(n_levels=4, base_resolution=4, per_level_scale=2.0, log2_hashmap_size=9)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def assert_close_in_float32(actual, expected, name):
    """Equal up to float32 summation order: terms of size |expected|max (the second-order path
    scales by s_l^2, ~1e3 here) may cancel, so the absolute slack follows the largest value."""
    atol = max(1e-5, 1e-6 * float(expected.detach().abs().max())) if expected.numel() else 1e-5
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=name)


def test_the_test_grid_has_dense_and_hashed_levels():
    assert LEVELS.dense == (True, True, False, False)


def points(n_random: int, seed: int = 0) -> torch.Tensor:
    """Random points, plus the cube's corners and faces and points exactly on cell boundaries
    of every level (p = s_l x + 0.5 an integer).  -> [n, 3]"""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n_random, 3, generator=gen)  # [n_random, 3]
    corners = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.5], [1.0, 0.0, 0.25]])  # [4, 3]
    on_cells = [torch.tensor([[(k - 0.5) / s, (k + 0.5) / s, 0.5 / s]]) for s in LEVELS.scales for k in (1, 2)]
    return torch.cat([x, corners, *on_cells]).clamp(0.0, 1.0).contiguous()  # [n, 3]


def table_of(n_features: int, seed: int = 1) -> torch.Tensor:
    n_rows = LEVELS.offsets[-1] + LEVELS.sizes[-1]
    return torch.randn(n_rows, n_features, generator=torch.Generator().manual_seed(seed))  # [T, F]


def values_and_gradients(kernels, x, table, seed: int = 2):
    """Features, grads of a linear loss on them in table and x, and the grad in table of an
    eikonal-style loss |d <out, v> / dx|^2 plus a loss on out (the second-order path)."""
    x, table = x.clone().requires_grad_(True), table.clone().requires_grad_(True)
    out = hash_grid_encode(x, table, kernels)  # [N, L * F]
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))  # [N, L * F]
    grad_x, grad_table = torch.autograd.grad((out * v).sum(), (x, table), retain_graph=True)
    (dx,) = torch.autograd.grad((out * v).sum(), x, create_graph=True)  # [N, 3]
    (eikonal_grad_table,) = torch.autograd.grad(dx.square().sum() + out.square().sum(), table)
    return out, grad_x, grad_table, dx, eikonal_grad_table


@pytest.mark.parametrize("n_features", [1, 2, 3, 4])
def test_cpp_kernels_match_the_torch_reference(n_features):
    x, table = points(300), table_of(n_features)
    reference = values_and_gradients(make_kernels(LEVELS, compile=False), x, table)
    cpp = values_and_gradients(make_cpp_kernels(LEVELS), x, table)
    names = ("out", "grad_x", "grad_table", "d out / dx", "eikonal grad_table")
    for name, expected, actual in zip(names, reference, cpp):
        assert actual.shape == expected.shape, name
        assert_close_in_float32(actual, expected, name)
    assert reference[4].abs().max() > 1.0  # the eikonal path reaches the table


def test_cpp_kernels_are_deterministic_and_independent_of_the_thread_count():
    x, table = points(2000), table_of(2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = values_and_gradients(make_cpp_kernels(LEVELS), x, table)
        torch.set_num_threads(2)
        two = values_and_gradients(make_cpp_kernels(LEVELS), x, table)
        again = values_and_gradients(make_cpp_kernels(LEVELS), x, table)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, two, again):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_no_points():
    x, table = torch.zeros(0, 3, requires_grad=True), table_of(2).requires_grad_(True)
    out = hash_grid_encode(x, table, make_cpp_kernels(LEVELS))
    assert out.shape == (0, 8)
    (dx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (grad_table,) = torch.autograd.grad(dx.sum() + out.sum(), table, allow_unused=True)
    assert dx.shape == (0, 3) and (grad_table is None or not grad_table.any())


def test_float64_is_refused_with_a_clear_error():
    with pytest.raises(RuntimeError, match="float32 only"):
        hash_grid_encode(points(10).double(), table_of(2).double(), make_cpp_kernels(LEVELS))


def test_a_cpp_grid_matches_a_torch_grid_and_saves_the_same_state():
    sizes = dict(n_levels=4, base_resolution=4, per_level_scale=2.0, log2_hashmap_size=9, start_level=3)
    torch.manual_seed(0)
    torch_grid = HashGrid(HashGrid.Config(backend="torch", **sizes), 3)
    torch.manual_seed(0)
    cpp_grid = HashGrid(HashGrid.Config(backend="cpp", compile=True, **sizes), 3)  # compile: ignored by cpp
    assert cpp_grid.backend == "cpp"
    assert sorted(cpp_grid.state_dict()) == sorted(torch_grid.state_dict()) == ["current_level", "table"]
    torch.testing.assert_close(cpp_grid.table, torch_grid.table, rtol=0, atol=0)
    x = points(100)
    out = cpp_grid(x)  # [N, 8]
    torch.testing.assert_close(out, torch_grid(x), **TOLERANCE)
    assert not out[:, 6:].any()  # the band mask: level 3 inactive


def test_a_second_process_loads_the_built_extension_quickly():
    """Built once per machine: a later process loads the stamped .so directly (no setuptools, no
    ninja run), in milliseconds."""
    import subprocess
    import sys

    code = ("import sys, time, torch; t = time.perf_counter(); from encoder import hashgrid_cpp; "
            "assert hashgrid_cpp.extension() is not None; print(time.perf_counter() - t, 'setuptools' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, imported_setuptools = result.stdout.split()
    assert imported_setuptools == "False"  # the direct path
    assert float(seconds) < 5.0  # ~0.01 s; generous: the machine may be busy
