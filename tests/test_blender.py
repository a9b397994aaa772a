"""Blender / nerf_synthetic loader: OpenGL camera axes become OpenCV ones once, alpha becomes
the mask, the test split is held out; and the configs for the new formats load."""
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch

from process_data.base import pixel_directions
from process_data.blender import BlenderDataset, opengl_to_opencv
from process_data.loading import DatasetError
from utils.camera import project
from systems.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEIGHT, ANGLE_X = 40, 30, 0.8
POINT = np.array([0.3, 0.2, 0.5])  # Blender frame


def opengl_look_at(position, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Blender camera-to-world 4x4 (x right, y up, z backward) at position looking at target."""
    forward = np.asarray(target, float) - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    y_up = np.cross(-forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, y_up, -forward, position
    return c2w


def opengl_pixel(point, c2w) -> np.ndarray:
    """The pixel (pixel-centre coordinates) of a Blender-frame point, by OpenGL's own maths:
    p = R^T (X - C); the camera looks down -z, y up: u = cx + f x / -z, v = cy - f y / -z."""
    p = c2w[:3, :3].T @ (point - c2w[:3, 3])
    f = 0.5 * WIDTH / math.tan(0.5 * ANGLE_X)
    return np.array([(WIDTH - 1) / 2 + f * p[0] / -p[2], (HEIGHT - 1) / 2 - f * p[1] / -p[2]])


@pytest.fixture
def scene(tmp_path):
    """Two train and two test views; each image is transparent but for one opaque red pixel
    where POINT projects."""
    poses = {
        "train": [opengl_look_at(np.array([0.0, -4.0, 1.0]), [0.1, 0.0, 0.2]), opengl_look_at(np.array([3.0, 2.0, 2.0]), [0, 0, 0])],
        "test": [opengl_look_at(np.array([-3.0, 1.0, 0.5]), [0, 0, 0]), opengl_look_at(np.array([1.0, 3.5, -1.0]), [0, 0, 0.3])],
    }
    pixels = {}
    for split, c2ws in poses.items():
        os.makedirs(tmp_path / split)
        frames = []
        for i, c2w in enumerate(c2ws):
            u, v = np.round(opengl_pixel(POINT, c2w)).astype(int)
            assert 0 <= u < WIDTH and 0 <= v < HEIGHT
            image = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
            image[v, u] = (0, 0, 255, 255)  # BGRA: opaque red
            cv2.imwrite(str(tmp_path / split / f"r_{i}.png"), image)
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
            pixels[(split, i)] = opengl_pixel(POINT, c2w)
        with open(tmp_path / f"transforms_{split}.json", "w") as f:
            json.dump({"camera_angle_x": ANGLE_X, "frames": frames}, f)
    return str(tmp_path), pixels


def test_axes_flip_keeps_the_centre_and_a_right_handed_frame():
    c2w = opengl_look_at(np.array([0.0, -4.0, 0.0]), [0, 0, 0])[:3]
    cv = opengl_to_opencv(c2w)
    np.testing.assert_allclose(cv[:, 2], [0, 1, 0], atol=1e-12)  # z forward: towards the target
    np.testing.assert_allclose(cv[:, 1], [0, 0, -1], atol=1e-12)  # y down
    np.testing.assert_allclose(cv[:, 3], c2w[:, 3])
    assert np.linalg.det(cv[:, :3]) > 0


def test_known_point_projects_to_the_known_pixel(scene):
    """POINT seen by every view: the loaded camera's ray through its OpenGL pixel passes
    through it (normalised frame), world_mats project it there, and the alpha mask and the
    red pixel are where it was painted."""
    root, pixels = scene
    dataset = BlenderDataset(BlenderDataset.Config(root_dir=root, test_every=1, region_radius=1.5))
    views = dataset.views
    assert dataset.split == {"train": [0, 1], "test": [2, 3]}
    point_normalised = POINT / 1.5
    for view, key in enumerate([("train", 0), ("train", 1), ("test", 0), ("test", 1)]):
        u, v = pixels[key]
        d = pixel_directions(
            torch.tensor([u]), torch.tensor([v]), torch.from_numpy(views.intrinsics[view : view + 1]),
            torch.from_numpy(views.c2w[view : view + 1]),
        )[0].numpy()
        to_point = point_normalised - views.c2w[view, :, 3]
        assert to_point @ d > 0  # in front of the camera
        assert np.linalg.norm(to_point - (to_point @ d) * d) < 1e-6
        uv, depth = project(POINT[None], views.world_mats[view])
        np.testing.assert_allclose(uv[0], [u, v], atol=1e-6)
        assert depth[0] > 0
        mask = views.masks[view]
        iu, iv = np.round([u, v]).astype(int)
        assert mask[iv, iu] == 1.0 and mask.sum() == 1.0
        np.testing.assert_array_equal(views.images[view, iv, iu], [255, 0, 0])


def test_without_apply_mask_the_photos_are_on_white(scene):
    root, _ = scene
    dataset = BlenderDataset(BlenderDataset.Config(root_dir=root, apply_mask=False, test_split=""))
    assert dataset.split["test"] == [] and dataset.n_views == 2
    assert (dataset.views.images[dataset.views.masks == 0] == 255).all()


def test_missing_transforms_file_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="transforms_train.json not found"):
        BlenderDataset(BlenderDataset.Config(root_dir=str(tmp_path)))


@pytest.mark.parametrize("config, name", [("neus-custom.yaml", "dtu"), ("neus-colmap.yaml", "colmap"), ("neus-blender.yaml", "blender")])
def test_format_configs_load(config, name):
    """The configs build on their bases; a section naming another dataset replaces the base's."""
    conf = load_config(os.path.join(ROOT, "confs", config))
    assert conf.dataset.name == name
