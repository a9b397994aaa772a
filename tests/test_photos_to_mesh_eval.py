"""scripts/photos_to_mesh_eval.py's alignment and scoring on a synthetic case (no SfM): a true
scene (6 cameras on a ring, masks = the silhouettes of a box), an "SfM" scene that is the
same cameras in another frame (a known similarity) with one photo not registered, and the box
mesh in that frame. Mapped back, the mesh must cover the true masks exactly."""
import importlib.util
import json
import os

import cv2
import numpy as np
import trimesh

from tests.conftest import ROOT
from utils.camera import look_at
from utils.mesh import rasterize_silhouette

W, H, N = 40, 30, 6
SCRIPT = os.path.join(ROOT, "scripts", "photos_to_mesh_eval.py")


def load_script():
    spec = importlib.util.spec_from_file_location("photos_to_mesh_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rotation(axis, angle):
    return cv2.Rodrigues(np.asarray(axis, np.float64) / np.linalg.norm(axis) * angle)[0]


def true_world_mats():
    K = np.array([[40.0, 0, (W - 1) / 2], [0, 40.0, (H - 1) / 2], [0, 0, 1]])
    mats = []
    for i in range(N):
        angle = 2 * np.pi * i / N
        c2w = look_at(np.array([300 * np.cos(angle), 300 * np.sin(angle), 120.0]), np.array([0, 0, 20.0]),
                      np.array([0, 0, 1.0]))
        R = c2w[:, :3].T
        world_mat = np.eye(4)
        world_mat[:3, :4] = K @ np.concatenate([R, -(R @ c2w[:, 3])[:, None]], axis=1)
        mats.append(world_mat)
    return mats


def test_alignment_and_silhouette_score_on_a_known_similarity(tmp_path):
    script = load_script()
    box = trimesh.creation.box(extents=(60.0, 40.0, 50.0))
    box.apply_translation([5.0, -3.0, 25.0])  # the object, true frame (millimetres, as DTU)
    mats = true_world_mats()
    scene, work = tmp_path / "scene", tmp_path / "work"
    for folder in (scene / "image", scene / "mask", work / "images"):
        os.makedirs(folder)
    for i, world_mat in enumerate(mats):
        silhouette = rasterize_silhouette(box.vertices, box.faces, world_mat, (W, H))
        cv2.imwrite(str(scene / "mask" / f"{i:03d}.png"), silhouette.astype(np.uint8) * 255)
        cv2.imwrite(str(scene / "image" / f"{i:06d}.png"), np.full((H, W, 3), 128, np.uint8))
        cv2.imwrite(str(work / "images" / f"{i:06d}.jpg"), np.full((H, W, 3), 128, np.uint8))
    np.savez(scene / "cameras_sphere.npz", **{f"world_mat_{i}": m for i, m in enumerate(mats)},
             **{f"scale_mat_{i}": np.diag([100.0, 100, 100, 1]) for i in range(N)})
    # the SfM frame: X_true = s R X_sfm + t; its world_mats are P_true @ T with T that similarity
    s, R, t = 37.0, rotation([0.3, -1.0, 0.5], 1.1), np.array([12.0, -40.0, 7.0])
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = s * R, t
    registered = [f"{i:06d}.jpg" for i in range(N) if i != 3]  # photo 3 did not register
    work_mats = {f"world_mat_{v}": mats[int(name[:6])] @ T for v, name in enumerate(registered)}
    np.savez(work / "cameras_sphere.npz", **work_mats)
    with open(work / "gen_cameras.json", "w") as f:
        json.dump({"views": registered}, f)
    sfm_box = box.copy()
    sfm_box.apply_transform(np.linalg.inv(T))
    mesh_path = str(tmp_path / "mesh.ply")
    sfm_box.export(mesh_path)

    assert script.true_view_indices(registered, sorted(os.listdir(scene / "image"))) == [0, 1, 2, 4, 5]
    s_est, R_est, t_est, (residual_max, _) = script.align_to_truth(
        dict(np.load(work / "cameras_sphere.npz")), registered, dict(np.load(scene / "cameras_sphere.npz")),
        sorted(os.listdir(work / "images")))
    np.testing.assert_allclose(s_est, s, rtol=1e-6)
    np.testing.assert_allclose(R_est, R, atol=1e-6)
    np.testing.assert_allclose(t_est, t, atol=1e-4)
    assert residual_max < 1e-6

    result = script.score(str(scene), str(work), mesh_path, downscale=1.0)
    assert result["silhouette_iou_views"] == N  # all views, the unregistered one too
    assert result["silhouette_iou_min"] > 0.99
    # the mesh left in the SfM frame scores nothing: the alignment is what makes it fit
    from utils.mesh import silhouette_iou
    from process_data.dtu import load_neus_scene

    views = load_neus_scene(str(scene), "cameras_sphere.npz", 1.0, use_masks=True)
    assert np.mean(silhouette_iou(sfm_box.vertices, sfm_box.faces, views.world_mats, views.masks)) < 0.5
