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
    """A circle fitted to the input cameras (mean height along their mean up vector, mean
    distance from that axis), looking at the origin of the normalised frame.
    c2w [N, 3, 4] -> [n_frames, 3, 4]"""
    centres = c2w[:, :, 3]  # [N, 3]
    up = -c2w[:, :, 1].mean(0)  # OpenCV y points down
    up = up / np.linalg.norm(up)
    heights = centres @ up  # [N]
    radial = centres - heights[:, None] * up  # [N, 3]
    radius = np.linalg.norm(radial, axis=1).mean()
    e1 = radial[0] / np.linalg.norm(radial[0])
    e2 = np.cross(up, e1)
    angles = np.linspace(0.0, 2.0 * np.pi, n_frames, endpoint=False)
    positions = heights.mean() * up + radius * (np.cos(angles)[:, None] * e1 + np.sin(angles)[:, None] * e2)
    return np.stack([look_at(p, np.zeros(3), up) for p in positions])
