import math

import pytest
import torch

from models.occupancy import march_rays, ray_aabb_intersect
from models.rendering import (
    accumulate_along_rays,
    composite_background,
    exclusive_transmittance,
    neus_alpha,
    render_weights_from_alpha,
    segment_starts,
    visible_front_to_back,
    visible_samples,
)

# Three rays, packed: ray 0 has alphas [0.5, 0.5, 0.5], ray 1 is empty, ray 2 has [0.2, 1.0, 0.3].
RAY_INDICES = torch.tensor([0, 0, 0, 2, 2, 2])
ALPHAS = torch.tensor([0.5, 0.5, 0.5, 0.2, 1.0, 0.3], dtype=torch.float64)
# sample colours: ray 0 red, green, blue; ray 2 blue, red, green
COLOURS = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float64
)


def naive_weights(alphas, ray_indices, n_rays):
    """Per ray: T = exclusive cumprod of (1 - alpha) with torch.cumprod, w = T alpha."""
    weights = []
    for ray in range(n_rays):
        a = alphas[ray_indices == ray]
        trans = torch.cumprod(torch.cat([a.new_ones(1), 1.0 - a[:-1]]), 0)[: a.shape[0]]
        weights.append(trans * a)
    return torch.cat(weights)


def test_segment_starts_with_an_empty_ray():
    starts, counts = segment_starts(RAY_INDICES, 3)
    assert starts.tolist() == [0, 3, 3] and counts.tolist() == [3, 0, 3]


def test_exclusive_transmittance_and_weights_hand_values():
    # transmittance: ray 0 [1.0, 0.5, 0.25]; ray 2 [1.0, 0.8, 0.8 * 0.0 = 0.0]
    # weights:       ray 0 [0.5, 0.25, 0.125]; ray 2 [0.2, 0.8, 0.0]
    weights, trans = render_weights_from_alpha(ALPHAS, RAY_INDICES, 3)
    torch.testing.assert_close(trans, torch.tensor([1.0, 0.5, 0.25, 1.0, 0.8, 0.0], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.25, 0.125, 0.2, 0.8, 0.0], dtype=torch.float64))
    torch.testing.assert_close(exclusive_transmittance(ALPHAS, RAY_INDICES, 3), trans)


def test_transmittance_keeps_dtype_and_handles_no_samples():
    trans = exclusive_transmittance(ALPHAS.float(), RAY_INDICES, 3)
    assert trans.dtype == torch.float32
    empty = exclusive_transmittance(torch.zeros(0), torch.zeros(0, dtype=torch.long), 4)
    assert empty.shape == (0,)


def test_transmittance_of_a_long_ray_after_many_others():
    """The segmented cumsum subtracts the running sum of earlier rays: a ray after 2000
    samples of alpha 0.5 (sum log = -1386) still starts at T = 1 exactly enough."""
    alphas = torch.cat([torch.full((2000,), 0.5), torch.tensor([0.1, 0.1, 0.1])])
    ray_indices = torch.cat([torch.zeros(2000, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    trans = exclusive_transmittance(alphas, ray_indices, 2)
    torch.testing.assert_close(trans[-3:], torch.tensor([1.0, 0.9, 0.81]))


def test_accumulate_opacity_rgb_and_background():
    """opacity = sum w: [0.875, 0, 1.0]; rgb = sum w c: ray 0 [0.5, 0.25, 0.125], ray 2
    [0.8, 0, 0.2]; on white: C + (1 - opacity): [0.625, 0.375, 0.25], [1, 1, 1], [0.8, 0, 0.2]."""
    weights, _ = render_weights_from_alpha(ALPHAS, RAY_INDICES, 3)
    opacity = accumulate_along_rays(weights, RAY_INDICES, 3)
    torch.testing.assert_close(opacity, torch.tensor([[0.875], [0.0], [1.0]], dtype=torch.float64))
    rgb = accumulate_along_rays(weights, RAY_INDICES, 3, COLOURS)
    expected_rgb = torch.tensor([[0.5, 0.25, 0.125], [0.0, 0.0, 0.0], [0.8, 0.0, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(rgb, expected_rgb)
    white = torch.ones(1, 3, dtype=torch.float64)
    torch.testing.assert_close(
        composite_background(rgb, opacity, white),
        torch.tensor([[0.625, 0.375, 0.25], [1.0, 1.0, 1.0], [0.8, 0.0, 0.2]], dtype=torch.float64),
    )
    # one background colour per ray: ray 1 (empty) shows its own background unchanged
    per_ray = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(composite_background(rgb, opacity, per_ray)[1], per_ray[1])
    torch.testing.assert_close(composite_background(rgb, opacity, per_ray)[0], expected_rgb[0])


def test_weight_gradients_match_naive_cumprod():
    """Values and d/dalpha of a weighted sum of weights agree with a per-ray cumprod loop
    (alphas strictly below 1)."""
    alphas0 = torch.tensor([0.5, 0.5, 0.5, 0.2, 0.9, 0.3, 0.05, 0.7], dtype=torch.float64)
    ray_indices = torch.tensor([0, 0, 0, 2, 2, 2, 3, 3])
    coeffs = torch.tensor([0.3, -1.0, 2.0, 0.7, 1.5, -0.4, 1.1, 0.2], dtype=torch.float64)
    a1, a2 = alphas0.clone().requires_grad_(), alphas0.clone().requires_grad_()
    w1, _ = render_weights_from_alpha(a1, ray_indices, 4)
    w2 = naive_weights(a2, ray_indices, 4)
    torch.testing.assert_close(w1, w2)
    (g1,) = torch.autograd.grad((w1 * coeffs).sum(), a1)
    (g2,) = torch.autograd.grad((w2 * coeffs).sum(), a2)
    torch.testing.assert_close(g1, g2)
    # hand check for ray 0: d(sum c w)/d a_0 = c0 - c1 a1 - c2 (1 - a1) a2 = 0.3 + 0.5 - 0.5
    assert g1[0].item() == pytest.approx(0.3)


def test_weight_gradients_match_naive_cumprod_with_an_opaque_sample():
    """The hand case's ray 2 has alpha = 1.0 in the middle: d w_2 / d alpha_1 = -(1 - 0.2) * 0.3
    = -0.24 (cumprod), so the gradients must match there too."""
    coeffs = torch.tensor([0.3, -1.0, 2.0, 0.7, 1.5, -0.4], dtype=torch.float64)
    a1, a2 = ALPHAS.clone().requires_grad_(), ALPHAS.clone().requires_grad_()
    w1, _ = render_weights_from_alpha(a1, RAY_INDICES, 3)
    w2 = naive_weights(a2, RAY_INDICES, 3)
    torch.testing.assert_close(w1, w2)
    (g1,) = torch.autograd.grad((w1 * coeffs).sum(), a1)
    (g2,) = torch.autograd.grad((w2 * coeffs).sum(), a2)
    # ray 2, sample 1: c1 T1 - c2 T1 a2 = 1.5 * 0.8 - (-0.4) * 0.8 * 0.3 = 1.296
    assert g2[4].item() == pytest.approx(1.296)
    torch.testing.assert_close(g1, g2)


def test_neus_alpha_hand_values():
    """sdf 0.1, cos -1, dist 0.2, inv_s 10: prev/next sdf 0.2 / 0.0 -> sigmoid 0.880797 / 0.5,
    alpha = (0.380797 + 1e-5) / (0.880797 + 1e-5) = 0.432339.
    sdf 0, cos -0.5, anneal 0.5: iter_cos = -(0.75 * 0.5 + 0.5 * 0.5) = -0.625, dist 0.4, inv_s 5:
    sdf 0.125 / -0.125 -> sigmoid 0.651355 / 0.348645, alpha = 0.464747.
    A ray leaving the surface (cos +0.8, anneal 1): iter_cos 0, alpha = 1e-5 / (0.5 + 1e-5)."""
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    a = neus_alpha(one(0.1), one(-1.0), one(0.2), torch.tensor(10.0, dtype=torch.float64))
    torch.testing.assert_close(a, one(0.43233880323954965))
    a = neus_alpha(one(0.0), one(-0.5), one(0.4), torch.tensor(5.0, dtype=torch.float64), cos_anneal_ratio=0.5)
    torch.testing.assert_close(a, one(0.46474678901710287))
    a = neus_alpha(one(0.0), one(0.8), one(0.4), torch.tensor(10.0, dtype=torch.float64))
    torch.testing.assert_close(a, one(1.9999600007999844e-05))
    # deep inside (both ends far below 0): alpha -> 1 - exp(-inv_s dist) ~= 1, clipped at 1
    a = neus_alpha(one(-3.0), one(-1.0), one(0.5), torch.tensor(100.0, dtype=torch.float64))
    assert 0.999 < a.item() <= 1.0


def test_neus_alpha_head_on_equals_closed_form_for_any_anneal():
    """cos = -1 gives iter_cos = -1 whatever the anneal ratio, i.e. the head-on formula
    (sigmoid(s (sdf + d/2)) - sigmoid(s (sdf - d/2)) + 1e-5) / (sigmoid(s (sdf + d/2)) + 1e-5)."""
    gen = torch.Generator().manual_seed(3)
    sdf = torch.rand(50, generator=gen, dtype=torch.float64) - 0.5
    dist = torch.rand(50, generator=gen, dtype=torch.float64) * 0.1
    inv_s = torch.tensor(64.0, dtype=torch.float64)
    prev, nxt = torch.sigmoid(inv_s * (sdf + dist / 2)), torch.sigmoid(inv_s * (sdf - dist / 2))
    expected = ((prev - nxt + 1e-5) / (prev + 1e-5)).clamp(0, 1)
    for ratio in (0.0, 0.3, 1.0):
        torch.testing.assert_close(neus_alpha(sdf, torch.full_like(sdf, -1.0), dist, inv_s, ratio), expected)
    # per-sample inv_s broadcasts the same way
    torch.testing.assert_close(neus_alpha(sdf, -torch.ones_like(sdf), dist, inv_s.expand(50)), expected)


def test_visible_samples_drops_samples_behind_the_surface():
    """eps 0.2: ray 0 alphas [0.5, 0, 0.5, 0.5, 0.5] -> T [1, .5, .5, .25, .125]: keep 0-3 (4 has
    T < eps; 1's zero alpha is kept while alpha_thre is 0, as nerfacc does); ray 1 [0.9, 0.9] ->
    T [1, 0.1]: keep only the first. alpha_thre 0.5 keeps alpha >= 0.5 (so drops 1), 0.6 only 5."""
    alphas = torch.tensor([0.5, 0.0, 0.5, 0.5, 0.5, 0.9, 0.9])
    ray_indices = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    keep = visible_samples(alphas, ray_indices, 2, early_stop_eps=0.2, alpha_thre=0.0)
    assert keep.tolist() == [True, True, True, True, False, True, False]
    keep = visible_samples(alphas, ray_indices, 2, early_stop_eps=0.2, alpha_thre=0.5)
    assert keep.tolist() == [True, False, True, True, False, True, False]
    keep = visible_samples(alphas, ray_indices, 2, early_stop_eps=0.2, alpha_thre=0.6)
    assert keep.tolist() == [False, False, False, False, False, True, False]
    keep = visible_samples(alphas, ray_indices, 2, early_stop_eps=0.25, alpha_thre=0.0)  # T = eps is kept
    assert keep.tolist() == [True, True, True, True, False, True, False]



def test_visible_front_to_back_evaluates_only_what_it_keeps_or_needs():
    """eps 0.2, rounds of 1, 2, 4 candidates. Ray 0: candidates at k 0, 1, 3, 4, 5 with alpha 0.5
    -> T 1, .5, .25, .125: keeps 0, 1, 3; after round 2 (k 1, 3) T = 0.125 < eps, so k 4, 5 are
    never evaluated. Ray 1: candidates k 1 (alpha 1) and 4 -> keeps 1; dead after round 1."""
    candidates = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    table = torch.tensor([[0.5, 0.5, 0.0, 0.5, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0, 0.3, 0.0]])
    evaluated = []

    def alpha_of(ray, k):
        evaluated.extend(zip(ray.tolist(), k.tolist()))
        return table[ray, k]

    visible = visible_front_to_back(candidates, alpha_of, early_stop_eps=0.2, first_round=1)
    assert visible.int().tolist() == [[1, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0]]
    assert sorted(evaluated) == [(0, 0), (0, 1), (0, 3), (1, 1)]


def test_visible_front_to_back_keeps_what_visible_samples_keeps():
    """Random candidates and alphas: the same samples as evaluating every candidate at once."""
    gen = torch.Generator().manual_seed(3)
    candidates = torch.rand(64, 40, generator=gen) < 0.6  # [n_rays, n]
    table = torch.rand(64, 40, generator=gen) * 0.3  # [n_rays, n]
    ray, k = torch.nonzero(candidates, as_tuple=True)
    reference = torch.zeros_like(candidates)
    reference[ray, k] = visible_samples(table[ray, k], ray, 64, early_stop_eps=1e-2, alpha_thre=0.0)
    visible = visible_front_to_back(candidates, lambda r, kk: table[r, kk], early_stop_eps=1e-2)
    assert 0 < int(visible.sum()) < int(candidates.sum())  # some rays do stop early
    assert torch.equal(visible, reference)

# --- occupancy: ray / box and marching ------------------------------------------------------

BOX = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], dtype=torch.float64)


def test_ray_aabb_intersect_hand_cases():
    s3 = math.sqrt(3.0)
    rays_o = torch.tensor(
        [
            [0.0, 0.0, -3.0],  # along +z through the centre: near 2, far 4
            [0.5, 0.25, -3.0],  # parallel to z, off centre: near 2, far 4
            [0.0, 0.0, 3.0],  # along -z: near 2, far 4
            [2.0, 0.0, -3.0],  # parallel to z beside the box: miss
            [0.0, 0.0, 3.0],  # along +z, box behind the origin: miss
            [0.0, 0.0, 0.0],  # origin inside, along +x: near 0, far 1
            [-3.0, -3.0, -3.0],  # diagonal: near 2 sqrt 3, far 4 sqrt 3
        ],
        dtype=torch.float64,
    )
    rays_d = torch.tensor(
        [[0, 0, 1], [0, 0, 1], [0, 0, -1], [0, 0, 1], [0, 0, 1], [1, 0, 0], [1 / s3, 1 / s3, 1 / s3]],
        dtype=torch.float64,
    )
    near, far, hit = ray_aabb_intersect(rays_o, rays_d, BOX)
    assert hit.tolist() == [True, True, True, False, False, True, True]
    torch.testing.assert_close(near[hit], torch.tensor([2.0, 2.0, 2.0, 0.0, 2 * s3], dtype=torch.float64))
    torch.testing.assert_close(far[hit], torch.tensor([4.0, 4.0, 4.0, 1.0, 4 * s3], dtype=torch.float64))
    assert (near >= 0).all()


def reference_march(rays_o, rays_d, t_near, t_far, binaries, aabb, step):
    """Loop over rays and steps (nerfacc's rule): keep [t, t + step], t = near + k step, whose
    midpoint is before far and in a set cell."""
    res = binaries.shape[0]
    out = []
    for r in range(rays_o.shape[0]):
        o, d = rays_o[r].tolist(), rays_d[r].tolist()
        near, far = t_near[r].item(), t_far[r].item()
        k = 0
        while near + step * k + 0.5 * step < far:
            t0 = near + step * k
            mid = t0 + 0.5 * step
            cell = [
                math.floor((o[i] + mid * d[i] - aabb[i].item()) / (aabb[i + 3].item() - aabb[i].item()) * res)
                for i in range(3)
            ]
            if all(0 <= c < res for c in cell) and binaries[cell[0], cell[1], cell[2]]:
                out.append((r, t0, t0 + step))
            k += 1
    return out


def test_march_rays_matches_brute_force_on_random_grid():
    gen = torch.Generator().manual_seed(7)
    binaries = torch.rand(8, 8, 8, generator=gen) < 0.3
    n = 48
    origins = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    origins = 3.0 * origins / origins.norm(dim=-1, keepdim=True)
    targets = (torch.rand(n, 3, generator=gen, dtype=torch.float64) * 2 - 1) * 1.3  # some miss the box
    rays_d = targets - origins
    rays_d = rays_d / rays_d.norm(dim=-1, keepdim=True)
    near, far, hit = ray_aabb_intersect(origins, rays_d, BOX)
    assert 0 < int(hit.sum()) < n
    step = 0.05
    ray_indices, t_starts, t_ends = march_rays(origins, rays_d, near, far, binaries, BOX, step)
    expected = reference_march(origins, rays_d, near, far, binaries, BOX, step)
    assert len(expected) > 100
    assert ray_indices.tolist() == [r for r, _, _ in expected]
    torch.testing.assert_close(t_starts, torch.tensor([t for _, t, _ in expected], dtype=torch.float64))
    torch.testing.assert_close(t_ends, torch.tensor([t for _, _, t in expected], dtype=torch.float64))


def test_march_rays_keeps_a_last_sample_whose_midpoint_is_before_far():
    """All cells set; along +x from x = -3 the box starts at t = 2. far = 2.26 (inside the box,
    e.g. the foreground sphere's exit), step 0.1: midpoints 2.05, 2.15, 2.25 < 2.26 -> 3 samples,
    the last ending at 2.3, beyond far (nerfacc's rule); far = 2.25 -> 2 samples."""
    binaries = torch.ones(4, 4, 4, dtype=torch.bool)
    rays_o = torch.tensor([[-3.0, 0.1, 0.2], [-3.0, 0.1, 0.2]], dtype=torch.float64)
    rays_d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    near = torch.tensor([2.0, 2.0], dtype=torch.float64)
    far = torch.tensor([2.26, 2.25], dtype=torch.float64)
    ray_indices, t_starts, t_ends = march_rays(rays_o, rays_d, near, far, binaries, BOX, 0.1)
    assert ray_indices.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(t_starts, torch.tensor([2.0, 2.1, 2.2, 2.0, 2.1], dtype=torch.float64))
    torch.testing.assert_close(t_ends[2], torch.tensor(2.3, dtype=torch.float64))


def test_march_rays_one_occupied_cell():
    """4^3 grid over [-1, 1]^3 with only cell (2, 1, 3) set, i.e. x in [0, .5], y in [-.5, 0],
    z in [.5, 1]; step 1/8. Along +z at (0.25, -0.25): midpoints z = -1 + (k + 1/2)/8 fall in the
    cell for k = 12..15 -> t in [3.5, 3.625, 3.75, 3.875]. Along +x at (y, z) = (-0.25, 0.75):
    k = 8..11 -> t in [3.0, 3.125, 3.25, 3.375]. A ray along +z at x = -0.25 gets nothing."""
    binaries = torch.zeros(4, 4, 4, dtype=torch.bool)
    binaries[2, 1, 3] = True
    rays_o = torch.tensor([[0.25, -0.25, -3.0], [-0.25, -0.25, -3.0], [-3.0, -0.25, 0.75]], dtype=torch.float64)
    rays_d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    near, far, _ = ray_aabb_intersect(rays_o, rays_d, BOX)
    ray_indices, t_starts, t_ends = march_rays(rays_o, rays_d, near, far, binaries, BOX, 0.125)
    assert ray_indices.tolist() == [0, 0, 0, 0, 2, 2, 2, 2]
    expected = torch.tensor([3.5, 3.625, 3.75, 3.875, 3.0, 3.125, 3.25, 3.375], dtype=torch.float64)
    torch.testing.assert_close(t_starts, expected)
    torch.testing.assert_close(t_ends, expected + 0.125)


def test_march_rays_no_rays_or_no_span():
    binaries = torch.ones(4, 4, 4, dtype=torch.bool)
    o = torch.tensor([[2.0, 0.0, -3.0]])
    d = torch.tensor([[0.0, 0.0, 1.0]])
    near, far, hit = ray_aabb_intersect(o, d, BOX.float())
    assert not hit.any()
    ray_indices, t_starts, t_ends = march_rays(o, d, near, far, binaries, BOX.float(), 0.1)
    assert ray_indices.numel() == t_starts.numel() == t_ends.numel() == 0
