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
