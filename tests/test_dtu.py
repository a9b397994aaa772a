"""The NeuS-format loader on DTU scan 24 at img_downscale 8 (1600x1200 -> 200x150)."""
import os

import cv2
import numpy as np
import pytest
import torch

from process_data.base import RayDataset, split_indices
from process_data.dtu import DTUDataset, load_neus_scene
from process_data.loading import DatasetError
from utils.camera import project

N_VIEWS, H, W = 49, 150, 200


def test_loader_shapes(dtu_views_x8):
    views = dtu_views_x8
    assert views.images.shape == (N_VIEWS, H, W, 3) and views.images.dtype == np.uint8
    assert views.masks.shape == (N_VIEWS, H, W) and views.masks.dtype == np.float32
    assert set(np.unique(views.masks)) == {0.0, 1.0}
    assert views.intrinsics.shape == (N_VIEWS, 3, 3)
    assert views.c2w.shape == (N_VIEWS, 3, 4)
    assert views.world_mats.shape == (N_VIEWS, 4, 4)
    assert views.scale_mat.shape == (4, 4)
    assert views.names[:2] == ["000000.png", "000001.png"] and len(views.names) == N_VIEWS
    # the object covers a sizeable part of every view, never all of it
    coverage = views.masks.mean(axis=(1, 2))
    assert coverage.min() > 0.3 and coverage.max() < 0.95  # scan 24 (a house) fills 46-84%


def test_cameras_are_rigid_and_outside_the_unit_sphere(dtu_views_x8):
    R = dtu_views_x8.c2w[:, :, :3]
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-9)
    assert (np.linalg.norm(dtu_views_x8.c2w[:, :, 3], axis=-1) > 1.5).all()
    K = dtu_views_x8.intrinsics
    assert (K[:, 0, 0] > 0).all() and (K[:, 1, 1] > 0).all()
    np.testing.assert_allclose(K[:, 2], np.broadcast_to([0.0, 0.0, 1.0], (N_VIEWS, 3)))


def test_split_holds_out_every_eighth_view(dtu_views_x8):
    dataset = RayDataset(dtu_views_x8, holdout_every=8, apply_mask=True, background_color="white", device="cpu")
    assert dataset.split["test"] == [0, 8, 16, 24, 32, 40, 48]
    assert len(dataset.split["train"]) == 42 and not set(dataset.split["train"]) & set(dataset.split["test"])
    assert split_indices(5, 0) == {"train": [0, 1, 2, 3, 4], "test": []}


def test_ray_batches(dtu_views_x8):
    """Random training rays: unit directions from the camera centres; only train views;
    with apply_mask and a white background the pixels outside the mask are exactly white."""
    dataset = RayDataset(dtu_views_x8, holdout_every=8, apply_mask=True, background_color="white", device="cpu")
    batch = dataset.sample_rays(512, generator=torch.Generator().manual_seed(0))
    assert batch["rays_o"].shape == batch["rays_d"].shape == batch["rgb"].shape == (512, 3)
    torch.testing.assert_close(batch["rays_d"].norm(dim=-1), torch.ones(512))
    centres = torch.from_numpy(dtu_views_x8.c2w[:, :, 3]).float()
    test_centres = centres[dataset.split["test"]]
    assert torch.cdist(batch["rays_o"], test_centres).min() > 1e-3  # never a held-out camera
    view = dataset.view_rays(3)
    assert view["rays_o"].shape == (H * W, 3)
    outside = view["mask"] == 0
    assert torch.equal(view["rgb"][outside], torch.ones(int(outside.sum()), 3))
    torch.testing.assert_close(view["rays_o"][0], centres[3])


def test_world_mats_are_the_downscaled_originals(dtu_root, dtu_views_x8):
    """world_mats[i] projects as the file's world_mat_i followed by u' = (u + 0.5) / 8 - 0.5."""
    cameras = np.load(os.path.join(dtu_root, "cameras_sphere.npz"))
    rng = np.random.default_rng(0)
    points_norm = rng.uniform(-0.5, 0.5, (20, 3))
    points_world = (np.c_[points_norm, np.ones(20)] @ dtu_views_x8.scale_mat.T)[:, :3]
    for i in (0, 17, 48):
        uv_full, depth_full = project(points_world, cameras[f"world_mat_{i}"])
        uv, depth = project(points_world, dtu_views_x8.world_mats[i])
        np.testing.assert_allclose(uv, (uv_full + 0.5) / 8.0 - 0.5, rtol=0, atol=1e-9)
        np.testing.assert_allclose(depth, depth_full, rtol=1e-12)  # the third row is unscaled


def project_normalised(points_norm, K, c2w):
    """Pixels of normalised-frame points through K and the camera-to-world pose."""
    R, C = c2w[:, :3], c2w[:, 3]
    cam = (points_norm - C) @ R  # R^T (x - C), row-wise
    uvw = cam @ K.T
    return uvw[:, :2] / uvw[:, 2:], cam[:, 2]


def test_projection_through_world_mat_equals_intrinsics_and_pose(dtu_views_x8):
    """X_world = scale_mat X_norm projects to the same pixel by world_mats[i] as X_norm does by
    intrinsics[i] and c2w[i] (in front of the camera in both)."""
    views = dtu_views_x8
    rng = np.random.default_rng(1)
    points_norm = rng.uniform(-0.6, 0.6, (50, 3))
    homo = np.c_[points_norm, np.ones(50)]
    np.testing.assert_allclose((homo @ views.scale_mat.T) @ np.linalg.inv(views.scale_mat).T, homo, atol=1e-9)
    points_world = (homo @ views.scale_mat.T)[:, :3]
    for i in range(N_VIEWS):
        uv_world, depth_world = project(points_world, views.world_mats[i])
        uv_norm, depth_norm = project_normalised(points_norm, views.intrinsics[i], views.c2w[i])
        np.testing.assert_allclose(uv_norm, uv_world, rtol=0, atol=1e-6)
        assert (depth_world > 0).all() and (depth_norm > 0).all()


def test_projected_object_centre_is_in_the_masks(dtu_views_x8):
    """The origin of the normalised frame projects inside the image and the mask of every view."""
    views = dtu_views_x8
    for i in range(N_VIEWS):
        uv, _ = project_normalised(np.zeros((1, 3)), views.intrinsics[i], views.c2w[i])
        u, v = uv[0]
        assert 0 <= u < W and 0 <= v < H
        assert views.masks[i, int(round(v)), int(round(u))] == 1.0, i


def in_mask_fraction(points_world, views):
    """For each point [P, 3]: fraction of views whose mask holds its (rounded) projection."""
    hits = np.zeros(len(points_world))
    for i in range(len(views.masks)):
        uv, depth = project(points_world, views.world_mats[i])
        u, v = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
        inside = (depth > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        hits[inside] += views.masks[i, v[inside], u[inside]]
    return hits / len(views.masks)


def rays_through(dataset, view, pixels):
    """pixels [n, 2] (v, u) -> rays_o, rays_d [n, 3] float64"""
    v, u = torch.from_numpy(pixels[:, 0]), torch.from_numpy(pixels[:, 1])
    batch = dataset._rays(torch.full_like(u, view), u, v, torch.ones(len(u), 3))
    return batch["rays_o"].double().numpy(), batch["rays_d"].double().numpy()


def best_consistency(rays_o, rays_d, views, n_points=96):
    """Per ray: the largest fraction of views whose masks hold one point on the ray's chord of
    the unit sphere (0 for rays that miss the sphere)."""
    b = (rays_o * rays_d).sum(-1)
    disc = b**2 - ((rays_o**2).sum(-1) - 1.0)
    best = np.zeros(len(rays_o))
    for r in np.nonzero(disc > 0)[0]:
        t = np.linspace(-b[r] - np.sqrt(disc[r]), -b[r] + np.sqrt(disc[r]), n_points)
        points = rays_o[r] + t[:, None] * rays_d[r]
        points_world = (np.c_[points, np.ones(n_points)] @ views.scale_mat.T)[:, :3]
        best[r] = in_mask_fraction(points_world, views).max()
    return best, disc > 0


@pytest.fixture(scope="module")
def view_pixels(dtu_views_x8):
    """Pixels of view 5 well inside its mask (eroded 2 px) and far outside it (> 15 px away)."""
    mask = dtu_views_x8.masks[5].astype(np.uint8)
    inner = cv2.erode(mask, np.ones((5, 5), np.uint8))
    far = cv2.distanceTransform(1 - mask, cv2.DIST_L2, 5) > 15
    rng = np.random.default_rng(2)
    pick = lambda m: np.argwhere(m)[rng.choice(int(m.sum()), 150, replace=False)]  # noqa: E731
    return pick(inner > 0), pick(far)


def test_rays_through_mask_pixels_cross_the_visual_hull(dtu_views_x8, view_pixels):
    """Most rays through mask pixels of one view have a point inside the unit sphere that
    projects into the masks of nearly all 49 views."""
    dataset = RayDataset(dtu_views_x8, holdout_every=8, apply_mask=True, background_color="white", device="cpu")
    inner, _ = view_pixels
    rays_o, rays_d = rays_through(dataset, 5, inner)
    best, hits_sphere = best_consistency(rays_o, rays_d, dtu_views_x8)
    assert hits_sphere.all()  # every ray through the object meets the unit sphere
    assert (best >= 0.95).mean() >= 0.9
    assert np.median(best) >= 0.98


def test_rays_far_outside_the_mask_miss_the_visual_hull(dtu_views_x8, view_pixels):
    dataset = RayDataset(dtu_views_x8, holdout_every=8, apply_mask=True, background_color="white", device="cpu")
    _, far = view_pixels
    rays_o, rays_d = rays_through(dataset, 5, far)
    best, _ = best_consistency(rays_o, rays_d, dtu_views_x8)
    assert (best >= 0.95).mean() <= 0.02
    assert np.median(best) < 0.8


# --- errors ---------------------------------------------------------------------------------


def test_missing_root_dir_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_scan")
    with pytest.raises(DatasetError, match="no_such_scan") as err:
        DTUDataset(DTUDataset.Config(root_dir=missing, img_downscale=8), "cpu")
    assert missing in str(err.value)


def test_scene_without_images_or_cameras_names_what_is_missing(tmp_path):
    with pytest.raises(DatasetError, match="no image/"):
        load_neus_scene(str(tmp_path), "cameras_sphere.npz", 1, True)
    (tmp_path / "image").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_neus_scene(str(tmp_path), "cameras_sphere.npz", 1, True)
    cv2.imwrite(str(tmp_path / "image" / "000.png"), np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DatasetError) as err:
        load_neus_scene(str(tmp_path), "cameras_sphere.npz", 1, True)
    assert str(tmp_path / "cameras_sphere.npz") in str(err.value)


# --- the dataset configs' shared base ---------------------------------------------------------


def test_every_dataset_config_builds_on_the_base():
    """The shared keys are declared once (DatasetConfig); every dataset answers gt_mesh."""
    import dataclasses

    from process_data import DATASETS
    from process_data.base import DatasetConfig

    shared = {f.name for f in dataclasses.fields(DatasetConfig)}
    assert {"root_dir", "img_downscale", "apply_mask", "background_color", "gt_mesh"} <= shared
    for name in DATASETS.names():
        cls = DATASETS.get(name)
        assert issubclass(cls.Config, DatasetConfig), name
        assert issubclass(cls, RayDataset) and "gt_mesh" in dir(cls), name


@pytest.mark.parametrize("config", ["neus-dtu-wmask-cpu.yaml", "neus-blender.yaml", "neus-colmap.yaml", "neus-demo.yaml"])
def test_bad_background_color_fails_at_load_with_the_valid_values(config):
    from tests.conftest import ROOT
    from utils.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(ROOT, "confs", config), ["dataset.background_color=pink"])
    message = str(err.value)
    assert "dataset.background_color" in message and "pink" in message
    assert all(choice in message for choice in ("white", "black", "random"))


def test_gt_mesh_is_the_configured_file_the_scene_default_or_none(cached_scene, tmp_path):
    config = DTUDataset.Config(root_dir=cached_scene, img_downscale=8)
    assert DTUDataset(config, "cpu").gt_mesh is None  # scan 24 here has no gt_mesh.ply
    mesh = tmp_path / "gt.ply"
    mesh.write_text("ply\n")
    assert DTUDataset(DTUDataset.Config(root_dir=cached_scene, img_downscale=8, gt_mesh=str(mesh)), "cpu").gt_mesh == str(mesh)
    absent = DTUDataset.Config(root_dir=cached_scene, img_downscale=8, gt_mesh=str(tmp_path / "absent.ply"))
    assert DTUDataset(absent, "cpu").gt_mesh is None  # how a run skips the mesh metrics
