"""Known answers for the mesh metrics in utils/metrics.py (sampling, Chamfer, F-score)."""
import json
import math

import numpy as np
import pytest
import trimesh

from utils.metrics import chamfer_distance, f_score, face_normals, mesh_metrics, sample_surface, signed_offsets

SQUARE_V = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=np.float64)
SQUARE_F = np.array([[0, 1, 2], [0, 2, 3]])


def square(z):
    return SQUARE_V + [0, 0, z], SQUARE_F


def sphere(radius, subdivisions=4):
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def test_sample_surface_is_on_the_mesh_uniform_and_seeded():
    v = np.array([[0, 0, 0], [2, 0, 0], [2, 1, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=np.float64)
    # a 2 x 1 rectangle in z = 0 (area 2) and a 1 x 1 square in x = 0 (area 1)
    f = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 5], [0, 5, 4]])
    pts = sample_surface(v, f, 30000, seed=3)
    assert pts.shape == (30000, 3)
    on_floor = np.isclose(pts[:, 2], 0)
    on_wall = np.isclose(pts[:, 0], 0)
    assert (on_floor | on_wall).all() and pts.min() >= 0 and pts[:, 0].max() <= 2 and pts[:, 1:].max() <= 1
    assert on_floor.mean() == pytest.approx(2 / 3, abs=0.01)  # area weighted
    floor = pts[on_floor & ~on_wall]
    assert (floor[:, 0] < 1).mean() == pytest.approx(0.5, abs=0.015)  # uniform inside the rectangle
    assert np.array_equal(pts, sample_surface(v, f, 30000, seed=3))
    assert not np.array_equal(pts, sample_surface(v, f, 30000, seed=4))
    assert sample_surface(v, np.zeros((0, 3), int), 10, 0).shape == (0, 3)


@pytest.mark.parametrize("d", [0.05, 0.2])
def test_parallel_squares_chamfer_is_the_offset(d):
    a = sample_surface(*square(0.0), 40000, seed=0)
    b = sample_surface(*square(d), 40000, seed=1)
    out = chamfer_distance(a, b)
    # nearest point lies (almost) straight across: sqrt(d^2 + s^2), s ~ sample spacing 0.005
    assert out["accuracy"] == pytest.approx(d, rel=0.02)
    assert out["completeness"] == pytest.approx(d, rel=0.02)
    assert out["chamfer"] == pytest.approx(d, rel=0.02)
    assert all(isinstance(x, float) for x in out.values())


def test_max_dist_clips_each_distance_before_the_mean():
    a = sample_surface(*square(0.0), 5000, seed=0)
    b = sample_surface(*square(0.1), 5000, seed=1)
    out = chamfer_distance(a, b, max_dist=0.05)
    assert out["accuracy"] == pytest.approx(0.05) and out["completeness"] == pytest.approx(0.05)
    # clipping only a far outlier: one point at distance 10 among n points at ~0.1
    far = np.concatenate([a, [[0.5, 0.5, 10.1]]])
    unclipped = chamfer_distance(far, b)["accuracy"]
    clipped = chamfer_distance(far, b, max_dist=1.0)["accuracy"]
    base = chamfer_distance(a, b)["accuracy"]
    assert unclipped == pytest.approx((base * len(a) + 10.0) / len(far), rel=1e-3)
    assert clipped == pytest.approx((base * len(a) + 1.0) / len(far), rel=1e-3)


def test_chamfer_of_hand_made_point_sets():
    pred = np.array([[0.0, 0, 0], [3.0, 0, 0]])
    gt = np.array([[0.0, 0, 1], [0.0, 0, 2], [0.0, 0, 4]])
    out = chamfer_distance(pred, gt)
    # pred -> gt: 1, sqrt(9 + 1);  gt -> pred: 1, 2, 4
    assert out["accuracy"] == pytest.approx((1 + math.sqrt(10)) / 2)
    assert out["completeness"] == pytest.approx(7 / 3)
    assert out["chamfer"] == pytest.approx(((1 + math.sqrt(10)) / 2 + 7 / 3) / 2)
    fs = f_score(pred, gt, threshold=2.5)  # precision 1/2, recall 2/3
    assert fs["precision"] == pytest.approx(0.5) and fs["recall"] == pytest.approx(2 / 3)
    assert fs["fscore"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_concentric_spheres_chamfer_is_the_radius_gap():
    r, d = 1.0, 0.05
    out = mesh_metrics(*sphere(r), *sphere(r + d), n_points=100000, threshold=0.1, seed=0)
    assert out["accuracy"] == pytest.approx(d, rel=0.03)
    assert out["completeness"] == pytest.approx(d, rel=0.03)
    assert out["chamfer"] == pytest.approx(d, rel=0.03)
    assert out["fscore"] == 1.0
    json.dumps(out)  # plain numbers
    # every distance is >= d (less the facets' sagitta, ~4e-4 r)
    inner, outer = sample_surface(*sphere(r), 20000, 0), sample_surface(*sphere(r + d), 20000, 1)
    assert f_score(inner, outer, threshold=0.045)["fscore"] == 0.0


def test_f_score_threshold_above_and_below_the_offset():
    a = sample_surface(*square(0.0), 20000, seed=0)
    b = sample_surface(*square(0.1), 20000, seed=1)
    above = f_score(a, b, threshold=0.15)
    assert above == {"precision": 1.0, "recall": 1.0, "fscore": 1.0}
    below = f_score(a, b, threshold=0.09)
    assert below == {"precision": 0.0, "recall": 0.0, "fscore": 0.0}
    # half of pred is on the gt square, half 1 away: P = 1/2, R = 1, F = 2/3
    half = np.concatenate([a[:10000], a[10000:] + [0, 0, 1.1]])
    out = f_score(half, b, threshold=0.15)
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == 1.0
    assert out["fscore"] == pytest.approx(2 / 3)


def test_identical_meshes_give_about_zero_and_f_one():
    n = 100000
    out = mesh_metrics(*sphere(1.0), *sphere(1.0), n_points=n, threshold=0.03, seed=0)
    # independent uniform samples of one surface: only the gap to the nearest sample remains,
    # for a planar Poisson process of density lam = n / area its mean is 1 / (2 sqrt(lam))
    lam = n / (4 * math.pi)
    assert out["chamfer"] == pytest.approx(0.5 / math.sqrt(lam), rel=0.05)
    # P(gap >= 0.03) = exp(-lam pi 0.03^2) ~ 2e-10
    assert out["fscore"] == 1.0
    exact = chamfer_distance(sample_surface(*sphere(1.0), 1000, 0), sample_surface(*sphere(1.0), 1000, 0))
    assert exact == {"accuracy": 0.0, "completeness": 0.0, "chamfer": 0.0}


def test_empty_prediction():
    gt = sample_surface(*square(0.0), 100, seed=0)
    out = chamfer_distance(np.zeros((0, 3)), gt, max_dist=2.0)
    assert math.isnan(out["accuracy"]) and out["completeness"] == 2.0
    assert f_score(np.zeros((0, 3)), gt, 0.1) == {"precision": 0.0, "recall": 0.0, "fscore": 0.0}


def test_signed_offsets_by_hand():
    # the unit square in z = 0, wound counter-clockwise seen from +z: its normal is +z
    assert np.array_equal(face_normals(SQUARE_V, SQUARE_F), [[0, 0, 1], [0, 0, 1]])
    surface = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    normals = np.array([[0.0, 0, 1], [0.0, 0, 1]])
    points = np.array([[0.0, 0, 0.5], [1.0, 0, -0.25], [0.9, 0, 0.0], [0.0, 3.0, -4.0]])
    # nearest sample, then the distance to its tangent plane: +0.5, -0.25, 0 (beside it in the
    # plane: 0.1 away from the sample, but on the surface), -4 (5 from the sample, 4 below its plane)
    got = signed_offsets(points, surface, normals)
    np.testing.assert_allclose(got, [0.5, -0.25, 0.0, -4.0])


@pytest.mark.parametrize("d", [-0.04, 0.03])
def test_a_shrunk_or_grown_sphere_shows_its_offset_and_side(d):
    """Predicted sphere of radius 1 + d against the true radius 1: the unsigned Chamfer is |d| either
    way, the median signed offset is d and the share inside is 1 (shrunk) or 0 (grown)."""
    out = mesh_metrics(*sphere(1.0 + d), *sphere(1.0), n_points=50000, threshold=0.1, seed=0)
    assert out["chamfer"] == pytest.approx(abs(d), rel=0.05)
    assert out["offset_median"] == pytest.approx(d, rel=0.05)
    assert out["inside_fraction"] == (1.0 if d < 0 else 0.0)
    # the faces wound the other way round flip the sign: the true mesh must be wound outward
    v, f = sphere(1.0)
    flipped = mesh_metrics(*sphere(1.0 + d), v, f[:, ::-1], n_points=50000, threshold=0.1, seed=0)
    assert flipped["offset_median"] == pytest.approx(-d, rel=0.05)
