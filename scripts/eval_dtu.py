r"""DTU MVS 2014 surface evaluation (accuracy / completeness / overall, in mm) of a mesh or point
cloud in the DTU world frame, following the public python port of the official MATLAB script
(jzhangbs/DTUeval-python, eval.py).

    python -m scripts.eval_dtu --mesh outputs/.../save/it020000-mc512.ply --scan 24 \
        --dtu_dir ../shared/data/DTU_eval [--mode mesh|pcd] [--out_json scan24.json]

dtu_dir holds the official ground truth ("Points" and "SampleSet" downloads):

    <dtu_dir>/Points/stl/stl024_total.ply      ground-truth point cloud (mm)
    <dtu_dir>/ObsMask/ObsMask24_10.mat         ObsMask [X, Y, Z] bool, BB [2, 3], Res [1, 1]
    <dtu_dir>/ObsMask/Plane24.mat              P [4] ground plane (kept side: [p, 1] . P > 0)

Protocol (each step as in eval.py; differences are marked "deviation"):
 1. mesh mode: every triangle of non-zero area is sampled on its barycentric grid: with
    l1 = |v1|, l2 = |v2| (edges from vertex 0), area2 = |v1 x v2|,
    thr = density * sqrt(l1 l2 / area2), n1 = floor(l1 / thr), n2 = floor(l2 / thr), the points
    v0 + a v1 + b v2 for a = (i + 0.5) / n1, b = (j + 0.5) / n2, i <= n1, j <= n2, a + b < 1;
    the mesh's vertices are added. (About one point per density^2 of area.) pcd mode takes the
    file's points as they are. Deviation: vectorised over triangles with the same (n1, n2)
    instead of a multiprocessing pool, so the points come in another order -- which the
    random shuffle of step 2 makes irrelevant.
 2. The points are shuffled, then thinned greedily in that order: a point is kept unless an
    earlier kept point lies within `density` (<=) of it, so no two kept points are closer than
    the density. eval.py does this with sklearn radius_neighbors and a python loop; here
    scipy cKDTree.query_pairs and a vectorised fixed-point of the same rule (identical result
    for the same order). Deviation: the shuffle is seeded (--seed, default 0) instead of
    unseeded, so that runs repeat; eval.py's README puts the spread from the shuffle at ~0.01 %.
 3. ObsMask{scan}_10.mat: points with BB[0] - patch <= p < BB[1] + 2 * patch on all three axes
    are "data_in" (the upper margin is twice the lower one in eval.py; kept as is, BB is cast
    to float32 as there). Of these, the points whose voxel round((p - BB[0]) / Res) (numpy
    round-half-to-even) lies inside the grid and is true in ObsMask are "data_in_obs".
 4. Accuracy: for every data_in_obs point the distance to the nearest ground-truth point;
    mean over the distances < max_dist.
 5. Completeness: ground-truth points with [p, 1] . P > 0 (Plane{scan}.mat, key P); for each
    the distance to the nearest data_in point -- eval.py uses the points inside the enlarged
    box, not only those inside ObsMask, and so does this script; mean over distances < max_dist.
 6. overall = (accuracy + completeness) / 2.
Nearest-neighbour queries use cKDTree with distance_upper_bound = max_dist (the distances at or
beyond it are dropped by step 4/5 anyway). Files are read with scipy.io.loadmat and trimesh.
"""
import argparse
import json
import os
import sys
from typing import Optional, Tuple

import numpy as np
import trimesh
from scipy.io import loadmat
from scipy.spatial import cKDTree


def sample_mesh_grid(vertices: np.ndarray, faces: np.ndarray, density: float, chunk: int = 2_000_000) -> np.ndarray:
    """Step 1: the mesh's vertices followed by the barycentric grid points of each triangle
    with non-zero area (see the module docstring for the grid). vertices [V, 3], faces [F, 3]
    -> points [V + S, 3] float64. `chunk` bounds the points built at once."""
    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    tri = vertices[faces]  # [F, 3, 3]
    v1 = tri[:, 1] - tri[:, 0]
    v2 = tri[:, 2] - tri[:, 0]
    l1 = np.linalg.norm(v1, axis=-1)
    l2 = np.linalg.norm(v2, axis=-1)
    area2 = np.linalg.norm(np.cross(v1, v2), axis=-1)
    ok = area2 > 0
    tri, v1, v2, l1, l2, area2 = tri[ok], v1[ok], v2[ok], l1[ok], l2[ok], area2[ok]
    thr = density * np.sqrt(l1 * l2 / area2)
    n12 = np.stack([np.floor(l1 / thr), np.floor(l2 / thr)], axis=-1).astype(np.int64)  # [F', 2]
    out = [vertices]
    if len(n12):
        groups, inverse = np.unique(n12, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        starts = np.searchsorted(inverse[order], np.arange(len(groups) + 1))
        for g, (n1, n2) in enumerate(groups):
            if n1 == 0 or n2 == 0:  # eval.py divides by 1e-7 there: a + b >= 1, no point
                continue
            c = np.mgrid[: n1 + 1, : n2 + 1].astype(np.float64) + 0.5
            c[0] /= n1
            c[1] /= n2
            c = np.transpose(c, (1, 2, 0))
            k = c[c.sum(axis=-1) < 1]  # [K, 2] barycentric (a, b)
            if len(k) == 0:
                continue
            idx = order[starts[g] : starts[g + 1]]
            step = max(1, chunk // len(k))
            for s in range(0, len(idx), step):
                i = idx[s : s + step]
                q = v1[i, None] * k[None, :, :1] + v2[i, None] * k[None, :, 1:] + tri[i, None, 0]  # [f, K, 3]
                out.append(q.reshape(-1, 3))
    return np.concatenate(out, axis=0)


def greedy_thinning_mask(points: np.ndarray, radius: float) -> np.ndarray:
    """Step 2's rule in the given order: keep_i = no j < i with keep_j and |p_i - p_j| <= radius.
    points [N, 3] -> bool [N]. Computed by rounds instead of a loop over points: a point is
    dropped once an earlier neighbour is kept, kept once all its earlier neighbours are dropped
    (the earliest undecided point is settled every round, so it terminates; with a random order
    the number of rounds is small)."""
    n = len(points)
    state = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, 2 dropped
    if n == 0:
        return state.astype(bool)
    pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")  # [P, 2], i < j
    src, dst = pairs[:, 0], pairs[:, 1]
    while True:
        flag = np.zeros(n, dtype=bool)
        flag[dst[state[src] == 1]] = True  # has a kept earlier neighbour
        state[(state == 0) & flag] = 2
        flag[:] = False
        flag[dst[state[src] == 0]] = True  # has an undecided earlier neighbour
        state[(state == 0) & ~flag] = 1
        live = (state[dst] == 0) & (state[src] != 2)
        src, dst = src[live], dst[live]
        if not (state == 0).any():
            return state == 1


def downsample(points: np.ndarray, density: float, seed: Optional[int] = 0) -> np.ndarray:
    """Step 2: shuffle (np.random.default_rng(seed); None = unseeded, as eval.py) and thin so
    that no two points are within `density`. points [N, 3] -> [M, 3], M <= N."""
    points = np.array(points, dtype=np.float64).reshape(-1, 3)
    np.random.default_rng(seed).shuffle(points, axis=0)
    return points[greedy_thinning_mask(points, density)]


def load_obs_mask(dtu_dir: str, scan: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """<dtu_dir>/ObsMask/ObsMask{scan}_10.mat -> ObsMask bool [X, Y, Z], BB float32 [2, 3]
    (min, max corner, mm), Res [1] or [3] (voxel size, mm)."""
    mat = loadmat(os.path.join(dtu_dir, "ObsMask", f"ObsMask{scan}_10.mat"))
    obs_mask = np.asarray(mat["ObsMask"]).astype(bool)
    bb = np.asarray(mat["BB"]).astype(np.float32).reshape(2, 3)
    res = np.asarray(mat["Res"], dtype=np.float64).reshape(-1)
    return obs_mask, bb, res


def load_plane(dtu_dir: str, scan: int) -> np.ndarray:
    """<dtu_dir>/ObsMask/Plane{scan}.mat, key P -> [4] (a, b, c, d); above: a x + b y + c z + d > 0."""
    return np.asarray(loadmat(os.path.join(dtu_dir, "ObsMask", f"Plane{scan}.mat"))["P"], dtype=np.float64).reshape(4)


def load_points(path: str) -> np.ndarray:
    """The vertices of a .ply (point cloud or mesh) -> [N, 3] float64."""
    return np.asarray(trimesh.load(path, process=False).vertices, dtype=np.float64).reshape(-1, 3)


def load_stl(dtu_dir: str, scan: int) -> np.ndarray:
    """<dtu_dir>/Points/stl/stl{scan:03}_total.ply -> ground-truth points [M, 3] (mm)."""
    return load_points(os.path.join(dtu_dir, "Points", "stl", f"stl{scan:03}_total.ply"))


def mask_points(
    points: np.ndarray, obs_mask: np.ndarray, bb: np.ndarray, res: np.ndarray, patch_size: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Step 3. points [N, 3] -> data_in [N1, 3] (BB[0] - patch <= p < BB[1] + 2 patch),
    data_in_obs [N2, 3] (those of data_in whose voxel round((p - BB[0]) / Res) is in ObsMask)."""
    bb = np.asarray(bb).astype(np.float32)
    inbound = ((points >= bb[:1] - patch_size) & (points < bb[1:] + patch_size * 2)).all(axis=-1)
    data_in = points[inbound]
    grid = np.around((data_in - bb[:1]) / np.asarray(res).reshape(1, -1)).astype(np.int64)
    grid_in = ((grid >= 0) & (grid < np.asarray(obs_mask.shape)[None])).all(axis=-1)
    g = grid[grid_in]
    in_obs = obs_mask[g[:, 0], g[:, 1], g[:, 2]].astype(bool)
    return data_in, data_in[grid_in][in_obs]


def above_plane(points: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """[p, 1] . P > 0 for points [N, 3], P [4] -> bool [N]."""
    return points @ plane[:3] + plane[3] > 0


def _distances(points_from: np.ndarray, points_to: np.ndarray, max_dist: float) -> np.ndarray:
    """Nearest distances from [N, 3] to [M, 3], inf where none is within max_dist -> [N]."""
    if len(points_from) == 0:
        return np.zeros(0)
    if len(points_to) == 0:
        return np.full(len(points_from), np.inf)
    return cKDTree(points_to).query(points_from, k=1, distance_upper_bound=max_dist, workers=-1)[0]


def mean_below(d: np.ndarray, max_dist: float) -> float:
    """mean of d[d < max_dist] (nan when there is none)."""
    d = d[d < max_dist]
    return float(d.mean()) if len(d) else float("nan")


def evaluate_points(
    data_down: np.ndarray,
    stl: np.ndarray,
    obs_mask: np.ndarray,
    bb: np.ndarray,
    res: np.ndarray,
    plane: np.ndarray,
    patch_size: float = 60.0,
    max_dist: float = 20.0,
) -> dict:
    """Steps 3-6 for the thinned prediction data_down [N, 3] against ground truth stl [M, 3]
    -> {accuracy, completeness, overall} (mm) and the point counts, as plain numbers."""
    data_in, data_in_obs = mask_points(data_down, obs_mask, bb, res, patch_size)
    stl_above = stl[above_plane(stl, plane)]
    d_d2s = _distances(data_in_obs, stl, max_dist)
    d_s2d = _distances(stl_above, data_in, max_dist)
    acc, comp = mean_below(d_d2s, max_dist), mean_below(d_s2d, max_dist)
    return {
        "accuracy": acc,
        "completeness": comp,
        "overall": (acc + comp) / 2,
        "n_data": int(len(data_down)),
        "n_data_in": int(len(data_in)),
        "n_data_in_obs": int(len(data_in_obs)),
        "n_data_within_max_dist": int((d_d2s < max_dist).sum()),
        "n_stl": int(len(stl)),
        "n_stl_above": int(len(stl_above)),
        "n_stl_within_max_dist": int((d_s2d < max_dist).sum()),
    }


def evaluate(
    points_or_mesh,
    scan: int,
    dtu_dir: str,
    downsample_density: float = 0.2,
    patch_size: float = 60.0,
    max_dist: float = 20.0,
    seed: Optional[int] = 0,
) -> dict:
    """Steps 1-6. points_or_mesh: (vertices [V, 3], faces [F, 3]) for mesh mode, or points
    [N, 3] for pcd mode, in the DTU world frame (mm) -> evaluate_points' dict plus n_sampled."""
    if isinstance(points_or_mesh, (tuple, list)):
        data_pcd = sample_mesh_grid(points_or_mesh[0], points_or_mesh[1], downsample_density)
    else:
        data_pcd = np.asarray(points_or_mesh, dtype=np.float64).reshape(-1, 3)
    data_down = downsample(data_pcd, downsample_density, seed)
    obs_mask, bb, res = load_obs_mask(dtu_dir, scan)
    result = evaluate_points(
        data_down, load_stl(dtu_dir, scan), obs_mask, bb, res, load_plane(dtu_dir, scan), patch_size, max_dist
    )
    result["n_sampled"] = int(len(data_pcd))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", required=True, help="mesh (mode mesh) or point cloud (mode pcd), DTU world frame")
    parser.add_argument("--scan", type=int, required=True)
    parser.add_argument("--dtu_dir", required=True, help="folder with Points/stl/ and ObsMask/")
    parser.add_argument("--mode", choices=["mesh", "pcd"], default="mesh")
    parser.add_argument("--downsample_density", type=float, default=0.2)
    parser.add_argument("--patch_size", type=float, default=60.0)
    parser.add_argument("--max_dist", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0, help="shuffle before thinning; -1: unseeded (as eval.py)")
    parser.add_argument("--out_json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.mode == "mesh":
        mesh = trimesh.load(args.mesh, process=False, force="mesh")
        data = (np.asarray(mesh.vertices), np.asarray(mesh.faces))
    else:
        data = load_points(args.mesh)
    result = evaluate(
        data,
        args.scan,
        args.dtu_dir,
        args.downsample_density,
        args.patch_size,
        args.max_dist,
        None if args.seed < 0 else args.seed,
    )
    print(f"accuracy: {result['accuracy']:.6f}")
    print(f"completeness: {result['completeness']:.6f}")
    print(f"overall: {result['overall']:.6f}")
    if args.out_json:
        keys = ("mesh", "scan", "mode", "downsample_density", "patch_size", "max_dist", "seed")
        result.update({k: getattr(args, k) for k in keys})
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
