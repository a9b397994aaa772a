"""Pinhole-camera helpers shared by loaders and mesh tools (OpenCV axes, pixel centres at
integer coordinates)."""
from typing import Tuple

import numpy as np


def downscale_matrix(factor: float) -> np.ndarray:
    """S [3, 3] with S @ K (or S @ K[R|t]) the camera of an image downscaled by `factor`:
    u' = (u + 0.5) / factor - 0.5 (pixel centres stay at integers)."""
    shift = 0.5 / factor - 0.5
    return np.array([[1 / factor, 0, shift], [0, 1 / factor, shift], [0, 0, 1]])


def project(points_world: np.ndarray, world_mat: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pixels of world points through P = K [R | t] ([3, 4] or [4, 4]): points [N, 3] ->
    uv [N, 2], depth [N]"""
    homo = np.concatenate([points_world, np.ones((len(points_world), 1))], axis=1) @ world_mat[:3, :4].T
    depth = homo[:, 2]
    return homo[:, :2] / depth[:, None], depth


def look_at(position: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Camera-to-world [3, 4] (OpenCV axes: x right, y down, z forward) at `position` looking
    at `target`, with `up` the world direction that should appear upwards."""
    forward = target - position
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    right = right / np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward, position], axis=1)


def orbit_poses(c2w: np.ndarray, n_frames: int) -> np.ndarray:
    """A circle fitted to the input cameras, looking at the origin of the normalised frame.

    The circle's axis is the normal of the plane that best fits the camera centres (least
    squares), through the origin: cameras all around an object give a horizontal ring at
    their mean height, a DTU-like cap of cameras a ring around the cap's axis, so the orbit
    stays where the scene was seen. Its radius is the cameras' mean distance from the axis;
    the image's up is the cameras' mean up direction.
    c2w [N, 3, 4] -> [n_frames, 3, 4]"""
    centres = c2w[:, :, 3]  # [N, 3]
    up = -c2w[:, :, 1].mean(0)  # OpenCV y points down
    up = up / np.linalg.norm(up)
    mean = centres.mean(0)
    axis = np.linalg.svd(centres - mean)[2][-1]  # [3] normal of the best-fit plane
    reference = mean if np.linalg.norm(mean) > 1e-3 * np.linalg.norm(centres, axis=1).mean() else up
    axis = axis if axis @ reference >= 0 else -axis
    heights = centres @ axis  # [N]
    radial = centres - heights[:, None] * axis  # [N, 3]
    radius = np.linalg.norm(radial, axis=1).mean()
    e1 = radial.mean(0) if np.linalg.norm(radial.mean(0)) > 1e-6 * radius else radial[0]
    e1 = e1 / np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    angles = np.linspace(0.0, 2.0 * np.pi, n_frames, endpoint=False)
    positions = heights.mean() * axis + radius * (np.cos(angles)[:, None] * e1 + np.sin(angles)[:, None] * e2)
    return np.stack([look_at(p, np.zeros(3), up) for p in positions])
