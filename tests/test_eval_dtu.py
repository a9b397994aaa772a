"""scripts/eval_dtu.py on a synthetic DTU layout (written to tmp): a ground-truth sphere of radius
20 mm, predictions offset by 2 mm, a 4 mm ObsMask grid that leaves out the +x side (x - cx > 26).
Most tests thin the prediction at 0.4 mm instead of 0.2 to stay fast (KD-tree queries 2 mm off
a dense surface cost ~10 us each); the CLI test runs the defaults."""
import json
import os

import numpy as np
import pytest
import trimesh
from scipy.io import savemat
from scipy.spatial import cKDTree

from scripts.eval_dtu import (
    above_plane,
    downsample,
    evaluate,
    evaluate_points,
    greedy_thinning_mask,
    load_obs_mask,
    load_plane,
    load_stl,
    main,
    mask_points,
    mean_below,
    sample_mesh_grid,
)
from utils.metrics import sample_surface

SCAN = 7
CENTER = np.array([10.0, -20.0, 600.0])  # mm, away from the origin like DTU's frame
R_GT, GAP = 20.0, 2.0
DENSITY = 0.4  # thinning density of the fixtures
RES = 4.0
BB = np.stack([CENTER - 60, CENTER + 60])  # grid 31^3 voxels of 4 mm
X_OBS_MAX = 24.0  # ObsMask true for voxel centres with x - CENTER_x <= 24 (x index <= 21)


def icosphere(radius, center=CENTER, subdivisions=5):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(m.vertices) + center, np.asarray(m.faces)


def join(*meshes):
    vs, fs, n = [], [], 0
    for v, f in meshes:
        vs.append(v)
        fs.append(f + n)
        n += len(v)
    return np.concatenate(vs), np.concatenate(fs)


def voxel_centres():
    shape = np.round((BB[1] - BB[0]) / RES).astype(int) + 1
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return BB[0] + idx * RES  # [X, Y, Z, 3]


def write_dtu(root, obs_mask, plane):
    os.makedirs(os.path.join(root, "ObsMask"), exist_ok=True)
    os.makedirs(os.path.join(root, "Points", "stl"), exist_ok=True)
    obs = {"ObsMask": obs_mask, "BB": BB, "Res": np.array([[RES]])}
    savemat(os.path.join(root, "ObsMask", f"ObsMask{SCAN}_10.mat"), obs)
    savemat(os.path.join(root, "ObsMask", f"Plane{SCAN}.mat"), {"P": np.asarray(plane, dtype=np.float64).reshape(4, 1)})
    stl = sample_surface(*icosphere(R_GT), 40000, seed=11)  # ~8 points / mm^2
    trimesh.PointCloud(stl).export(os.path.join(root, "Points", "stl", f"stl{SCAN:03}_total.ply"))
    return root


PLANE_ALL = [0, 0, 1, -(CENTER[2] - 100)]  # every GT point above
PLANE_HALF = [0, 0, 1, -CENTER[2]]  # only the upper hemisphere (z > centre) above


@pytest.fixture(scope="module")
def dtu_dir(tmp_path_factory):
    obs = voxel_centres()[..., 0] - CENTER[0] <= X_OBS_MAX
    return write_dtu(str(tmp_path_factory.mktemp("dtu")), obs, PLANE_ALL)


@pytest.fixture(scope="module")
def gt(dtu_dir):
    obs_mask, bb, res = load_obs_mask(dtu_dir, SCAN)
    stl, plane = load_stl(dtu_dir, SCAN), load_plane(dtu_dir, SCAN)
    return {"stl": stl, "obs_mask": obs_mask, "bb": bb, "res": res, "plane": plane}


@pytest.fixture(scope="module")
def pred_down():
    """The prediction (sphere of radius 22) sampled and thinned as in steps 1-2."""
    return downsample(sample_mesh_grid(*icosphere(R_GT + GAP), DENSITY), DENSITY, seed=0)


@pytest.fixture(scope="module")
def base(pred_down, gt):
    return evaluate_points(pred_down, **gt)


# --- steps, one by one -----------------------------------------------------------------------


def test_grid_sampling_matches_the_per_triangle_definition():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(30, 3)) * 3
    f = rng.integers(0, 30, size=(40, 3))
    f[0] = [1, 1, 2]  # zero area: no grid points
    density = 0.4
    got = sample_mesh_grid(v, f, density)
    expected = [v]
    for a, b, c in f:
        v1, v2 = v[b] - v[a], v[c] - v[a]
        l1, l2, area2 = np.linalg.norm(v1), np.linalg.norm(v2), np.linalg.norm(np.cross(v1, v2))
        if area2 == 0:
            continue
        thr = density * np.sqrt(l1 * l2 / area2)
        n1, n2 = int(np.floor(l1 / thr)), int(np.floor(l2 / thr))
        for i in range(n1 + 1):
            for j in range(n2 + 1):
                s, t = (i + 0.5) / max(n1, 1e-7), (j + 0.5) / max(n2, 1e-7)
                if s + t < 1:
                    expected.append((v[a] + s * v1 + t * v2)[None])
    expected = np.concatenate(expected)
    assert got.shape == expected.shape
    assert np.allclose(got[np.lexsort(got.T)], expected[np.lexsort(expected.T)])


def test_grid_sampling_density_on_a_square():
    # 10 mm square, two right triangles with legs 10: thr = 0.2 * sqrt(100 / 100), n = 50,
    # pairs i + j < 49 -> 49 * 50 / 2 = 1225 per triangle, plus the 4 vertices
    v = np.array([[0, 0, 0], [10, 0, 0], [10, 10, 0], [0, 10, 0]], dtype=np.float64)
    pts = sample_mesh_grid(v, np.array([[0, 1, 3], [2, 3, 1]]), 0.2)
    assert len(pts) == 4 + 2 * 1225
    assert np.allclose(pts[:, 2], 0) and pts.min() >= 0 and pts.max() <= 10


def test_thinning_equals_the_sequential_loop_and_spaces_points():
    rng = np.random.default_rng(1)
    pts = rng.random((4000, 3))
    keep = np.ones(len(pts), dtype=bool)
    for cur, nbrs in enumerate(cKDTree(pts).query_ball_point(pts, 0.06)):
        if keep[cur]:
            keep[nbrs] = False
            keep[cur] = True
    assert np.array_equal(greedy_thinning_mask(pts, 0.06), keep)
    down = downsample(pts, 0.06, seed=0)
    assert cKDTree(down).query(down, k=2)[0][:, 1].min() > 0.06
    assert cKDTree(down).query(pts)[0].max() <= 0.06  # maximal: every dropped point has a kept one near
    assert np.array_equal(down, downsample(pts, 0.06, seed=0))


def test_mask_points_box_rounding_and_obs_mask():
    obs = np.zeros((3, 3, 3), dtype=bool)
    obs[1, 1, 1] = obs[2, 0, 0] = True
    bb = np.array([[0, 0, 0], [20, 20, 20]], dtype=np.float64)
    pts = np.array(
        [
            [10, 10, 10],  # voxel (1, 1, 1): kept
            [14.9, 6, 5.1],  # rounds to (1, 1, 1): kept
            [15.1, 10, 10],  # rounds to (2, 1, 1): masked out
            [20, -4.9, 4.9],  # rounds to (2, 0, 0)... -4.9 / 10 -> -0 -> 0: kept
            [-15, 10, 10],  # in the enlarged box (lower margin 60) but off the grid
            [-61, 10, 10],  # outside the box
            [139, 10, 10],  # inside the upper margin, 2 * 60
            [141, 10, 10],  # outside
        ]
    )
    data_in, data_in_obs = mask_points(pts, obs, bb, np.array([10.0]), patch_size=60)
    assert np.array_equal(data_in, pts[[0, 1, 2, 3, 4, 6]])
    assert np.array_equal(data_in_obs, pts[[0, 1, 3]])


def test_plane_and_mean_below():
    pts = np.array([[0, 0, 1.0], [0, 0, -1.0], [5, 5, 0.5]])
    assert np.array_equal(above_plane(pts, np.array([0, 0, 2, -1.0])), [True, False, False])  # 2 z - 1 > 0
    assert mean_below(np.array([1.0, 3.0, 20.0, 25.0, np.inf]), 20) == 2.0


# --- the protocol on the synthetic scan -------------------------------------------------------


def test_loaders_read_the_layout(gt):
    assert gt["obs_mask"].shape == (31, 31, 31) and gt["obs_mask"].dtype == bool
    assert gt["bb"].dtype == np.float32 and np.allclose(gt["bb"], BB) and np.allclose(gt["res"], RES)
    assert len(gt["stl"]) == 40000 and np.allclose(np.linalg.norm(gt["stl"] - CENTER, axis=1), R_GT, atol=0.05)


def test_offset_sphere_gives_the_gap(base):
    assert base["accuracy"] == pytest.approx(GAP, rel=0.03)
    assert base["completeness"] == pytest.approx(GAP, rel=0.03)
    assert base["overall"] == pytest.approx(GAP, rel=0.03)
    assert base["n_data_in_obs"] == base["n_data_in"] == base["n_data"]  # all inside the mask
    assert base["n_stl_above"] == base["n_stl"]
    json.dumps(base)


def test_points_outside_obs_mask_are_ignored(dtu_dir, gt, base):
    # a blob 8-16 mm from the GT (so within max_dist) but in voxels with x - cx > 26, which
    # ObsMask leaves out, and one 500 mm away, outside the enlarged box
    near = icosphere(4.0, CENTER + [32, 0, 0], 3)
    far = icosphere(4.0, CENTER + [500, 0, 0], 3)
    mesh = join(icosphere(R_GT + GAP), near, far)
    down = downsample(sample_mesh_grid(*mesh, DENSITY), DENSITY, seed=0)
    out = evaluate_points(down, **gt)
    # the shuffle differs from the fixture's, hence not bit-equal
    assert out["accuracy"] == pytest.approx(base["accuracy"], rel=0.005)
    assert out["completeness"] == pytest.approx(base["completeness"], rel=0.005)
    assert out["n_data_in_obs"] == pytest.approx(base["n_data_in_obs"], rel=0.005)
    assert out["n_data_in"] > out["n_data_in_obs"] + 500 and out["n_data"] > out["n_data_in"] + 500
    # the same points with an all-true ObsMask: the near blob now counts and moves accuracy
    gt_all = dict(gt, obs_mask=np.ones_like(gt["obs_mask"]))
    assert evaluate_points(down, **gt_all)["accuracy"] > 1.1 * base["accuracy"]


def test_distances_beyond_max_dist_are_excluded(pred_down, gt, base):
    # a blob above the GT sphere, 22-28 mm from it: inside ObsMask, beyond max_dist
    blob_mesh = icosphere(3.0, CENTER + [0, 0, 45], 3)
    blob = downsample(sample_mesh_grid(*blob_mesh, DENSITY), DENSITY, seed=1)
    data = np.concatenate([pred_down, blob])
    out = evaluate_points(data, **gt, max_dist=20)
    assert out["n_data_in_obs"] == len(data) and out["n_data_within_max_dist"] == len(pred_down)
    assert out["accuracy"] == pytest.approx(base["accuracy"], rel=1e-9)
    wide = evaluate_points(data, **gt, max_dist=40)
    d_blob = cKDTree(gt["stl"]).query(blob)[0]
    assert d_blob.min() > 20 and d_blob.max() < 40
    expected = (base["accuracy"] * len(pred_down) + d_blob.sum()) / len(data)
    assert wide["accuracy"] == pytest.approx(expected, rel=1e-6)


def test_completeness_is_restricted_to_points_above_the_plane(tmp_path, gt):
    # prediction: only the upper hemisphere, so the lower half of the GT is missed
    v, f = icosphere(R_GT + GAP)
    f = f[(v[f][:, :, 2] >= CENTER[2] - 1e-9).all(axis=1)]
    used = np.unique(f)  # eval.py samples every vertex, used by a face or not: drop the others
    upper = v[used], np.searchsorted(used, f)
    down = downsample(sample_mesh_grid(*upper, DENSITY), DENSITY, seed=0)
    all_above = evaluate_points(down, **gt)
    assert all_above["completeness"] > 2 * GAP  # the missed half counts (up to max_dist)
    half = evaluate_points(down, **dict(gt, plane=np.array(PLANE_HALF, dtype=np.float64)))
    assert half["n_stl_above"] == pytest.approx(len(gt["stl"]) / 2, rel=0.03)
    assert half["completeness"] == pytest.approx(GAP, rel=0.03)
    assert half["accuracy"] == all_above["accuracy"] == pytest.approx(GAP, rel=0.03)
    # and through the files: Plane{scan}.mat is what selects them
    root = write_dtu(str(tmp_path), gt["obs_mask"], PLANE_HALF)
    assert evaluate(upper, SCAN, root, downsample_density=DENSITY)["completeness"] == pytest.approx(GAP, rel=0.03)


def test_cli_mesh_and_pcd_modes(dtu_dir, tmp_path, capsys):
    mesh_path = str(tmp_path / "pred.ply")
    trimesh.Trimesh(*icosphere(R_GT + GAP), process=False).export(mesh_path)
    out_json = str(tmp_path / "res" / "scan.json")
    argv = ["--mesh", mesh_path, "--scan", str(SCAN), "--dtu_dir", dtu_dir, "--out_json", out_json]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "accuracy:" in printed and "completeness:" in printed and "overall:" in printed
    with open(out_json) as f:
        res = json.load(f)
    for key in ("accuracy", "completeness", "overall"):
        assert res[key] == pytest.approx(GAP, rel=0.03)
    assert res["scan"] == SCAN and res["mode"] == "mesh" and res["max_dist"] == 20.0
    # pcd mode: the points are taken as they are (then thinned)
    pcd_path = str(tmp_path / "pred_pcd.ply")
    trimesh.PointCloud(sample_surface(*icosphere(R_GT + GAP), 60000, seed=5)).export(pcd_path)
    argv = ["--mesh", pcd_path, "--mode", "pcd", "--scan", str(SCAN), "--dtu_dir", dtu_dir, "--max_dist", "20"]
    assert main(argv) == 0
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert float(lines["overall"]) == pytest.approx(GAP, rel=0.03)


def test_completeness_uses_the_points_in_the_box_not_only_those_in_obs_mask(pred_down, gt, base):
    # as eval.py: accuracy is over data_in_obs, completeness is towards data_in
    out = evaluate_points(pred_down, **dict(gt, obs_mask=np.zeros_like(gt["obs_mask"])))
    assert out["n_data_in_obs"] == 0 and np.isnan(out["accuracy"])
    assert out["completeness"] == base["completeness"]
