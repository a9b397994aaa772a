"""The region of interest of a COLMAP scene (the unit sphere of the normalised frame)."""
import numpy as np

from process_data.colmap import automatic_region, bounding_sphere, normalised_poses, scale_matrix
from utils.camera import look_at


def test_bounding_sphere_is_neus_rule():
    """Centre: middle of the bounding box; radius: farthest point from it."""
    points = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    centre, radius = bounding_sphere(points)
    np.testing.assert_allclose(centre, [1.0, 0.5, 0.0])
    assert abs(radius - np.hypot(1.0, 0.5)) < 1e-12


def test_automatic_region_ignores_stray_points():
    """Cameras at distance 4 around (1, 1, 1) looking at it; object points on a sphere of
    radius 0.5 seen by 6 views; stray points far away seen by 2 and one seen by many but
    50 away -> centre (1, 1, 1), radius 0.5 * margin."""
    rng = np.random.default_rng(0)
    target = np.array([1.0, 1.0, 1.0])
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    c2w = np.stack([look_at(target + [4 * np.cos(a), 4 * np.sin(a), 1.0], target, np.array([0.0, 0.0, 1.0])) for a in angles])
    directions = rng.normal(size=(300, 3))
    object_points = target + 0.5 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    stray = target + rng.uniform(-20, 20, size=(100, 3))
    points = np.concatenate([object_points, stray, [target + [50.0, 0, 0]]])
    tracks = np.concatenate([np.full(300, 6), np.full(100, 2), [9]])
    centre, radius = automatic_region(c2w, points, tracks, margin=1.1)
    np.testing.assert_allclose(centre, target, atol=1e-9)
    assert abs(radius - 0.55) < 1e-6


def test_normalised_poses_put_the_region_on_the_unit_sphere():
    c2w = look_at(np.array([5.0, 0.0, 2.0]), np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 1.0]))[None]
    out = normalised_poses(c2w, scale_matrix(np.array([1.0, 0.0, 2.0]), 2.0))
    np.testing.assert_allclose(out[0, :, 3], [2.0, 0.0, 0.0])
    np.testing.assert_allclose(out[0, :, :3], c2w[0, :, :3])
