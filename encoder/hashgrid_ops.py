"""The multiresolution hash encoding's maths (Instant-NGP, with tiny-cuda-nn's exact semantics):
the grid layout, the corner lookups, the kernels of the torch and cpp backends and the autograd
functions that tie them together (`hash_grid_encode`). The HashGrid module (encoder/hashgrid.py)
holds the table and picks the backend.

Level l has the grid scale  s_l = base_resolution * per_level_scale**l - 1  (in float32, as
tcnn computes it: `grid_scale`) and resolution res_l = ceil(s_l) + 1. A point x in [0, 1]^3
sits at  p = s_l * x + 0.5  in grid units; its 8 corners floor(p) + {0,1}^3 are looked up
with trilinear weights. A level whose res_l**3
cells fit in its table is indexed densely (x + y*res + z*res^2); finer levels use the hash
x*1 ^ y*2654435761 ^ z*805459861 (uint32); both modulo the level's table size
min(res_l**3, 2**log2_hashmap_size) rounded up to a multiple of 8. Output is level-major:
[l0 f0, l0 f1, l1 f0, ...].

The torch kernels gather level-major with one `index_select` on flat indices (what makes them
fast on CPU), eagerly or torch.compile'd (`make_kernels`); the cpp kernels
(encoder/csrc/hashgrid_cpu.cpp, built by encoder/hashgrid_cpp.py) recompute each point's corners
instead of materialising them (`make_cpp_kernels`). Both run under the same autograd graph:
`_InterpolateTable` (differentiable in the table), `_SpatialGradient` (d out / d x) and
`_TableJacobianVectorProduct` (its adjoint, which carries the eikonal loss to the table).
"""
import ctypes
import ctypes.util
import math
import struct
from typing import Callable, NamedTuple, Optional, Tuple

import torch

HASH_PRIMES = (1, 2654435761, 805459861)


def _libm_float_function(name: str) -> Optional[Callable[[float], float]]:
    """The C library's float32 function `name` (exp2f, log2f), or None where there is none."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6"), name)
    except (OSError, AttributeError, TypeError):
        return None
    function.restype, function.argtypes = ctypes.c_float, [ctypes.c_float]
    return function


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


_EXP2F, _LOG2F = _libm_float_function("exp2f"), _libm_float_function("log2f")


def grid_scale(level: int, base_resolution: int, per_level_scale: float) -> float:
    """tiny-cuda-nn's  s_l = exp2f(l * log2f(per_level_scale)) * base_resolution - 1  in float32,
    as its host code sizes the tables: with the C library's exp2f / log2f (what tcnn calls), or
    float64 rounded to float32 where they are missing. Float64 maths would put some scales one
    ulp above an integer that tcnn hits exactly (base 16 x 1.5^3 - 1 = 53), and so give that
    level one more cell per side than tcnn."""
    log2_scale = _float32(_LOG2F(per_level_scale) if _LOG2F else math.log2(_float32(per_level_scale)))
    exponent = _float32(level * log2_scale)
    growth = _float32(_EXP2F(exponent) if _EXP2F else 2.0**exponent)
    return _float32(_float32(growth * base_resolution) - 1.0)


def level_layout(
    n_levels: int, base_resolution: int, per_level_scale: float, log2_hashmap_size: int
) -> Tuple[list, list, list, list]:
    """Per level: grid scale, resolution, table size and whether indexing is dense (tcnn)."""
    scales, resolutions, sizes, dense = [], [], [], []
    max_size = 2**log2_hashmap_size
    for level in range(n_levels):
        scale = grid_scale(level, base_resolution, per_level_scale)
        res = math.ceil(scale) + 1
        size = min(res**3, max_size)
        size = (size + 7) // 8 * 8
        scales.append(scale)
        resolutions.append(res)
        sizes.append(size)
        dense.append(res**3 <= size)
    return scales, resolutions, sizes, dense


class GridLevels(NamedTuple):
    """Per-level constants (what `level_layout` gives), as Python numbers: compiled kernels
    fold them into the code, one simple loop body per level."""

    scales: Tuple[float, ...]
    resolutions: Tuple[int, ...]
    sizes: Tuple[int, ...]
    offsets: Tuple[int, ...]  # first row of each level in the flat table
    dense: Tuple[bool, ...]

    @classmethod
    def build(cls, n_levels: int, base_resolution: int, per_level_scale: float, log2_hashmap_size: int):
        scales, resolutions, sizes, dense = level_layout(n_levels, base_resolution, per_level_scale, log2_hashmap_size)
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        return cls(tuple(scales), tuple(resolutions), tuple(sizes), tuple(offsets), tuple(dense))


def _outer3(ax: torch.Tensor, ay: torch.Tensor, az: torch.Tensor, op) -> torch.Tensor:
    """Combine per-axis corner terms [N, 2] into [N, 8]; corner c = 4 bz + 2 by + bx."""
    return op(op(az[:, :, None, None], ay[:, None, :, None]), ax[:, None, None, :]).reshape(-1, 8)


def level_rows(cell: torch.Tensor, resolution: int, size: int, dense: bool) -> torch.Tensor:
    """Table rows (within the level) of the 8 corners of each cell: tcnn's grid_index.

    Dense: x + y res + z res^2; hashed: x*1 ^ y*2654435761 ^ z*805459861 in uint32 (int32
    arithmetic wraps the same way, and the power-of-two modulo keeps only low bits);
    both modulo the level's table size.  cell: [N, 3] int32 lower corners -> [N, 8] int32
    """
    cx, cy, cz = cell.unbind(-1)
    if dense:
        r2 = resolution * resolution
        rows = _outer3(torch.stack([cx, cx + 1], -1), torch.stack([cy, cy + 1], -1) * resolution,
                       torch.stack([cz, cz + 1], -1) * r2, torch.add)
        return torch.remainder(rows, size)
    px, py, pz = HASH_PRIMES
    rows = _outer3(torch.stack([cx, cx + 1], -1) * px, torch.stack([cy, cy + 1], -1) * py,
                   torch.stack([cz, cz + 1], -1) * pz, torch.bitwise_xor)
    return rows & (size - 1)


def corner_rows_and_weights(
    x: torch.Tensor, levels: GridLevels, with_derivative: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Table rows of the 8 corners around each point at every level, trilinear weights, and
    d weights / d x.  p = s_l x + 0.5, frac = p - floor(p):

        w_c = prod_d (b_cd ? frac_d : 1 - frac_d),   dw_c / dx_d = s_l (2 b_cd - 1) prod_{e != d} (...)

    x: [N, 3] -> rows [L, N, 8] int32 (flat table), w [L, N, 8], dw [L, N, 8, 3] (or None)
    """
    rows, weights, dweights = [], [], []
    for scale, resolution, size, offset, dense in zip(*levels):
        pos = x * scale + 0.5  # [N, 3]
        floor = torch.floor(pos)
        frac = pos - floor
        rows.append(level_rows(floor.to(torch.int32), resolution, size, dense) + offset)
        wx, wy, wz = torch.stack([1.0 - frac, frac], dim=-1).unbind(1)  # each [N, 2]
        weights.append(_outer3(wx, wy, wz, torch.mul))
        if with_derivative:
            slope = torch.tensor([-scale, scale], dtype=x.dtype, device=x.device).expand_as(wx)  # [N, 2]
            dweights.append(torch.stack(
                [_outer3(slope, wy, wz, torch.mul), _outer3(wx, slope, wz, torch.mul),
                 _outer3(wx, wy, slope, torch.mul)], dim=-1,
            ))  # [N, 8, 3]
    return torch.stack(rows), torch.stack(weights), torch.stack(dweights) if with_derivative else None


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table: [T, F], rows: [L, N, 8] -> [L, N, 8, F]. Two float32 features are moved as
    one 8-byte word: a 1-d gather is several times faster than a gather of [T, 2] rows."""
    n_features = table.shape[1]
    if n_features == 2 and table.dtype == torch.float32 and table.is_contiguous():
        words = table.view(torch.int64).view(-1).index_select(0, rows.reshape(-1))
        return words.view(torch.float32).view(*rows.shape, 2)
    return table.index_select(0, rows.reshape(-1)).view(*rows.shape, n_features)


def scatter_rows(n_table_rows: int, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Adjoint of `gather_rows`: values [L, N, 8, F] summed at rows into a zero [T, F]."""
    n_features = values.shape[-1]
    out = values.new_zeros(n_table_rows, n_features)
    return out.index_add_(0, rows.reshape(-1), values.reshape(-1, n_features))


def interpolate(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[l, n, f] = sum_c w[l, n, c] table[rows[l, n, c], f] -> [L, N, F]"""
    return (gather_rows(table, rows) * weights[..., None]).sum(2)


def interpolate_backward(n_table_rows: int, rows: torch.Tensor, weights: torch.Tensor, g: torch.Tensor):
    """d table of <interpolate, g>: g [L, N, F] -> [T, F]"""
    return scatter_rows(n_table_rows, rows, weights[..., None] * g[:, :, None, :])


def table_jvp(g: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, dweights: torch.Tensor) -> torch.Tensor:
    """grad_x[n, d] = sum_{l, c, f} g[l, n, f] table[rows[l, n, c], f] dw[l, n, c, d] -> [N, 3]
    (the x-gradient of <interpolate, g>)"""
    per_corner = (gather_rows(table, rows) * g[:, :, None, :]).sum(-1)  # [L, N, 8]
    return (per_corner[..., None] * dweights).sum((0, 2))  # [N, 3]


def table_jvp_backward(
    grad_x_grad: torch.Tensor, g: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, dweights: torch.Tensor
):
    """Adjoints of table_jvp in g and in table: grad_x_grad [N, 3] -> [L, N, F], [T, F]"""
    along = (dweights * grad_x_grad[None, :, None, :]).sum(-1)  # [L, N, 8]
    grad_g = (gather_rows(table, rows) * along[..., None]).sum(2)  # [L, N, F]
    grad_table = scatter_rows(table.shape[0], rows, along[..., None] * g[:, :, None, :])
    return grad_g, grad_table


class Kernels(NamedTuple):
    """The tensor maths of one grid, in five kernels that share an opaque `corners` handle:
    `corners(x, with_derivative)` is computed once per forward and the other four take it.

    torch backend: the handle is `TorchCorners` (rows, weights, dweights materialised as
    [L, N, 8(, 3)]), run eagerly (the reference) or torch.compile'd (fused loops with the level
    constants folded in; several times faster on CPU). cpp backend: the handle is x itself and
    the C++ kernels recompute corners on the fly (`make_cpp_kernels`)."""

    corners: Callable  # x [N, 3], with_derivative -> handle
    interpolate: Callable  # table [T, F], handle -> [L, N, F]
    interpolate_backward: Callable  # n_table_rows, handle, g [L, N, F] -> [T, F]
    table_jvp: Callable  # g [L, N, F], table [T, F], handle -> [N, 3]
    table_jvp_backward: Callable  # grad_grad_x [N, 3], g [L, N, F], table [T, F], handle -> [L, N, F], [T, F]


class TorchCorners(NamedTuple):
    """The torch backend's corners handle (what `corner_rows_and_weights` returns)."""

    rows: torch.Tensor  # [L, N, 8] int32, flat table rows
    weights: torch.Tensor  # [L, N, 8]
    dweights: Optional[torch.Tensor]  # [L, N, 8, 3], or None without the x-derivative


def make_kernels(levels: GridLevels, compile: bool) -> Kernels:
    """The torch backend's kernels: the pure functions above (torch.compile'd when `compile`),
    wrapped to take the `TorchCorners` handle."""

    def corners(x, with_derivative):
        return corner_rows_and_weights(x, levels, with_derivative)

    pure = (corners, interpolate, interpolate_backward, table_jvp, table_jvp_backward)
    if compile:
        # dynamic shapes: the number of samples changes every step and must not recompile
        pure = tuple(torch.compile(fn, dynamic=True) for fn in pure)
    corners_fn, interpolate_fn, interpolate_backward_fn, table_jvp_fn, table_jvp_backward_fn = pure
    return Kernels(
        corners=lambda x, with_derivative: TorchCorners(*corners_fn(x, with_derivative)),
        interpolate=lambda table, c: interpolate_fn(table, c.rows, c.weights),
        interpolate_backward=lambda n_rows, c, g: interpolate_backward_fn(n_rows, c.rows, c.weights, g),
        table_jvp=lambda g, table, c: table_jvp_fn(g, table, c.rows, c.dweights),
        table_jvp_backward=lambda ggx, g, table, c: table_jvp_backward_fn(ggx, g, table, c.rows, c.dweights),
    )


def make_cpp_kernels(levels: GridLevels) -> Kernels:
    """The cpp backend's kernels (encoder/csrc/hashgrid_cpu.cpp): fused C++ loops that take the
    points x [N, 3] (float32, CPU) as the corners handle and recompute each point's corner rows
    and trilinear weights with the same maths as `corner_rows_and_weights`. Scatters run in
    parallel over levels (no atomics): results are deterministic. Raises RuntimeError saying why
    when the extension cannot be built here (start-up checks that first: encoder/hashgrid.py's
    `choose_backend`)."""
    from encoder import hashgrid_cpp

    ext = hashgrid_cpp.extension()
    if ext is None:
        raise RuntimeError(f"the hash grid's C++ kernels are not available: {hashgrid_cpp.build_error()}")
    constants = (list(levels.scales), list(levels.resolutions), list(levels.sizes), list(levels.offsets),
                 list(levels.dense))
    return Kernels(
        corners=lambda x, with_derivative: x.contiguous(),  # [N, 3]
        interpolate=lambda table, x: ext.forward(table.contiguous(), x, *constants),
        interpolate_backward=lambda n_rows, x, g: ext.interpolate_backward(n_rows, x, g, *constants),
        table_jvp=lambda g, table, x: ext.table_jvp(x, g, table.contiguous(), *constants),
        table_jvp_backward=lambda ggx, g, table, x: tuple(
            ext.table_jvp_backward(x, ggx, g, table.contiguous(), *constants)
        ),
    )


class _InterpolateTable(torch.autograd.Function):
    """out[l, n, f] = sum_c w[l, n, c] * table[rows[l, n, c], f]  (differentiable in table)."""

    @staticmethod
    def forward(ctx, table, corners, kernels):
        ctx.corners, ctx.n_table_rows, ctx.kernels = corners, table.shape[0], kernels
        return kernels.interpolate(table, corners)  # [L, N, F]

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: [L, N, F]
        grad_table = ctx.kernels.interpolate_backward(ctx.n_table_rows, ctx.corners, grad_out.contiguous())
        return grad_table, None, None


class _SpatialGradient(torch.autograd.Function):
    """Zero in value; carries d out / d x = sum_c table[rows_c] (x) dw_c to x in backward.

    Splitting the position derivative from the table lookup means the sdf-gradient pass
    (autograd.grad w.r.t. x) never runs the table scatter, and the loss backward (w.r.t.
    parameters) never runs this node. The backward builds `_TableJacobianVectorProduct`,
    which is differentiable in the table, so the eikonal loss reaches the hash table.
    Second derivatives in x are dropped: x is no parameter, nothing needs them (tiny-cuda-nn
    does compute them, so the backends differ only there). The table comes wrapped in a
    tuple so that autograd gives this node no edge to it (else a parameter backward would
    run it for nothing).
    """

    @staticmethod
    def forward(ctx, x, table_ref, corners, kernels, out_shape):
        (table,) = table_ref
        ctx.table, ctx.corners, ctx.kernels = table, corners, kernels
        return x.new_zeros(out_shape)  # [L, N, F]

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: [L, N, F]
        grad_x = _TableJacobianVectorProduct.apply(grad_out.contiguous(), ctx.table, ctx.corners, ctx.kernels)
        return grad_x, None, None, None, None


class _TableJacobianVectorProduct(torch.autograd.Function):
    """grad_x = table_jvp(g, table): linear in g and in table; its backward gives both,
    which is what the eikonal loss needs."""

    @staticmethod
    def forward(ctx, g, table, corners, kernels):
        ctx.save_for_backward(g, table)
        ctx.corners, ctx.kernels = corners, kernels
        return kernels.table_jvp(g, table, corners)  # [N, 3]

    @staticmethod
    def backward(ctx, grad_grad_x):  # [N, 3]
        g, table = ctx.saved_tensors
        grad_g, grad_table = ctx.kernels.table_jvp_backward(grad_grad_x.contiguous(), g, table, ctx.corners)
        return grad_g, grad_table, None, None


def hash_grid_encode(x: torch.Tensor, table: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """Trilinear hash-grid features of x at every level of `kernels`' grid.

    x: [N, 3] in [0, 1]; table: [T, F] -> [N, L * F] level-major. Differentiable in table,
    in x (first order) and in table through d out / d x (for the eikonal loss).
    """
    n_points = x.shape[0]
    needs_dx = x.requires_grad and torch.is_grad_enabled()
    corners = kernels.corners(x.detach(), needs_dx)
    out = _InterpolateTable.apply(table, corners, kernels)  # [L, N, F]
    if needs_dx:
        out = out + _SpatialGradient.apply(x, (table,), corners, kernels, out.shape)
    return out.permute(1, 0, 2).reshape(n_points, out.shape[0] * out.shape[2])  # [N, L * F]
