"""Sparse 3D points from photos whose cameras are known: SIFT matches between neighbouring
views, kept when they satisfy the two cameras' epipolar geometry, triangulated (linear DLT)
and kept when they reproject well in front of both cameras.

Used by the isolation of the object from its support (utils/isolate.py): the table is seen in
the photos even where the trained surface leaves it to the background. Pure numpy / OpenCV
over (images, intrinsics, camera-to-world poses); nothing here knows about models or datasets.
"""
from typing import List, Tuple

import cv2
import numpy as np

from utils.camera import project


def projection_matrices(intrinsics: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """P = K [R^T | -R^T c] of each camera. intrinsics [N, 3, 3], c2w [N, 3, 4] (OpenCV axes)
    -> [N, 3, 4]"""
    rotation_t = np.transpose(c2w[:, :, :3], (0, 2, 1))  # [N, 3, 3] world -> camera
    translation = -rotation_t @ c2w[:, :, 3:]  # [N, 3, 1]
    return intrinsics @ np.concatenate([rotation_t, translation], axis=2)


def fundamental_matrix(p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """F with x2^T F x1 = 0 for the projections p1, p2 [3, 4] of one world point:
    F = [e2]_x P2 P1^+, e2 = P2 C1 (C1 the first camera's centre, the null vector of P1)."""
    centre = np.linalg.svd(p1)[2][-1]  # [4] homogeneous, P1 C1 = 0
    e2 = p2 @ centre  # [3]
    cross = np.array([[0, -e2[2], e2[1]], [e2[2], 0, -e2[0]], [-e2[1], e2[0], 0]])
    return cross @ p2 @ np.linalg.pinv(p1)


def epipolar_distances(fundamental: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Symmetric point-to-epipolar-line distance in pixels, max over the two images.
    x1, x2 [M, 2] -> [M]"""
    h1 = np.concatenate([x1, np.ones((len(x1), 1))], axis=1)  # [M, 3]
    h2 = np.concatenate([x2, np.ones((len(x2), 1))], axis=1)  # [M, 3]
    lines2 = h1 @ fundamental.T  # [M, 3] lines in image 2
    lines1 = h2 @ fundamental  # [M, 3] lines in image 1
    algebraic = np.abs(np.sum(h2 * lines2, axis=1))  # [M]
    d2 = algebraic / np.maximum(np.linalg.norm(lines2[:, :2], axis=1), 1e-12)
    d1 = algebraic / np.maximum(np.linalg.norm(lines1[:, :2], axis=1), 1e-12)
    return np.maximum(d1, d2)


def triangulate(p1: np.ndarray, p2: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Linear (DLT) triangulation of matched pixels x1, x2 [M, 2] seen by p1, p2 [3, 4] -> [M, 3]"""
    homo = cv2.triangulatePoints(p1.astype(np.float64), p2.astype(np.float64),
                                 x1.T.astype(np.float64), x2.T.astype(np.float64))  # [4, M]
    return (homo[:3] / homo[3:]).T


def neighbour_pairs(centres: np.ndarray, neighbours: int) -> List[Tuple[int, int]]:
    """Each camera with its `neighbours` nearest others (by centre), each pair once (i < j).
    centres [N, 3]"""
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=2)  # [N, N]
    np.fill_diagonal(dist, np.inf)
    pairs = set()
    for i in range(len(centres)):
        for j in np.argsort(dist[i])[:neighbours]:
            pairs.add((min(i, int(j)), max(i, int(j))))
    return sorted(pairs)


def sparse_points(
    images: np.ndarray,
    intrinsics: np.ndarray,
    c2w: np.ndarray,
    neighbours: int = 4,
    max_epipolar_px: float = 1.5,
    max_reprojection_px: float = 1.0,
    min_angle_deg: float = 2.0,
    ratio: float = 0.75,
    max_features: int = 4000,
) -> np.ndarray:
    """Points [M, 3] (in the cameras' frame) triangulated from SIFT matches between each view
    and its nearest `neighbours`: a match is kept when it passes Lowe's ratio test, lies
    within max_epipolar_px of its epipolar line, reprojects within max_reprojection_px in front
    of both cameras, and its two rays meet at min_angle_deg or more; at most max_features
    features a photo. images [N, H, W, 3] uint8 RGB (or [N, H, W]), intrinsics [N, 3, 3],
    c2w [N, 3, 4]"""
    sift = cv2.SIFT_create(nfeatures=max_features)
    features = []
    for image in images:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        keypoints, descriptors = sift.detectAndCompute(gray, None)
        features.append((np.array([k.pt for k in keypoints], np.float64).reshape(-1, 2), descriptors))
    projections = projection_matrices(intrinsics, c2w)  # [N, 3, 4]
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    found = []
    for i, j in neighbour_pairs(c2w[:, :, 3], neighbours):
        (k1, d1), (k2, d2) = features[i], features[j]
        if d1 is None or d2 is None or len(k1) < 2 or len(k2) < 2:
            continue
        good = [m[0] for m in matcher.knnMatch(d1, d2, k=2) if len(m) == 2 and m[0].distance < ratio * m[1].distance]
        if not good:
            continue
        x1 = k1[[m.queryIdx for m in good]]  # [M, 2]
        x2 = k2[[m.trainIdx for m in good]]  # [M, 2]
        keep = epipolar_distances(fundamental_matrix(projections[i], projections[j]), x1, x2) < max_epipolar_px
        if not keep.any():
            continue
        x1, x2 = x1[keep], x2[keep]
        points = triangulate(projections[i], projections[j], x1, x2)  # [M, 3]
        u1, z1 = project(points, projections[i])
        u2, z2 = project(points, projections[j])
        error = np.maximum(np.linalg.norm(u1 - x1, axis=1), np.linalg.norm(u2 - x2, axis=1))
        r1 = points - c2w[i, :, 3]
        r2 = points - c2w[j, :, 3]
        cos = np.sum(r1 * r2, axis=1) / np.maximum(np.linalg.norm(r1, axis=1) * np.linalg.norm(r2, axis=1), 1e-12)
        ok = (z1 > 0) & (z2 > 0) & (error < max_reprojection_px) & (cos < np.cos(np.radians(min_angle_deg)))
        found.append(points[ok])
    return np.concatenate(found) if found else np.zeros((0, 3))
