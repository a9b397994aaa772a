"""The background model for scenes without masks: contraction, its samples, compositing,
the distortion loss, and a short unmasked training run."""
import math
import os

import numpy as np
import pytest
import torch

import systems
from models.background import (
    BackgroundField,
    contract,
    disparity_intervals,
    ray_sphere_intersect,
    trunc_exp,
)
from models.rendering import density_alpha, exclusive_sum
from systems.losses import distortion
from tests.conftest import ROOT
from tests.test_training import SMALL, run_steps
from systems.config import load_config
from utils.config import ConfigError
from utils.misc import seed_everything

NO_MASK_CONFIG = os.path.join(ROOT, "confs", "neus-dtu-cpu.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_BACKGROUND = [
    "model.background.xyz_encoding.n_levels=6",
    "model.background.xyz_encoding.log2_hashmap_size=12",
    "model.background.xyz_encoding.compile=false",
    "model.background.n_samples=16",
    "model.background.grid_resolution=16",
]


def test_contraction_maps_known_points():
    x = torch.tensor([[0.5, 0.0, 0.0], [0.0, -1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, -4.0], [3.0, 4.0, 0.0]])
    expected = torch.tensor(
        [
            [0.5, 0.0, 0.0],  # inside: unchanged
            [0.0, -1.0, 0.0],  # on the sphere: unchanged
            [1.5, 0.0, 0.0],  # |x| = 2 -> 2 - 1/2
            [0.0, 0.0, -1.75],  # |x| = 4 -> 2 - 1/4
            [1.8 * 0.6, 1.8 * 0.8, 0.0],  # |x| = 5 -> 2 - 1/5 along (0.6, 0.8)
        ]
    )
    torch.testing.assert_close(contract(x), expected)
    far = contract(torch.tensor([[0.0, 1e8, 0.0]]))
    torch.testing.assert_close(far, torch.tensor([[0.0, 2.0, 0.0]]))


def test_contraction_is_continuous_at_the_unit_sphere():
    directions = torch.nn.functional.normalize(torch.randn(100, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    for eps in (1e-3, 1e-5):
        inside, outside = contract(directions * (1 - eps)), contract(directions * (1 + eps))
        # |contract| = 2 - 1/r has slope 1 at r = 1: the gap is ~2 eps
        assert (outside - inside).norm(dim=-1).max() < 2.5 * eps


def test_ray_sphere_intersection():
    rays_o = torch.tensor([[-3.0, 0.0, 0.0], [0.0, 0.0, -2.0], [0.0, 3.0, 0.0]])
    rays_d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [1.0, 0.0, 0.0]])
    t_near, t_far = ray_sphere_intersect(rays_o, rays_d, 1.0)
    # ray 2: o.d = -1.6, |o|^2 - 1 = 3 -> t = 1.6 -+ sqrt(2.56 - 3): misses, closest approach 1.6
    # ray 3 misses too: closest approach at t = 0
    torch.testing.assert_close(t_near, torch.tensor([2.0, 1.6, 0.0]))
    torch.testing.assert_close(t_far, torch.tensor([4.0, 1.6, 0.0]))
    t_near, t_far = ray_sphere_intersect(rays_o[:1], rays_d[:1], 2.0)
    torch.testing.assert_close(t_far, torch.tensor([5.0]))


def test_disparity_intervals_by_hand():
    # from t = 1 to far = 1e9, 2 intervals: s = 0, 1/2, 1 -> 1/t = 1, 1/2, ~0; samples at s = 1/4, 3/4
    t_lo, t_hi, t_sample, s_lo = disparity_intervals(torch.tensor([1.0]), 1e9, 2, stratified=False)
    torch.testing.assert_close(t_lo, torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(t_hi[0, 0], torch.tensor(2.0))
    assert t_hi[0, 1] > 1e8
    torch.testing.assert_close(t_sample, torch.tensor([[4.0 / 3.0, 4.0]]))
    torch.testing.assert_close(s_lo, torch.tensor([[0.0, 0.5]]))
    _, _, t_random, _ = disparity_intervals(torch.tensor([1.0, 3.0]), 100.0, 8, stratified=True)
    t_lo, t_hi, _, _ = disparity_intervals(torch.tensor([1.0, 3.0]), 100.0, 8, stratified=False)
    assert ((t_random >= t_lo) & (t_random <= t_hi)).all()
    assert (t_hi[:, 1:] - t_lo[:, 1:] > t_hi[:, :-1] - t_lo[:, :-1]).all()  # spacing grows


def test_density_alpha_and_trunc_exp():
    # 1 - exp(-2 * 0.5) = 1 - e^-1
    torch.testing.assert_close(density_alpha(torch.tensor([2.0, 0.0]), torch.tensor([0.5, 3.0])),
                               torch.tensor([1.0 - math.exp(-1.0), 0.0]))
    x = torch.tensor([1.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    torch.testing.assert_close(y.detach(), torch.exp(x.detach()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([math.e, math.exp(15.0)]))


def test_exclusive_sum_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    ray_indices = torch.tensor([0, 0, 0, 1, 3, 3])  # ray 2 has no samples
    torch.testing.assert_close(exclusive_sum(values, ray_indices, 4), torch.tensor([0.0, 1.0, 3.0, 0.0, 0.0, 5.0]))


def brute_force_distortion(weights, s_starts, s_ends, ray_indices, n_rays):
    total = weights.sum() * 0.0
    mid = 0.5 * (s_starts + s_ends)
    for ray in range(n_rays):
        on = ray_indices == ray
        w, m, d = weights[on], mid[on], (s_ends - s_starts)[on]
        total = total + (w[:, None] * w[None, :] * (m[:, None] - m[None, :]).abs()).sum() + (w**2 * d).sum() / 3
    return total / n_rays


def test_distortion_by_hand():
    # one ray, intervals [0, .5] and [.5, 1] with weights .5 each:
    # pairs 2 * .25 * .5 = .25; own (.25 * .5 + .25 * .5) / 3 = 1/12
    w = torch.tensor([0.5, 0.5])
    loss = distortion(w, torch.tensor([0.0, 0.5]), torch.tensor([0.5, 1.0]), torch.tensor([0, 0]), 1)
    torch.testing.assert_close(loss, torch.tensor(0.25 + 1.0 / 12.0))


def test_distortion_matches_brute_force_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    counts = [5, 0, 1, 7, 3]
    ray_indices = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    edges = [torch.sort(torch.rand(c + 1, generator=g)).values for c in counts]
    s_starts = torch.cat([e[:-1] for e in edges])
    s_ends = torch.cat([e[1:] for e in edges])
    weights = (torch.rand(ray_indices.shape[0], generator=g) * 0.3).requires_grad_(True)
    fast = distortion(weights, s_starts, s_ends, ray_indices, len(counts))
    (grad_fast,) = torch.autograd.grad(fast, weights)
    slow = brute_force_distortion(weights, s_starts, s_ends, ray_indices, len(counts))
    (grad_slow,) = torch.autograd.grad(slow, weights)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(grad_fast, grad_slow)


def background_field(**overrides):
    config = load_config(NO_MASK_CONFIG, ["dataset.root_dir=unused", *SMALL_BACKGROUND]).model.background
    for key, value in overrides.items():
        config[key] = value
    return BackgroundField(config, radius=1.0)


def test_background_samples_start_where_the_foreground_sphere_ends():
    field = background_field(early_stop_eps=0.0)
    field.grid.estimator.binaries.fill_(True)
    rays_o = torch.tensor([[-3.0, 0.0, 0.0], [0.0, -2.0, 0.5], [0.0, 0.0, 5.0]])
    rays_d = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, -1.0]]), dim=-1)
    _, t_exit = ray_sphere_intersect(rays_o, rays_d, 1.0)
    samples = field.sample(rays_o, rays_d, stratified=False)
    n = field.config.n_samples
    assert samples["ray_indices"].tolist() == sorted(samples["ray_indices"].tolist())
    assert torch.bincount(samples["ray_indices"], minlength=3).tolist() == [n, n, n]
    first = samples["t_starts"].view(3, n)[:, 0]
    torch.testing.assert_close(first, t_exit)
    torch.testing.assert_close(first[0], torch.tensor(4.0))  # leaves the unit sphere at x = 1
    x = rays_o[samples["ray_indices"]] + samples["t_sample"][:, None] * rays_d[samples["ray_indices"]]
    assert (x.norm(dim=-1) >= 1.0 - 1e-5).all()  # never inside the foreground
    t = samples["t_starts"].view(3, n)
    assert (t[:, 1:] > t[:, :-1]).all()
    torch.testing.assert_close(samples["t_ends"].view(3, n)[:, -1], torch.full((3,), 1000.0))


def test_background_samples_skip_empty_cells():
    field = background_field(early_stop_eps=0.0)
    field.grid.estimator.binaries.fill_(False)
    samples = field.sample(torch.tensor([[-3.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]), stratified=True)
    assert samples["ray_indices"].numel() == 0
    res = field.config.grid_resolution
    field.grid.estimator.binaries[0, res - 1] = True  # the slab of cells at x_c in [2 - 4/res, 2]
    samples = field.sample(torch.tensor([[-3.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]), stratified=False)
    x_c = contract(torch.tensor([[-3.0, 0.0, 0.0]]) + samples["t_sample"][:, None] * torch.tensor([[1.0, 0.0, 0.0]]))
    assert samples["ray_indices"].numel() > 0
    assert (x_c[:, 0] >= 2.0 - 4.0 / res).all()


def build_unmasked(dtu_root, trial_dir, *overrides):
    config = load_config(NO_MASK_CONFIG, [f"dataset.root_dir={dtu_root}", *SMALL, *SMALL_BACKGROUND, *overrides])
    seed_everything(config.seed)
    return systems.Trainer(config, systems.RunPaths.for_trial(str(trial_dir)),
                                                   torch.device("cpu"))


def test_rgb_is_foreground_over_background(cached_scene, tmp_path):
    """C = C_fg + (1 - opacity_fg) C_bg, with C_bg = C_bg_field + (1 - opacity_bg) fill."""
    system = build_unmasked(cached_scene, tmp_path)
    run_steps(system, 3)
    rays = system.dataset.view_rays(0)
    pick = torch.arange(0, rays["rays_o"].shape[0], 53)
    system.model.eval()
    rays_o, rays_d = rays["rays_o"][pick], rays["rays_d"][pick]
    with torch.no_grad():
        out = system.model(rays_o, rays_d, rays["background"][pick])
        black, white = (system.model(rays_o, rays_d, torch.full_like(rays_o, fill)) for fill in (0.0, 1.0))
    bg = out["background"]
    assert bg["n_samples"] > 0
    torch.testing.assert_close(out["rgb"], out["rgb_foreground"] + (1 - out["opacity"][:, None]) * bg["rgb"])
    # the fill shows through where both the foreground and the background field are transparent
    see_through = (1 - white["opacity"]) * (1 - white["background"]["opacity"])  # [n_rays]
    assert 0 < see_through.max() and see_through.min() < 1
    torch.testing.assert_close(white["rgb"] - black["rgb"], see_through[:, None].expand(-1, 3))


def test_short_unmasked_run_lowers_the_loss(cached_scene, tmp_path):
    """60 steps without masks (mask loss off, pixels as photographed), distortion on: the loss
    falls and the background model renders the table and walls around the object."""
    system = build_unmasked(cached_scene, tmp_path, "system.scheduler.warmup_steps=10")
    assert system.task.config.loss.lambda_mask == 0 and not system.full_config.dataset.apply_mask
    losses, bg_samples = [], []
    for _ in range(60):
        stats = system.step().stats
        losses.append(stats["loss"])
        bg_samples.append(stats["bg_samples_per_ray"])
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.8 * first, (first, last)
    assert min(bg_samples) > 0
    assert "background" in dict(system.model.parameter_groups())


def test_background_keys_are_validated():
    with pytest.raises(ConfigError, match="n_samples"):
        load_config(NO_MASK_CONFIG, ["dataset.root_dir=unused", "model.background.n_sample=8"])
    with pytest.raises(ConfigError, match="n_levels"):
        load_config(NO_MASK_CONFIG, ["dataset.root_dir=unused", "model.background.xyz_encoding.n_level=8"])


def test_mesh_ends_at_the_foreground_sphere(monkeypatch):
    """With a background model the exported surface is max(sdf, |x| - radius): an SDF that is
    negative everywhere gives the sphere itself, not a surface in the corners of the box."""
    from models.neus import NeuSModel

    config = load_config(NO_MASK_CONFIG, ["dataset.root_dir=unused", *SMALL_BACKGROUND, "model.radius=1.0",
                                          "model.geometry.xyz_encoding.compile=false"]).model
    model = NeuSModel(config)
    monkeypatch.setattr(model.geometry, "sdf", lambda x: torch.full_like(x[:, 0], -1.0))
    x = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [2.0, 0.0, 0.0], [0.9, 0.9, 0.9]])
    torch.testing.assert_close(model.mesh_sdf(x), torch.tensor([-1.0, -0.5, 1.0, 0.9 * math.sqrt(3) - 1.0]))


def test_checkpoints_with_the_old_grid_keys_load():
    """Checkpoints written before the background grid became a CellGrid hold estimator.* keys:
    they load into grid.estimator.*, values intact."""
    field = background_field()
    state = {k.replace("grid.estimator.", "estimator."): v.clone() for k, v in field.state_dict().items()}
    assert "estimator.occs" in state and not any(k.startswith("grid.") for k in state)
    state["estimator.occs"].fill_(0.25)
    fresh = background_field()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.grid.estimator.occs, torch.full_like(fresh.grid.estimator.occs, 0.25))


def test_opacity_prior_by_hand():
    """lambda_opacity * mean foreground opacity, only where a background can take the rest:
    opacities 0.2 and 0.6, weight 0.5 -> 0.2, gradient 0.5 / 2 a ray."""
    from systems.losses import LossConfig, neus_losses

    opacity = torch.tensor([0.2, 0.6], requires_grad=True)
    out = {"rgb": torch.zeros(2, 3), "opacity": opacity, "background": {}}
    batch = {"rgb": torch.zeros(2, 3)}
    config = LossConfig(lambda_rgb_l1=0.0, lambda_eikonal=0.0, lambda_mask=0.0, lambda_opacity=0.5)
    terms = neus_losses(config, out, batch)
    torch.testing.assert_close(terms["opacity"], torch.tensor(0.2))
    terms["total"].backward()
    torch.testing.assert_close(opacity.grad, torch.tensor([0.25, 0.25]))
    del out["background"]  # masked training, no background: nothing else could explain those pixels
    assert "opacity" not in neus_losses(config, out, batch)


def test_opacity_above_plane_by_hand():
    """Two rays against the plane z = 0.5 (n = (0, 0, 1), d = -0.5): ray 0 has weights 0.2 at
    z = 0.9 and 0.3 at z = 0.1 -> 0.2 above; ray 1 has 0.5 at z = 0.6 and 0.4 at z = 0.7 -> 0.9.
    The gradient reaches the counted weights only."""
    from models.rendering import opacity_above_plane

    weights = torch.tensor([0.2, 0.3, 0.5, 0.4], requires_grad=True)
    x = torch.tensor([[0.0, 0.0, 0.9], [0.0, 0.0, 0.1], [1.0, 0.0, 0.6], [0.0, 1.0, 0.7]])
    ray_indices = torch.tensor([0, 0, 1, 1])
    plane = torch.tensor([0.0, 0.0, 1.0, -0.5])
    above = opacity_above_plane(weights, x, ray_indices, 2, plane)
    torch.testing.assert_close(above, torch.tensor([0.2, 0.9]))
    above.sum().backward()
    torch.testing.assert_close(weights.grad, torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_opacity_prior_counts_above_the_plane_when_the_model_gives_it():
    """With opacity_above_plane in the forward's output (the model has a prior plane) the prior
    is its mean: 0.1 and 0.3 -> 0.5 * 0.2 = 0.1, the full opacities 0.2 and 0.6 left alone."""
    from systems.losses import LossConfig, neus_losses

    opacity = torch.tensor([0.2, 0.6], requires_grad=True)
    above = torch.tensor([0.1, 0.3], requires_grad=True)
    out = {"rgb": torch.zeros(2, 3), "opacity": opacity, "opacity_above_plane": above, "background": {}}
    config = LossConfig(lambda_rgb_l1=0.0, lambda_eikonal=0.0, lambda_mask=0.0, lambda_opacity=0.5)
    terms = neus_losses(config, out, {"rgb": torch.zeros(2, 3)})
    torch.testing.assert_close(terms["opacity"], torch.tensor(0.1))
    terms["total"].backward()
    assert opacity.grad is None
    torch.testing.assert_close(above.grad, torch.tensor([0.25, 0.25]))


def test_model_gives_opacity_above_its_prior_plane_and_saves_the_plane():
    """A model without a prior plane gives no opacity_above_plane; with the plane z = -10 below
    the whole region it gives the full opacity; with z = 10 above it, zero. The plane is part of
    the model's state (a resumed run keeps it), and checkpoints written before it load as none."""
    from models.neus import NeuSModel

    config = load_config(NO_MASK_CONFIG, ["dataset.root_dir=unused", *SMALL_BACKGROUND, "model.radius=1.0",
                                          "model.geometry.xyz_encoding.compile=false"]).model
    model = NeuSModel(config)
    model.update_occupancy(0)  # the grid's warm-up: every cell the sphere init reaches
    model.eval()
    rays_o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 3.0, 0.0]])
    rays_d = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    background = torch.ones(1, 3)
    with torch.no_grad():
        assert "opacity_above_plane" not in model(rays_o, rays_d, background)
        model.set_prior_plane([0.0, 0.0, 1.0], 10.0)
        out = model(rays_o, rays_d, background)
        torch.testing.assert_close(out["opacity_above_plane"], out["opacity"])
        assert out["opacity"].min() > 0.1  # the sphere init: both rays meet the surface
        model.set_prior_plane([0.0, 0.0, 1.0], -10.0)
        torch.testing.assert_close(model(rays_o, rays_d, background)["opacity_above_plane"], torch.zeros(2))
    state = model.state_dict()
    torch.testing.assert_close(state["prior_plane"], torch.tensor([0.0, 0.0, 1.0, -10.0]))
    del state["prior_plane"]
    model.load_state_dict(state)
    assert not model.has_prior_plane
