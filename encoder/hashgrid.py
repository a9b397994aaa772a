"""Multiresolution hash encoding (Instant-NGP) with tiny-cuda-nn's exact semantics.

Level l has the grid scale  s_l = base_resolution * per_level_scale**l - 1  and resolution
res_l = ceil(s_l) + 1. A point x in [0, 1]^3 sits at  p = s_l * x + 0.5  in grid units; its
8 corners floor(p) + {0,1}^3 are looked up with trilinear weights. A level whose res_l**3
cells fit in its table is indexed densely (x + y*res + z*res^2); finer levels use the hash
x*1 ^ y*2654435761 ^ z*805459861 (uint32); both modulo the level's table size
min(res_l**3, 2**log2_hashmap_size) rounded up to a multiple of 8. Parameters start
uniform in [-1e-4, 1e-4]. Output is level-major: [l0 f0, l0 f1, l1 f0, ...].

`backend: torch` is the plain-PyTorch reference (works everywhere; gathers are done
level-major with one `index_select` on flat indices, which is what makes it fast on CPU);
`backend: tcnn` wraps `tinycudann.Encoding` (CUDA only); `auto` takes tcnn only on CUDA
when it imports. On top of either sits the progressive band mask (Neuralangelo /
instant-nsr-pl): only the first `current_level` levels are active; the rest output zeros.
"""
import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from encoder.registry import ENCODINGS
from utils.config import Configurable

log = logging.getLogger(__name__)

HASH_PRIMES = (1, 2654435761, 805459861)


def level_layout(
    n_levels: int, base_resolution: int, per_level_scale: float, log2_hashmap_size: int
) -> Tuple[list, list, list, list]:
    """Per level: grid scale, resolution, table size and whether indexing is dense (tcnn)."""
    scales, resolutions, sizes, dense = [], [], [], []
    max_size = 2**log2_hashmap_size
    for level in range(n_levels):
        scale = base_resolution * 2.0 ** (level * math.log2(per_level_scale)) - 1.0
        res = math.ceil(scale) + 1
        size = min(res**3, max_size)
        size = (size + 7) // 8 * 8
        scales.append(scale)
        resolutions.append(res)
        sizes.append(size)
        dense.append(res**3 <= size)
    return scales, resolutions, sizes, dense


class GridLevels(NamedTuple):
    """The levels to evaluate, each field [L]: what `level_layout` gives, as tensors."""

    scales: torch.Tensor  # float32 grid scale s_l
    resolutions: torch.Tensor  # int64
    sizes: torch.Tensor  # int64 table rows of the level
    offsets: torch.Tensor  # int64 first row of the level in the flat table
    dense: torch.Tensor  # bool; dense levels are the coarse ones, so they come first


def _outer3(ax: torch.Tensor, ay: torch.Tensor, az: torch.Tensor, op) -> torch.Tensor:
    """Combine per-axis corner terms [L, N, 2] into [L, N, 8]; corner c = 4 bz + 2 by + bx."""
    out = op(op(az[:, :, :, None, None], ay[:, :, None, :, None]), ax[:, :, None, None, :])
    return out.reshape(*ax.shape[:2], 8)


def hash_grid_indices(cells: torch.Tensor, levels: GridLevels) -> torch.Tensor:
    """Flat-table row of the 8 corners of each cell: tcnn's grid_index plus the level offset.

    Dense level: x + y res + z res^2; hashed level: x*1 ^ y*2654435761 ^ z*805459861 (uint32);
    both modulo the level's table size.
    cells: [L, N, 3] int64 lower corners -> [L, N, 8] int64
    """
    n_dense = int(levels.dense.sum())
    corner = torch.stack([cells, cells + 1], dim=-1)  # [L, N, 3, 2]
    rows = []
    if n_dense > 0:
        cx, cy, cz = corner[:n_dense].unbind(2)  # each [Ld, N, 2]
        res = levels.resolutions[:n_dense, None, None]  # [Ld, 1, 1]
        index = _outer3(cx, cy * res, cz * res * res, torch.add)  # [Ld, N, 8]
        rows.append(torch.remainder(index, levels.sizes[:n_dense, None, None]))
    if n_dense < cells.shape[0]:
        cx, cy, cz = corner[n_dense:].unbind(2)  # each [Lh, N, 2]
        index = _outer3(cx * HASH_PRIMES[0], cy * HASH_PRIMES[1], cz * HASH_PRIMES[2], torch.bitwise_xor)
        # hashed table sizes are powers of two: the modulo keeps low bits, exact as in uint32
        rows.append(index & (levels.sizes[n_dense:, None, None] - 1))
    return torch.cat(rows) + levels.offsets[:, None, None]


def corner_rows_and_weights(
    x: torch.Tensor, levels: GridLevels, with_derivative: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Table rows of the 8 corners around each point, trilinear weights, d weights / d x.

    w_c = prod_d (b_cd ? frac_d : 1 - frac_d),   dw_c / dx_d = s_l (2 b_cd - 1) prod_{e != d} (...)
    x: [N, 3] -> rows [L, N, 8] int64 (flat table), w [L, N, 8], dw [L, N, 8, 3] (or None)
    """
    pos = x.detach()[None, :, :] * levels.scales[:, None, None] + 0.5  # [L, N, 3]
    pos_floor = torch.floor(pos)
    frac = pos - pos_floor  # [L, N, 3]
    rows = hash_grid_indices(pos_floor.long(), levels)  # [L, N, 8]
    wx, wy, wz = torch.stack([1.0 - frac, frac], dim=-1).unbind(2)  # each [L, N, 2]
    weights = _outer3(wx, wy, wz, torch.mul)  # [L, N, 8]
    if not with_derivative:
        return rows, weights, None
    slope = levels.scales[:, None, None] * torch.tensor([-1.0, 1.0], device=x.device)  # [L, 1, 2]
    slope = slope.expand_as(wx)  # [L, N, 2]
    dweights = torch.stack(
        [
            _outer3(slope, wy, wz, torch.mul),
            _outer3(wx, slope, wz, torch.mul),
            _outer3(wx, wy, slope, torch.mul),
        ],
        dim=-1,
    )  # [L, N, 8, 3]
    return rows, weights, dweights


def _gather(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table: [T, F], rows: [L, N, 8] -> [L, N, 8, F]"""
    return table.index_select(0, rows.reshape(-1)).view(*rows.shape, table.shape[1])


def _scatter(n_table_rows: int, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Gradient of `_gather`: values [L, N, 8, F] summed at rows into a zero [T, F]."""
    n_features = values.shape[-1]
    out = values.new_zeros(n_table_rows, n_features)
    return out.index_add_(0, rows.reshape(-1), values.reshape(-1, n_features))


class _InterpolateTable(torch.autograd.Function):
    """out[l, n, f] = sum_c w[l, n, c] * table[rows[l, n, c], f]  (differentiable in table)."""

    @staticmethod
    def forward(ctx, table, rows, weights):
        ctx.save_for_backward(rows, weights)
        ctx.n_table_rows = table.shape[0]
        feats = _gather(table, rows)  # [L, N, 8, F]
        out = torch.bmm(weights.reshape(-1, 1, 8), feats.reshape(-1, 8, table.shape[1]))  # [L*N, 1, F]
        return out.view(*rows.shape[:2], table.shape[1])  # [L, N, F]

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: [L, N, F]
        rows, weights = ctx.saved_tensors
        grad_table = _scatter(ctx.n_table_rows, rows, weights[..., None] * grad_out[:, :, None, :])
        return grad_table, None, None


class _SpatialGradient(torch.autograd.Function):
    """Zero in value; carries d out / d x = sum_c table[rows_c] (x) dw_c to x in backward.

    Splitting the position derivative from the table lookup means the sdf-gradient pass
    (autograd.grad w.r.t. x) never runs the table scatter, and the loss backward (w.r.t.
    parameters) never runs this node. The backward builds `_TableJacobianVectorProduct`,
    which is differentiable in the table, so the eikonal loss reaches the hash table.
    Second derivatives in x are dropped, as tiny-cuda-nn does. The table comes wrapped in a
    tuple so that autograd gives this node no edge to it (else a parameter backward would
    run it for nothing).
    """

    @staticmethod
    def forward(ctx, x, table_ref, rows, dweights):
        (table,) = table_ref
        ctx.table, ctx.rows, ctx.dweights = table, rows, dweights
        n_levels, n_points = rows.shape[:2]
        return x.new_zeros(n_levels, n_points, table.shape[1])  # [L, N, F]

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: [L, N, F]
        grad_x = _TableJacobianVectorProduct.apply(grad_out, ctx.table, ctx.rows, ctx.dweights)
        return grad_x, None, None, None


class _TableJacobianVectorProduct(torch.autograd.Function):
    """grad_x[n, d] = sum_{l, c, f} g[l, n, f] * table[rows[l, n, c], f] * dw[l, n, c, d].

    Linear in g and in table; its backward gives both, which is what the eikonal loss needs.
    """

    @staticmethod
    def forward(ctx, g, table, rows, dweights):
        feats = _gather(table, rows)  # [L, N, 8, F]
        ctx.save_for_backward(g, feats, rows, dweights)
        ctx.n_table_rows = table.shape[0]
        per_corner = (feats * g[:, :, None, :]).sum(-1)  # [L, N, 8]
        return torch.einsum("lnc,lncd->nd", per_corner, dweights)  # [N, 3]

    @staticmethod
    def backward(ctx, grad_grad_x):  # [N, 3]
        g, feats, rows, dweights = ctx.saved_tensors
        along = torch.einsum("lncd,nd->lnc", dweights, grad_grad_x)  # [L, N, 8]
        grad_g = (feats * along[..., None]).sum(2)  # [L, N, F]
        grad_table = _scatter(ctx.n_table_rows, rows, along[..., None] * g[:, :, None, :])
        return grad_g, grad_table, None, None


def hash_grid_encode(x: torch.Tensor, table: torch.Tensor, levels: GridLevels) -> torch.Tensor:
    """Trilinear hash-grid features of x for the given levels.

    x: [N, 3] in [0, 1]; table: [T, F] -> [N, L * F] level-major. Differentiable in table,
    in x (first order) and in table through d out / d x (for the eikonal loss).
    """
    n_points = x.shape[0]
    needs_dx = x.requires_grad and torch.is_grad_enabled()
    rows, weights, dweights = corner_rows_and_weights(x, levels, with_derivative=needs_dx)
    out = _InterpolateTable.apply(table, rows, weights)  # [L, N, F]
    if needs_dx:
        out = out + _SpatialGradient.apply(x, (table,), rows, dweights)
    return out.permute(1, 0, 2).reshape(n_points, -1)  # [N, L * F]


def tcnn_available() -> bool:
    try:
        import tinycudann  # noqa: F401
    except Exception:  # on a CPU build of torch it raises EnvironmentError, not ImportError
        return False
    return True


def choose_backend(requested: str, device: torch.device) -> str:
    if requested == "torch":
        return "torch"
    if requested == "tcnn":
        if device.type != "cuda" or not tcnn_available():
            raise RuntimeError(
                "hash grid backend 'tcnn' needs a CUDA device and the tinycudann package; "
                "install it with `pip install git+https://github.com/NVlabs/tiny-cuda-nn/"
                "#subdirectory=bindings/torch` or set backend: torch (or auto)"
            )
        return "tcnn"
    if requested == "auto":
        return "tcnn" if device.type == "cuda" and tcnn_available() else "torch"
    raise ValueError(f"hash grid backend must be auto, torch or tcnn, got '{requested}'")


@ENCODINGS.register("HashGrid")
class HashGrid(Configurable, nn.Module):
    @dataclass
    class Config:
        otype: str = "HashGrid"
        n_levels: int = 16
        n_features_per_level: int = 2
        log2_hashmap_size: int = 19
        base_resolution: int = 16
        per_level_scale: float = 1.447269237440378
        backend: str = "auto"  # auto | torch | tcnn
        # progressive band mask: start_level active levels, one more every update_steps after start_step
        start_level: int = 4
        start_step: int = 0
        update_steps: int = 1000

    def __init__(self, config: "HashGrid.Config", in_channels: int = 3, device: str = "cpu"):
        super().__init__()
        if in_channels != 3:
            raise ValueError(f"HashGrid encodes 3-d points, got {in_channels} channels")
        self.config = config
        self.n_levels = config.n_levels
        self.n_features = config.n_features_per_level
        self.n_output_dims = self.n_levels * self.n_features
        self.backend = choose_backend(config.backend, torch.device(device))
        log.info("hash grid backend: %s", self.backend)
        scales, resolutions, sizes, dense = level_layout(
            config.n_levels, config.base_resolution, config.per_level_scale, config.log2_hashmap_size
        )
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
        self.register_buffer("resolutions", torch.tensor(resolutions), persistent=False)
        self.register_buffer("sizes", torch.tensor(sizes), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)
        self.register_buffer("dense", torch.tensor(dense), persistent=False)
        self.register_buffer("current_level", torch.tensor(min(config.start_level, config.n_levels)))
        if self.backend == "tcnn":
            import tinycudann as tcnn

            self.tcnn_encoding = tcnn.Encoding(
                3,
                {
                    "otype": "HashGrid",
                    "n_levels": config.n_levels,
                    "n_features_per_level": config.n_features_per_level,
                    "log2_hashmap_size": config.log2_hashmap_size,
                    "base_resolution": config.base_resolution,
                    "per_level_scale": config.per_level_scale,
                    "interpolation": "Linear",
                },
                dtype=torch.float32,
            )
        else:
            self.table = nn.Parameter(torch.empty(sum(sizes), self.n_features).uniform_(-1e-4, 1e-4))

    def update_step(self, global_step: int) -> None:
        c = self.config
        level = c.start_level + max(global_step - c.start_step, 0) // c.update_steps
        self.current_level.fill_(min(level, self.n_levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3] in [0, 1] -> [N, n_levels * n_features]; inactive levels are zero."""
        active = int(self.current_level)
        if self.backend == "tcnn":
            feats = self.tcnn_encoding(x).float()  # [N, L * F]
            mask = torch.zeros(self.n_levels, self.n_features, device=x.device)
            mask[:active] = 1.0
            return feats * mask.reshape(1, -1)
        levels = GridLevels(
            self.scales[:active],
            self.resolutions[:active],
            self.sizes[:active],
            self.offsets[:active],
            self.dense[:active],
        )
        feats = hash_grid_encode(x, self.table, levels)  # [N, active * F]
        return nn.functional.pad(feats, (0, (self.n_levels - active) * self.n_features))
