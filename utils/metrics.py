"""Image metrics (PSNR, SSIM), whole image or inside a mask; mesh / point-cloud metrics
(surface sampling, Chamfer distance, F-score)."""
import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """PSNR = -10 log10(MSE) for images in [0, 1]. pred, gt: [..., 3]; mask: [...] (bool/0-1)"""
    err = ((pred - gt) ** 2).mean(-1)  # [...]
    if mask is not None:
        keep = mask > 0.5
        if not keep.any():
            return float("nan")
        err = err[keep]
    return float(-10.0 * torch.log10(err.mean().clamp(min=1e-10)))


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, size, size]


def ssim(pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), averaged
    over channels and over the pixels of the SSIM map (those inside `mask` when given).
    pred, gt: [H, W, 3] in [0, 1]; mask: [H, W]"""
    c1, c2 = 0.01**2, 0.03**2
    window = _gaussian_window(11, 1.5, pred.device).expand(3, 1, 11, 11)
    a = pred.permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    b = gt.permute(2, 0, 1)[None].float()

    def blur(x):
        return F.conv2d(x, window, padding=5, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    ssim_map = ssim_map[0].mean(0)  # [H, W]
    if mask is not None:
        keep = mask > 0.5
        if not keep.any():
            return float("nan")
        return float(ssim_map[keep].mean())
    return float(ssim_map.mean())


# ---------------------------------------------------------------------------------------------
# Mesh metrics: surface sampling, Chamfer distance, F-score (numpy / scipy, any length unit)
# ---------------------------------------------------------------------------------------------


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n_points: int, seed: int = 0,
                   return_faces: bool = False):
    """Uniform samples on a triangle mesh: a face drawn with probability area_f / sum(area),
    then a uniform point in it, p = (1 - sqrt(r1)) a + sqrt(r1) (1 - r2) b + sqrt(r1) r2 c with
    r1, r2 ~ U[0, 1). vertices [V, 3], faces [F, 3] -> points [n_points, 3] (float64), and with
    return_faces the face of each point [n_points] (int64). Deterministic for a given seed; an
    empty or zero-area mesh gives [0, 3] (and [0])."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    tri = vertices[faces]  # [F, 3, 3]
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)  # [F]
    total = areas.sum() if len(areas) else 0.0
    if n_points <= 0 or not total > 0:
        return (np.zeros((0, 3)), np.zeros(0, dtype=np.int64)) if return_faces else np.zeros((0, 3))
    rng = np.random.default_rng(seed)
    face = rng.choice(len(faces), size=n_points, p=areas / total)  # [n]
    r1 = np.sqrt(rng.random((n_points, 1)))
    r2 = rng.random((n_points, 1))
    a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]
    points = (1 - r1) * a + r1 * (1 - r2) * b + r1 * r2 * c  # [n, 3]
    return (points, face) if return_faces else points


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit normals n_f = (b - a) x (c - a) / |...| of the faces (a, b, c): outward for faces wound
    counter-clockwise seen from outside. vertices [V, 3], faces [F, 3] -> [F, 3] (0 for a
    degenerate face)."""
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64).reshape(-1, 3)]  # [F, 3, 3]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # [F, 3]
    length = np.linalg.norm(n, axis=-1, keepdims=True)  # [F, 1]
    return np.divide(n, length, out=np.zeros_like(n), where=length > 0)


def signed_offsets(points: np.ndarray, surface_points: np.ndarray, surface_normals: np.ndarray,
                   nearest: Optional[np.ndarray] = None) -> np.ndarray:
    """Signed point-to-plane distance of each point to a densely sampled oriented surface:
        s_i = <p_i - q_j, n_j>,  j = argmin_j |p_i - q_j|
    positive outside (on the normals' side), negative inside; the plane of the nearest sample
    rather than the sample itself, so the gaps between samples add no spread. points [N, 3],
    surface_points [M, 3] with their unit normals [M, 3] (and j [N] when already known) -> [N]."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0 or len(surface_points) == 0:
        return np.zeros(0)
    j = nearest_points(points, surface_points)[1] if nearest is None else nearest  # [N]
    return ((points - surface_points[j]) * surface_normals[j]).sum(-1)  # [N]


def nearest_points(points_from: np.ndarray, points_to: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """d_i = min_j |from_i - to_j| (Euclidean, cKDTree) and that j. from [N, 3], to [M, 3] ->
    d [N], j [N]; all inf (and j = 0) when `points_to` is empty."""
    points_from = np.asarray(points_from, dtype=np.float64).reshape(-1, 3)
    points_to = np.asarray(points_to, dtype=np.float64).reshape(-1, 3)
    if len(points_to) == 0:
        return np.full(len(points_from), np.inf), np.zeros(len(points_from), dtype=np.int64)
    if len(points_from) == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    from scipy.spatial import cKDTree  # 0.4 s to import: not on a training's start-up

    return cKDTree(points_to).query(points_from, k=1, workers=-1)


def nearest_distances(points_from: np.ndarray, points_to: np.ndarray) -> np.ndarray:
    """d_i = min_j |from_i - to_j| (nearest_points' distances). from [N, 3], to [M, 3] -> [N];
    all inf when `points_to` is empty."""
    return nearest_points(points_from, points_to)[0]


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def chamfer_distance(points_pred: np.ndarray, points_gt: np.ndarray, max_dist: float = math.inf) -> dict:
    """Symmetric Chamfer distance between point sets pred [N, 3] and gt [M, 3]:
        accuracy     = mean_i min(min_j |pred_i - gt_j|, max_dist)
        completeness = mean_j min(min_i |gt_j - pred_i|, max_dist)
        chamfer      = (accuracy + completeness) / 2
    (L2 distances, not squared; max_dist clips each distance before averaging). Returns plain
    floats; a mean over no points is nan, a distance to an empty set is inf (then clipped)."""
    d_pred = np.minimum(nearest_distances(points_pred, points_gt), max_dist)  # [N]
    d_gt = np.minimum(nearest_distances(points_gt, points_pred), max_dist)  # [M]
    acc, comp = _mean(d_pred), _mean(d_gt)
    return {"accuracy": acc, "completeness": comp, "chamfer": (acc + comp) / 2}


def _fscore_from_distances(d_pred: np.ndarray, d_gt: np.ndarray, threshold: float) -> dict:
    precision = float((d_pred < threshold).mean()) if len(d_pred) else 0.0
    recall = float((d_gt < threshold).mean()) if len(d_gt) else 0.0
    denom = precision + recall
    return {"precision": precision, "recall": recall, "fscore": 2 * precision * recall / denom if denom > 0 else 0.0}


def f_score(points_pred: np.ndarray, points_gt: np.ndarray, threshold: float) -> dict:
    """F-score at distance `threshold` (as in Tanks and Temples; strict '<'):
        precision = |{i : min_j |pred_i - gt_j| < threshold}| / N
        recall    = |{j : min_i |gt_j - pred_i| < threshold}| / M
        fscore    = 2 P R / (P + R), 0 when P = R = 0.
    pred [N, 3], gt [M, 3] -> plain floats (an empty set gives 0 for its ratio)."""
    d_pred = nearest_distances(points_pred, points_gt)
    d_gt = nearest_distances(points_gt, points_pred)
    return _fscore_from_distances(d_pred, d_gt, threshold)


def mesh_metrics(
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    gt_vertices: np.ndarray,
    gt_faces: np.ndarray,
    n_points: int = 200000,
    threshold: float = 1.0,
    seed: int = 0,
    max_dist: float = math.inf,
) -> dict:
    """Chamfer distance and F-score between two meshes from `n_points` area-uniform samples on
    each (pred sampled with `seed`, gt with `seed + 1`, so that identical meshes give the
    sampling floor, ~0, rather than exactly 0). Distances are in the meshes' unit: the
    default threshold 1.0 means 1 mm for meshes in the DTU world frame; pass a threshold
    suited to other frames (e.g. ~0.005 for the normalised unit sphere).
    vertices [V, 3], faces [F, 3] -> {accuracy, completeness, chamfer, precision, recall,
    fscore, threshold, n_points, offset_median, inside_fraction} as plain (json-friendly) numbers.
    offset_median is the median signed distance from the predicted surface to the true one and
    inside_fraction the share of predicted samples inside it (signed_offsets, with the true faces'
    normals): a surface that sits systematically inside the object (a shrink) shows as a negative
    offset and a fraction near 1, where the unsigned Chamfer cannot tell inside from outside. The
    sign needs the true mesh's faces wound outward."""
    pts_pred = sample_surface(pred_vertices, pred_faces, n_points, seed)
    pts_gt, gt_face = sample_surface(gt_vertices, gt_faces, n_points, seed + 1, return_faces=True)
    d_pred, nearest_gt = nearest_points(pts_pred, pts_gt)  # [n_points], [n_points]
    d_gt = nearest_distances(pts_gt, pts_pred)
    acc, comp = _mean(np.minimum(d_pred, max_dist)), _mean(np.minimum(d_gt, max_dist))
    out = {"accuracy": acc, "completeness": comp, "chamfer": (acc + comp) / 2}
    offsets = signed_offsets(pts_pred, pts_gt, face_normals(gt_vertices, gt_faces)[gt_face], nearest_gt)  # [n_points]
    out["offset_median"] = float(np.median(offsets)) if len(offsets) else float("nan")
    out["inside_fraction"] = float((offsets < 0).mean()) if len(offsets) else float("nan")
    out.update(_fscore_from_distances(d_pred, d_gt, threshold))
    out.update({"threshold": float(threshold), "n_points": int(n_points)})
    return out
