"""utils/triangulate.py: points from matched pixels of cameras whose poses are known."""
import numpy as np
from torch.testing import assert_close

from utils.camera import look_at, project
from utils.triangulate import (
    epipolar_distances,
    fundamental_matrix,
    neighbour_pairs,
    projection_matrices,
    sparse_points,
    triangulate,
)

K = np.array([[100.0, 0.0, 64.0], [0.0, 100.0, 48.0], [0.0, 0.0, 1.0]])


def stereo_pair():
    """Two cameras looking along +z, the second 1 to the right (x) of the first -> c2w [2, 3, 4]"""
    c2w = np.zeros((2, 3, 4))
    c2w[:, :, :3] = np.eye(3)
    c2w[1, 0, 3] = 1.0
    return c2w


def test_projection_matrices_by_hand():
    """P = K [R^T | -R^T c]: the point (1, 0, 5) lies on the second camera's axis (pixel
    (64, 48), depth 5) and 1 right of the first's (pixel 64 + 100 / 5 = 84)."""
    p = projection_matrices(np.stack([K, K]), stereo_pair())
    uv, depth = project(np.array([[1.0, 0.0, 5.0]]), p[0])
    assert_close(uv, np.array([[84.0, 48.0]]))
    assert_close(depth, np.array([5.0]))
    uv, depth = project(np.array([[1.0, 0.0, 5.0]]), p[1])
    assert_close(uv, np.array([[64.0, 48.0]]))


def test_triangulate_recovers_points_and_epipolar_distance_by_hand():
    """Projected points come back exactly. The pair is rectified (epipolar lines are the image
    rows), so a match moved 3 px down lies 3 px from its line and one moved along the row 0."""
    p = projection_matrices(np.stack([K, K]), stereo_pair())
    points = np.array([[0.2, -0.3, 4.0], [1.5, 0.4, 6.0], [-0.7, 0.1, 3.0]])
    x1, _ = project(points, p[0])
    x2, _ = project(points, p[1])
    assert_close(triangulate(p[0], p[1], x1, x2), points)
    f = fundamental_matrix(p[0], p[1])
    assert_close(epipolar_distances(f, x1, x2), np.zeros(3), atol=1e-9, rtol=0)
    assert_close(epipolar_distances(f, x1, x2 + np.array([0.0, 3.0])), np.full(3, 3.0))
    assert_close(epipolar_distances(f, x1, x2 + np.array([7.0, 0.0])), np.zeros(3), atol=1e-9, rtol=0)


def test_neighbour_pairs_by_hand():
    """Cameras at x = 0, 1, 2, 10: each with its nearest (camera 1's tie goes to camera 0)."""
    centres = np.array([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [10.0, 0, 0]])
    assert neighbour_pairs(centres, 1) == [(0, 1), (1, 2), (2, 3)]
    assert neighbour_pairs(centres, 3) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_sparse_points_lie_on_the_textured_plane():
    """Six cameras 30 degrees apart on a ring, looking down at a textured plane z = 0 (smoothed
    noise, rendered per view by the plane's homography): the points triangulated from their
    SIFT matches lie on it (|z| under 0.02 for 95% of them, median under 0.005), within the
    textured square or on its border, and there are many of them."""
    import cv2

    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.random((512, 512)).astype(np.float32), (0, 0), 3)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)  # [512, 512]
    side = 2.0  # the texture covers [-1, 1]^2 of the plane z = 0
    k = np.array([[300.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]])
    angles = np.radians(np.arange(6) * 30.0)
    c2w = np.stack([look_at(np.array([1.5 * np.cos(a), 1.5 * np.sin(a), 2.5]), np.zeros(3), np.array([0.0, 0.0, 1.0]))
                    for a in angles])
    p = projection_matrices(np.stack([k] * 6), c2w)
    # texture pixel (u, v) is the world point (u / 512 * side - 1, v / 512 * side - 1, 0)
    to_world = np.array([[side / 512, 0, -1], [0, side / 512, -1], [0, 0, 1]])
    images = np.stack([cv2.warpPerspective(texture, p[i][:, [0, 1, 3]] @ to_world, (320, 240)) for i in range(6)])
    points = sparse_points(images, np.stack([k] * 6), c2w)
    assert len(points) > 200
    assert np.quantile(np.abs(points[:, 2]), 0.95) < 0.02 and np.median(np.abs(points[:, 2])) < 0.005
    assert np.abs(points[:, :2]).max() < 1.1  # the square's border against black gives corners too
