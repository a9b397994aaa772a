"""The object without its support: find the plane it stands on and cut the surface there.

Trained without masks, the SDF inside the region holds the object AND the part of the table
(floor, turntable) that lies inside the region: nothing in the photos separates the two. Most
captures stand the object on such a plane, and it is easy to recognise in the extracted surface:

1. RANSAC over area-weighted face centres finds the plane that carries the most surface area
   (inliers within `tolerance`).
   Photos are taken upright, so only planes whose normal is within 30 degrees of the cameras'
   mean up axis are candidates (a table, a floor, a turntable).
2. It is accepted as the SUPPORT only if
   - every camera centre lies above it, and so does the point where the cameras' optical axes
     meet (the object they look at),
   - it is wide: its inliers reach the region's boundary (|x| >= reach * radius), which the
     table does and a flat face of the object does not,
   - it carries at least `min_area_share` of the surface's area, and some of the surface lies
     above it (the object).
3. Faces with a vertex closer than `margin` above the plane, or below it, are removed; of what
   is left, the largest connected piece is the object. Everything removed is returned too, so
   that it can be written beside the mesh and checked.
4. When the surface holds too little of the table (the background explained it),
   support_plane_from_points finds it among points triangulated from the photos
   (utils/triangulate.py): the lowest plane that holds many of them.

Pure numpy over (vertices [V, 3], faces [F, 3]) or points [N, 3] in the normalised frame;
nothing here knows about models or datasets.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np

from utils.camera import axes_meeting_point
from utils.mesh import component_labels


@dataclass
class Plane:
    normal: np.ndarray  # [3] unit, pointing to the cameras' side ("up")
    offset: float  # signed distance of x: normal . x + offset
    area_share: float  # share of the surface's area within tolerance of the plane
    reach: float  # max |x| of its inliers, in units of the region radius

    def signed_distance(self, points: np.ndarray) -> np.ndarray:
        """points [N, 3] -> [N], positive on the cameras' side"""
        return points @ self.normal + self.offset


def cameras_up(c2w: np.ndarray) -> np.ndarray:
    """The cameras' mean up axis (-y, OpenCV axes), unit: photos are taken upright.
    c2w [C, 3, 4] -> [3]"""
    up = -c2w[:, :, 1].mean(axis=0)
    return up / max(np.linalg.norm(up), 1e-12)


def face_centres_and_areas(vertices: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """-> centres [F, 3], areas [F]"""
    tri = vertices[faces]  # [F, 3, 3]
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)  # [F]
    return tri.mean(axis=1), areas


def ransac_plane(
    points: np.ndarray, weights: np.ndarray, tolerance: float, up: Optional[np.ndarray] = None,
    max_tilt_deg: float = 90.0, iterations: int = 1000, seed: int = 0,
) -> Optional[Tuple[np.ndarray, float]]:
    """The plane n . x + d = 0 (|n| = 1) that holds the largest total weight of points within
    `tolerance`, among planes whose normal is within max_tilt_deg of `up` (when given), refined
    by a weighted least-squares fit to its inliers. points [N, 3], weights [N] -> n [3], d
    (None when no candidate qualifies)"""
    rng = np.random.default_rng(seed)
    p = weights / weights.sum()
    min_cos = np.cos(np.radians(max_tilt_deg))
    best, best_score = None, -1.0
    for _ in range(iterations):
        a, b, c = points[rng.choice(len(points), 3, replace=False, p=p)]
        n = np.cross(b - a, c - a)
        norm = np.linalg.norm(n)
        if norm < 1e-9:
            continue
        n = n / norm
        if up is not None and abs(n @ up) < min_cos:
            continue
        d = -float(n @ a)
        score = weights[np.abs(points @ n + d) < tolerance].sum()
        if score > best_score:
            best, best_score = (n, d), score
    if best is None:
        return None
    n, d = best
    inliers = np.abs(points @ n + d) < tolerance
    return fit_plane(points[inliers], weights[inliers])


def fit_plane(points: np.ndarray, weights: np.ndarray) -> Tuple[np.ndarray, float]:
    """Weighted least-squares plane n . x + d = 0 through points [N, 3] with weights [N]: it
    passes through their weighted centre, n is the covariance's smallest eigenvector (its sign
    arbitrary) -> n [3], d"""
    centre = (points * weights[:, None]).sum(0) / weights.sum()  # [3]
    cov = ((points - centre) * weights[:, None]).T @ (points - centre)  # [3, 3]
    n = np.linalg.eigh(cov)[1][:, 0]  # smallest eigenvalue's vector: the normal
    return n, -float(n @ centre)


def find_support_plane(
    vertices: np.ndarray,
    faces: np.ndarray,
    c2w: np.ndarray,
    radius: float,
    tolerance: float = 0.01,
    reach: float = 0.9,
    min_area_share: float = 0.05,
    max_tilt_deg: float = 30.0,
    max_points: int = 50000,
    seed: int = 0,
) -> Optional[Plane]:
    """The plane the object stands on (see the module's docstring), or None when the surface
    has none. vertices [V, 3], faces [F, 3], c2w [C, 3, 4] the cameras (OpenCV axes), all in
    the normalised frame. Photos are taken upright: the support's normal is within
    max_tilt_deg of the cameras' mean up (-y) axis, and the point their optical axes meet
    (the object) lies above it."""
    if len(faces) < 3:
        return None
    centres, areas = face_centres_and_areas(vertices, faces)
    keep = areas > 0
    centres, areas = centres[keep], areas[keep]
    if len(centres) > max_points:  # area-weighted subsample: RANSAC needs no more
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(centres), max_points, replace=False, p=areas / areas.sum())
        centres, areas = centres[pick], np.full(max_points, areas.sum() / max_points)
    up = cameras_up(c2w)
    found = ransac_plane(centres, areas, tolerance, up, max_tilt_deg, seed=seed)
    if found is None:
        return None
    n, d = found
    if n @ up < 0:
        n, d = -n, -d
    if not np.all(c2w[:, :, 3] @ n + d > 0):
        return None  # cameras on both sides: not a support
    if axes_meeting_point(c2w) @ n + d < 2 * tolerance:
        return None  # the object the cameras look at is not above it
    distance = centres @ n + d
    inliers = np.abs(distance) < tolerance
    share = float(areas[inliers].sum() / areas.sum())
    plane_reach = float(np.linalg.norm(centres[inliers], axis=1).max() / radius) if inliers.any() else 0.0
    above = float(areas[distance > 2 * tolerance].sum() / areas.sum())
    if share < min_area_share or plane_reach < reach or above < 0.01:
        return None
    return Plane(normal=n, offset=d, area_share=share, reach=plane_reach)


def support_plane_from_points(
    points: np.ndarray,
    c2w: np.ndarray,
    radius: float,
    tolerance: float = 0.02,
    max_below: float = 0.05,
    min_share: float = 0.03,
    max_tilt_deg: float = 30.0,
    low_share: float = 0.25,
    candidates: int = 4000,
    max_points: int = 20000,
    seed: int = 0,
) -> Optional[Plane]:
    """The plane the object stands on, from points of the scene seen in the photos
    (utils/triangulate.py), for when the trained surface leaves the table to the background and
    find_support_plane finds too little of it. The support is the lowest thing the photos see:
    RANSAC draws its candidate planes through points of the lowest `low_share` along the
    cameras' mean up axis, and keeps those whose normal is within max_tilt_deg of up, with every
    camera centre above, the point where the optical axes meet 2 tolerance above, and at most
    `max_below` of the points more than `tolerance` below. The one holding the most points within
    `tolerance` is refined by least squares over its inliers (twice) and accepted when it still
    qualifies and holds min_share of the points (a random max_points of them when there are
    more). points [N, 3], c2w [C, 3, 4] (OpenCV axes), all in the normalised frame -> Plane
    (area_share: its share of the points) or None."""
    if len(points) < 3:
        return None
    up, centres, meet = cameras_up(c2w), c2w[:, :, 3], axes_meeting_point(c2w)
    rng = np.random.default_rng(seed)
    if len(points) > max_points:  # enough for the plane, and [max_points, chunk] stays small
        points = points[rng.choice(len(points), max_points, replace=False)]

    def qualifying(n: np.ndarray, d: np.ndarray) -> np.ndarray:  # [K, 3], [K] -> [K] bool
        return (np.all(centres @ n.T + d > 0, axis=0) & (meet @ n.T + d >= 2 * tolerance)
                & (np.mean(points @ n.T + d < -tolerance, axis=0) <= max_below)
                & (n @ up >= np.cos(np.radians(max_tilt_deg))))

    height = points @ up  # [N]
    n, d = planes_through_triples(points[height <= np.quantile(height, low_share)], up, candidates, rng)
    best = most_inliers(points, n, d, tolerance, qualifying)
    if best is None:  # no candidate qualifies
        return None
    n, d = n[best], float(d[best])
    for _ in range(2):
        n, d = fit_plane_to_inliers(points, n, d, tolerance, up)
    if not qualifying(n[None], np.array([d]))[0]:  # the least-squares refinement moved it out
        return None
    inliers = np.abs(points @ n + d) < tolerance
    share = float(inliers.mean())
    if share < min_share:
        return None
    return Plane(normal=n, offset=d, area_share=share,
                 reach=float(np.linalg.norm(points[inliers], axis=1).max() / radius))


def planes_through_triples(
    points: np.ndarray, up: np.ndarray, count: int, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    """`count` planes n . x + d = 0 through random triples of points [L, 3] (degenerate triples
    dropped), n turned towards `up` -> n [K, 3], d [K] (none when L < 3)"""
    if len(points) < 3:
        return np.zeros((0, 3)), np.zeros(0)
    a, b, c = (points[rng.integers(0, len(points), count)] for _ in range(3))  # [K, 3] each
    n = np.cross(b - a, c - a)  # [K, 3]
    norm = np.linalg.norm(n, axis=1)
    keep = norm > 1e-9
    n = n[keep] / norm[keep, None]
    n = n * np.where(n @ up < 0, -1.0, 1.0)[:, None]  # towards the cameras
    return n, -np.sum(n * a[keep], axis=1)


def most_inliers(
    points: np.ndarray, n: np.ndarray, d: np.ndarray, tolerance: float,
    qualifying: Callable[[np.ndarray, np.ndarray], np.ndarray], chunk: int = 256,
) -> Optional[int]:
    """Index of the plane (n [K, 3], d [K]) holding the most points [N, 3] within `tolerance`
    among those `qualifying` accepts, scored `chunk` planes at a time ([N, chunk] distances);
    None when none qualifies"""
    best, best_count = None, -1
    for start in range(0, len(n), chunk):
        nc, dc = n[start:start + chunk], d[start:start + chunk]
        counts = np.where(qualifying(nc, dc), np.sum(np.abs(points @ nc.T + dc) < tolerance, axis=0), -1)  # [k]
        if len(counts) and counts.max() > best_count:
            best, best_count = start + int(np.argmax(counts)), int(counts.max())
    return best


def fit_plane_to_inliers(
    points: np.ndarray, n: np.ndarray, d: float, tolerance: float, up: np.ndarray
) -> Tuple[np.ndarray, float]:
    """The least-squares plane (fit_plane) of the points [N, 3] within `tolerance` of n . x + d
    = 0, its normal turned towards `up` -> n [3], d"""
    inliers = np.abs(points @ n + d) < tolerance  # [N]
    n, d = fit_plane(points[inliers], np.ones(int(inliers.sum())))
    return (-n, -d) if n @ up < 0 else (n, d)

def split_at_plane(
    vertices: np.ndarray, faces: np.ndarray, plane: Plane, margin: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Faces of the object and faces removed: a face is cut when any vertex lies less than
    `margin` above the plane (or below it); of the rest, the largest connected piece is kept.
    -> kept [K, 3], removed [F - K, 3] (indices into `vertices`)"""
    above = plane.signed_distance(vertices) > margin  # [V]
    candidate = np.all(above[faces], axis=1)  # [F]
    kept = np.zeros(len(faces), dtype=bool)
    if candidate.any():
        labels = component_labels(faces[candidate])
        kept[np.flatnonzero(candidate)[labels == np.bincount(labels).argmax()]] = True
    return faces[kept], faces[~kept]
