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


def similarity_transform(source: np.ndarray, target: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray]:
    """The similarity that best maps source points onto target points (Umeyama 1991), least
    squares: argmin_{s, R, t} sum_i |target_i - (s R source_i + t)|^2.

    With centred points a_i = source_i - mean(source), b_i = target_i - mean(target),
    U D V^T = SVD(sum_i b_i a_i^T / N), S = diag(1, 1, det(U V^T)):
    R = U S V^T, s = trace(D S) / (sum_i |a_i|^2 / N), t = mean(target) - s R mean(source).
    source, target [N, 3] (N >= 3, not collinear) -> s, R [3, 3], t [3]"""
    mu_a, mu_b = source.mean(0), target.mean(0)
    a, b = source - mu_a, target - mu_b  # [N, 3]
    U, D, Vt = np.linalg.svd(b.T @ a / len(a))
    S = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ S @ Vt
    s = float(np.trace(np.diag(D) @ S) / (a * a).sum(1).mean())
    return s, R, mu_b - s * R @ mu_a


def aligned_pose_errors(c2w: np.ndarray, c2w_true: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Tuple]:
    """Errors of estimated camera poses against the true ones after aligning the estimated
    centres to the true centres by a similarity (similarity_transform): the frames of two
    reconstructions agree only up to scale, rotation and translation.

    Rotation error of view i: the angle of R_true_i^T (R R_i) (R_i, R_true_i camera-to-world).
    Centre error of view i: |s R c_i + t - c_true_i| as a fraction of the camera distance,
    the mean distance of the true centres from the point their optical axes meet
    (axes_meeting_point).
    c2w, c2w_true [N, 3, 4] -> rotation errors [N] degrees, centre errors [N] as fractions of
    the camera distance, (s, R, t)."""
    s, R, t = similarity_transform(c2w[:, :, 3], c2w_true[:, :, 3])
    rotations = np.einsum("ij,njk->nik", R, c2w[:, :, :3])  # [N, 3, 3]
    relative = np.einsum("nji,njk->nik", c2w_true[:, :, :3], rotations)  # [N, 3, 3]
    cos = np.clip((np.trace(relative, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    centres = s * c2w[:, :, 3] @ R.T + t  # [N, 3]
    target = axes_meeting_point(c2w_true)
    distance = np.linalg.norm(c2w_true[:, :, 3] - target, axis=1).mean()
    return np.degrees(np.arccos(cos)), np.linalg.norm(centres - c2w_true[:, :, 3], axis=1) / distance, (s, R, t)


def axes_meeting_point(c2w: np.ndarray) -> np.ndarray:
    """The point nearest to all optical axes (least squares), where cameras that look at an
    object meet: argmin_x sum_i |(I - d_i d_i^T)(x - c_i)|^2, so
    x = (sum_i I - d_i d_i^T)^-1 sum_i (I - d_i d_i^T) c_i, with centres c_i and unit
    forward axes d_i (OpenCV: the third column of camera-to-world).
    c2w [N, 3, 4] -> [3]; near-parallel axes (a forward-facing capture) have no meeting point
    and give the least-squares solution of smallest norm."""
    d = c2w[:, :, 2] / np.linalg.norm(c2w[:, :, 2], axis=1, keepdims=True)  # [N, 3]
    projectors = np.eye(3) - d[:, :, None] * d[:, None, :]  # [N, 3, 3]
    A = projectors.sum(0)
    b = np.einsum("nij,nj->i", projectors, c2w[:, :, 3])
    return np.linalg.lstsq(A, b, rcond=1e-6)[0]
