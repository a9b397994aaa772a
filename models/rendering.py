"""Volume rendering maths as pure functions over PACKED samples.

Samples of all rays live in one flat array sorted by ray: `ray_indices [n_samples]` says
which ray each sample belongs to, `t_starts / t_ends [n_samples]` bound it along the ray.
Empty space costs nothing. These are the plain-torch versions of nerfacc's packed ops and
run on every device and are the reference; `packed_ops("nerfacc")` gives nerfacc's CUDA kernels
for the same two ops (weights from alpha, accumulation), which is what runs on GPU.
"""
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch


def neus_alpha(
    sdf: torch.Tensor,
    cos: torch.Tensor,
    dists: torch.Tensor,
    inv_s: torch.Tensor,
    cos_anneal_ratio: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    """Discrete NeuS opacity of a sample (Wang et al. 2021, eq. 13).

    The sdf at the interval ends is estimated from the midpoint sdf and the slope along the
    ray, iter_cos = -(relu(-cos/2 + 1/2) (1 - r) + relu(-cos) r) (annealed from a
    direction-free slope to the true one as r goes 0 -> 1):
        sdf_prev = sdf - iter_cos * dist / 2,   sdf_next = sdf + iter_cos * dist / 2
        alpha = clip((Phi_s(sdf_prev) - Phi_s(sdf_next) + 1e-5) / (Phi_s(sdf_prev) + 1e-5), 0, 1)
    with Phi_s(x) = sigmoid(inv_s * x). `cos` is d . grad(sdf) (grad unnormalised, as NeuS).
    A head-on ray through a cell is cos = -1, r = 1: the occupancy of the cell.

    sdf, cos, dists: [n_samples]; inv_s: [] or [n_samples] -> alpha [n_samples]
    """
    iter_cos = -(
        torch.relu(-cos * 0.5 + 0.5) * (1.0 - cos_anneal_ratio) + torch.relu(-cos) * cos_anneal_ratio
    )  # [n_samples], <= 0
    sdf_prev = sdf - iter_cos * dists * 0.5
    sdf_next = sdf + iter_cos * dists * 0.5
    cdf_prev = torch.sigmoid(sdf_prev * inv_s)
    cdf_next = torch.sigmoid(sdf_next * inv_s)
    return ((cdf_prev - cdf_next + 1e-5) / (cdf_prev + 1e-5)).clamp(0.0, 1.0)  # [n_samples]


def density_alpha(sigma: torch.Tensor, dists: torch.Tensor) -> torch.Tensor:
    """Opacity of a segment of constant density (NeRF): alpha = 1 - exp(-sigma * dist).

    sigma, dists: [n_samples] -> alpha [n_samples]
    """
    return 1.0 - torch.exp(-sigma * dists)


def segment_starts(ray_indices: torch.Tensor, n_rays: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """First sample index and sample count of every ray.

    ray_indices: [n_samples] sorted -> starts [n_rays], counts [n_rays] (int64)
    """
    counts = torch.bincount(ray_indices, minlength=n_rays)  # [n_rays]
    starts = torch.cumsum(counts, 0) - counts  # [n_rays]
    return starts, counts


def exclusive_transmittance(alphas: torch.Tensor, ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """T_i = prod_{j < i, same ray} (1 - alpha_j), per ray (nerfacc's packed exclusive_prod).

    The samples are laid out in a [n_rays, max_samples_per_ray] table padded with ones, so that
    a plain cumprod gives exact values and gradients (also through alpha = 1).
    alphas, ray_indices: [n_samples] (sorted by ray) -> [n_samples]
    """
    if alphas.numel() == 0:
        return alphas.clone()
    slot, width = padded_slots(ray_indices, n_rays)
    keep = alphas.new_ones(n_rays, width + 1)  # [n_rays, K + 1]
    keep = keep.index_put((ray_indices, slot + 1), 1.0 - alphas)  # column 0 stays 1: exclusive
    trans = torch.cumprod(keep, dim=1)  # [n_rays, K + 1]
    return trans[ray_indices, slot]  # [n_samples]


def exclusive_sum(values: torch.Tensor, ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """S_i = sum_{j < i, same ray} v_j (nerfacc's packed exclusive_sum), exact per ray (no
    global prefix sum whose rounding grows with the batch).
    values: [n_samples, ...], ray_indices: [n_samples] (sorted) -> [n_samples, ...]
    """
    if values.shape[0] == 0:
        return values.clone()
    slot, width = padded_slots(ray_indices, n_rays)
    table = values.new_zeros(n_rays, width + 1, *values.shape[1:])  # [n_rays, K + 1, ...]
    table = table.index_put((ray_indices, slot + 1), values)
    return torch.cumsum(table, dim=1)[ray_indices, slot]  # [n_samples, ...]


def padded_slots(ray_indices: torch.Tensor, n_rays: int) -> Tuple[torch.Tensor, int]:
    """Each sample's position within its ray, and the longest ray's sample count, to lay packed
    samples out in a [n_rays, K] table.  ray_indices: [n_samples] sorted -> slot [n_samples], K"""
    starts, counts = segment_starts(ray_indices, n_rays)
    slot = torch.arange(ray_indices.shape[0], device=ray_indices.device) - starts[ray_indices]  # [n_samples]
    return slot, int(counts.max())


def render_weights_from_alpha(
    alphas: torch.Tensor, ray_indices: torch.Tensor, n_rays: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """w_i = T_i alpha_i (nerfacc's render_weight_from_alpha, packed).

    alphas, ray_indices: [n_samples] -> weights [n_samples], transmittance [n_samples]
    """
    trans = exclusive_transmittance(alphas, ray_indices, n_rays)
    return trans * alphas, trans


def accumulate_along_rays(
    weights: torch.Tensor, ray_indices: torch.Tensor, n_rays: int, values: torch.Tensor = None
) -> torch.Tensor:
    """sum_i w_i v_i per ray (or sum_i w_i when values is None).

    weights, ray_indices: [n_samples]; values: [n_samples, C] -> [n_rays, C] (or [n_rays, 1])
    """
    src = weights[:, None] if values is None else weights[:, None] * values  # [n_samples, C]
    out = torch.zeros(n_rays, src.shape[1], dtype=src.dtype, device=src.device)
    return out.index_add(0, ray_indices, src)  # [n_rays, C]


def visible_samples(
    alphas: torch.Tensor, ray_indices: torch.Tensor, n_rays: int, early_stop_eps: float, alpha_thre: float
) -> torch.Tensor:
    """Samples worth rendering (nerfacc's render_visibility_from_alpha): transmittance
    T_i >= early_stop_eps, and alpha_i >= alpha_thre when alpha_thre > 0 (a zero alpha is kept
    otherwise: its gradient need not be zero). alphas, ray_indices: [n_samples] -> bool [n_samples]
    """
    visible = exclusive_transmittance(alphas, ray_indices, n_rays) >= early_stop_eps  # [n_samples]
    return visible & (alphas >= alpha_thre) if alpha_thre > 0 else visible


def visible_front_to_back(
    candidates: torch.Tensor,
    alpha_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    early_stop_eps: float,
    first_round: int = 4,
) -> torch.Tensor:
    """The candidates with transmittance T_i = prod_{j < i} (1 - alpha_j) >= early_stop_eps (the
    product over the ray's earlier candidates), as visible_samples keeps them, but with alpha
    evaluated only where needed: front to back in rounds of first_round, 2 first_round,
    4 first_round ... candidates per ray, each round only on the rays whose transmittance is still
    >= early_stop_eps. A ray that turns opaque at its first candidates costs first_round
    evaluations instead of all of them (NeRF backgrounds are often opaque right away). The
    products are taken in another order, so only a sample whose T lies within rounding of
    early_stop_eps can be decided differently.

    candidates: bool [n_rays, n] (along each ray in order); alpha_of(ray, k) -> alpha [m] of the
    entries [m] -> bool [n_rays, n]
    """
    n_rays, n = candidates.shape
    rank = torch.cumsum(candidates, dim=1) - 1  # [n_rays, n] order of a candidate on its ray
    trans = torch.ones(n_rays, device=candidates.device)  # [n_rays] T before the round
    visible = torch.zeros_like(candidates)  # [n_rays, n]
    lo, size = 0, first_round
    while lo < n:
        alive = torch.nonzero(trans >= early_stop_eps)[:, 0]  # [n_alive]
        in_round = candidates[alive] & (rank[alive] >= lo) & (rank[alive] < lo + size)  # [n_alive, n]
        row, k = torch.nonzero(in_round, as_tuple=True)  # [m], sorted by ray
        if row.numel() == 0:
            break
        ray = alive[row]  # [m]
        alphas = alpha_of(ray, k)  # [m]
        before = trans[ray] * exclusive_transmittance(alphas, row, alive.numel())  # [m] T_i
        visible[ray, k] = before >= early_stop_eps
        starts, counts = segment_starts(row, alive.numel())  # [n_alive]
        last = (starts + counts - 1)[counts > 0]  # [n] each ray's last candidate of the round
        trans[ray[last]] = before[last] * (1.0 - alphas[last])
        lo, size = lo + size, 2 * size
    return visible


def composite_background(rgb: torch.Tensor, opacity: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """C = C_fg + (1 - opacity) C_bg.  rgb [n_rays, 3], opacity [n_rays, 1], background [n_rays or 1, 3]"""
    return rgb + (1.0 - opacity) * background


def opacity_above_plane(
    weights: torch.Tensor, x: torch.Tensor, ray_indices: torch.Tensor, n_rays: int, plane: torch.Tensor,
    accumulate: Callable[..., torch.Tensor] = accumulate_along_rays,
) -> torch.Tensor:
    """O_r = sum_i w_ri [n . x_ri + d > 0]: a ray's opacity gathered above the plane (n, d).

    weights, ray_indices: [n_samples]; x: [n_samples, 3]; plane: [4] (n unit, d)
    -> [n_rays]"""
    above = (x @ plane[:3] + plane[3] > 0).to(weights.dtype)  # [n_samples]
    return accumulate(weights, ray_indices, n_rays, above[:, None])[:, 0]  # [n_rays]


class PackedOps(NamedTuple):
    """The packed rendering ops a model calls, from one backend, with the signatures above:
    weights_from_alpha(alphas, ray_indices, n_rays) -> weights, transmittance [n_samples];
    accumulate(weights, ray_indices, n_rays, values=None) -> [n_rays, C]."""

    weights_from_alpha: Callable[[torch.Tensor, torch.Tensor, int], Tuple[torch.Tensor, torch.Tensor]]
    accumulate: Callable[..., torch.Tensor]


def _require_cuda(*tensors: torch.Tensor) -> None:
    """nerfacc's packed ops are CUDA kernels: with CPU tensors nerfacc would try to compile them
    (OSError) or refuse; fail here instead, clearly."""
    if not all(t.is_cuda for t in tensors):
        raise ValueError("nerfacc's packed rendering runs on CUDA tensors only; use the torch ops on CPU")


def nerfacc_weights_from_alpha(
    alphas: torch.Tensor, ray_indices: torch.Tensor, n_rays: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`render_weights_from_alpha` by nerfacc's CUDA scan (float32 only). Its backward gives 0
    instead of the true gradient through a factor (1 - alpha) = 0 (alpha exactly 1), where the
    torch version is exact.  alphas, ray_indices: [n_samples] -> weights, transmittance [n_samples]"""
    import nerfacc

    _require_cuda(alphas, ray_indices)
    return nerfacc.render_weight_from_alpha(alphas.float(), ray_indices=ray_indices, n_rays=n_rays)


def nerfacc_accumulate_along_rays(
    weights: torch.Tensor, ray_indices: torch.Tensor, n_rays: int, values: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`accumulate_along_rays` by nerfacc (its argument order differs).
    weights, ray_indices: [n_samples]; values: [n_samples, C] -> [n_rays, C] (or [n_rays, 1])"""
    import nerfacc

    _require_cuda(weights, ray_indices)
    return nerfacc.accumulate_along_rays(weights, values, ray_indices=ray_indices, n_rays=n_rays)


TORCH_OPS = PackedOps(render_weights_from_alpha, accumulate_along_rays)
NERFACC_OPS = PackedOps(nerfacc_weights_from_alpha, nerfacc_accumulate_along_rays)


def packed_ops(backend: str) -> PackedOps:
    """The packed ops of an occupancy backend: nerfacc's kernels with `nerfacc` (CUDA), else torch."""
    return NERFACC_OPS if backend == "nerfacc" else TORCH_OPS
