"""The built-in demo scene (process_data/synthetic.py): it loads as a NeuS scene, its cameras
reproject the ground-truth mesh onto its masks, its frames and mesh orientation are right,
it is generated once, and its images are textured on a white background."""
import json
import os
import time

import cv2
import numpy as np
import pytest
import trimesh

from process_data import synthetic, synthetic_object
from process_data.dtu import load_neus_scene
from utils.camera import downscale_matrix
from utils.mesh import rasterize_silhouette, silhouette_iou

N_VIEWS, WIDTH, HEIGHT = 8, 200, 150


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "scene")
    assert synthetic.make_demo_scene(out, n_views=N_VIEWS, width=WIDTH, height=HEIGHT) == out
    views = load_neus_scene(out, "cameras_sphere.npz", 1.0, use_masks=True)
    mesh = trimesh.load(os.path.join(out, "gt_mesh.ply"), process=False)
    return out, views, mesh


def test_loads_as_neus_scene(scene):
    out, views, _ = scene
    assert views.images.shape == (N_VIEWS, HEIGHT, WIDTH, 3) and views.images.dtype == np.uint8
    assert views.masks.shape == (N_VIEWS, HEIGHT, WIDTH)
    assert set(np.unique(views.masks)) == {0.0, 1.0}
    assert views.intrinsics.shape == (N_VIEWS, 3, 3)
    assert views.c2w.shape == (N_VIEWS, 3, 4)
    assert views.world_mats.shape == (N_VIEWS, 4, 4)
    cameras = np.load(os.path.join(out, "cameras_sphere.npz"))
    for key in ("world_mat", "world_mat_inv", "scale_mat", "scale_mat_inv", "camera_mat", "camera_mat_inv"):
        assert f"{key}_{N_VIEWS - 1}" in cameras
    # cameras in the normalised frame: on the sphere of radius CAMERA_DISTANCE, looking at the centre
    centres = views.c2w[:, :, 3]
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), synthetic.CAMERA_DISTANCE, rtol=1e-5)
    forward = views.c2w[:, :, 2]
    np.testing.assert_allclose(forward, -centres / np.linalg.norm(centres, axis=1, keepdims=True), atol=1e-5)
    K = synthetic.intrinsics(WIDTH, HEIGHT)
    np.testing.assert_allclose(views.intrinsics, np.broadcast_to(K, views.intrinsics.shape), rtol=1e-5, atol=1e-6)


def test_cameras_reproject_gt_mesh_onto_masks(scene):
    _, views, mesh = scene
    vertices, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    ious = silhouette_iou(vertices, faces, views.world_mats, views.masks)
    # utils.mesh's rasteriser fills the pixels its edges touch (~0.6 px too wide), hence the
    # loose bound at this size (0.965 here, 0.984 at 400x300)
    assert np.mean(ious) > 0.95, ious
    # pixel-centre-exact silhouettes (rasterised 8x finer, sampled at the pixel centres): 0.995
    # here; rays shifted by half a pixel along u (or u and v) would give 0.980 (0.973)
    s = 8
    exact = []
    for world_mat, mask in zip(views.world_mats[:4], views.masks[:4]):
        fine = np.vstack([downscale_matrix(1 / s) @ world_mat[:3], [0, 0, 0, 1]])
        sil = rasterize_silhouette(vertices, faces, fine, (WIDTH * s, HEIGHT * s))[s // 2 :: s, s // 2 :: s]
        ref = mask > 0.5
        exact.append((sil & ref).sum() / (sil | ref).sum())
    assert np.mean(exact) > 0.988, exact


def test_world_frame_is_not_normalised_frame(scene):
    out, views, mesh = scene
    expected = synthetic.scale_matrix()
    np.testing.assert_allclose(views.scale_mat, expected)
    assert not np.allclose(views.scale_mat, np.eye(4))
    centre = expected[:3, 3]
    np.testing.assert_allclose(mesh.bounds.mean(axis=0), centre, atol=0.05 * synthetic.WORLD_SCALE)
    radius = np.linalg.norm(mesh.vertices - centre, axis=1).max()
    info = json.load(open(os.path.join(out, "scene.json")))
    assert info["object_radius_world"] == pytest.approx(radius, rel=1e-4)
    assert 0.5 * synthetic.WORLD_SCALE < radius < synthetic_object.BOUND_RADIUS * synthetic.WORLD_SCALE
    assert info["description"] and info["params"] == {"n_views": N_VIEWS, "width": WIDTH, "height": HEIGHT, "seed": 0}


def test_gt_mesh_faces_outward(scene):
    _, _, mesh = scene
    assert mesh.is_watertight
    assert mesh.volume > 0
    centre = synthetic.scale_matrix()[:3, 3]
    outward = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - centre)
    assert outward.mean() > 0


def test_generated_once_and_regenerated_when_parameters_change(tmp_path, monkeypatch):
    real = synthetic.ground_truth_mesh
    monkeypatch.setattr(synthetic, "ground_truth_mesh", lambda: real(64))  # speed only
    out = str(tmp_path / "scene")
    synthetic.make_demo_scene(out, n_views=3, width=48, height=36)
    marker = os.path.join(out, "scene.json")
    first = os.path.join(out, "image", "000000.png")
    stamps = (os.path.getmtime(marker), os.path.getmtime(first))
    time.sleep(0.05)
    start = time.time()
    assert synthetic.make_demo_scene(out, n_views=3, width=48, height=36) == out
    assert time.time() - start < 0.5
    assert (os.path.getmtime(marker), os.path.getmtime(first)) == stamps
    # other parameters: re-rendered, stale views gone
    synthetic.make_demo_scene(out, n_views=2, width=40, height=30)
    views = load_neus_scene(out, "cameras_sphere.npz", 1.0, use_masks=True, min_views=2)
    assert views.images.shape == (2, 30, 40, 3) and views.masks.shape == (2, 30, 40)
    assert json.load(open(marker))["params"]["width"] == 40
    # overwrite forces a new render
    stamp = os.path.getmtime(marker)
    time.sleep(0.05)
    synthetic.make_demo_scene(out, n_views=2, width=40, height=30, overwrite=True)
    assert os.path.getmtime(marker) > stamp


def test_refuses_folder_with_other_data(tmp_path):
    os.makedirs(tmp_path / "image")
    with pytest.raises(FileExistsError):
        synthetic.make_demo_scene(str(tmp_path), n_views=2, width=40, height=30)


def test_images_textured_on_white(scene):
    _, views, _ = scene
    kernel = np.ones((3, 3), np.uint8)
    for image, mask in zip(views.images, views.masks):
        m = mask.astype(np.uint8)
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        inside = cv2.erode(m, kernel, iterations=2) > 0
        assert inside.sum() > 0.05 * mask.size
        assert cv2.Laplacian(gray, cv2.CV_32F)[inside].std() > 10.0  # ~24-42 here
        assert gray[inside].std() > 10.0
        far_outside = cv2.dilate(m, kernel) == 0
        assert (image[far_outside] == 255).all()  # white background
        ring = (cv2.dilate(m, kernel) > 0) & (m == 0)
        assert image[ring].mean() < 250  # anti-aliased edges blend into the background
