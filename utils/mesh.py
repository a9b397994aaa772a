"""Explicit surfaces from an SDF: marching cubes (PyMCubes), clean-up, world frame, export."""
import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from utils.camera import downscale_matrix, project
from utils.misc import map_in_chunks

log = logging.getLogger(__name__)
COARSE_RESOLUTION = 128  # the first marching-cubes pass, over the whole cube, that finds the surface's box


def grid_shape(bounds: np.ndarray, resolution: int) -> Tuple[np.ndarray, float]:
    """A regular grid over bounds [2, 3] (min, max) with `resolution` points on the longest side
    and cubic voxels -> points per axis [3], voxel size"""
    extent = bounds[1] - bounds[0]
    voxel = extent.max() / (resolution - 1)
    return np.maximum(np.ceil(extent / voxel).astype(int) + 1, 2), voxel


@torch.no_grad()
def sdf_on_grid(
    sdf_fn: Callable[[torch.Tensor], torch.Tensor],
    bounds: np.ndarray,
    resolution: int,
    chunk: int,
    device,
    x_planes: slice = slice(None),
) -> Tuple[np.ndarray, float]:
    """SDF sampled on grid_shape's grid over bounds, on its x-planes `x_planes` (all of them,
    or one process's share) -> values [planes in x_planes, ny, nz], voxel size"""
    counts, voxel = grid_shape(bounds, resolution)
    axes = [torch.linspace(0, (n - 1) * voxel, n, device=device) + float(lo) for n, lo in zip(counts, bounds[0])]
    xs = axes[0][x_planes]
    values = np.empty((len(xs), counts[1], counts[2]), dtype=np.float32)
    # one x-plane of the grid at a time keeps memory at chunk points
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), dim=-1).reshape(-1, 2)  # [ny*nz, 2]
    for i, x in enumerate(xs):
        pts = torch.cat([torch.full_like(yz[:, :1], float(x)), yz], dim=-1)  # [ny*nz, 3]
        parts, chunk = map_in_chunks(lambda a, b: sdf_fn(pts[a:b]), pts.shape[0], chunk, "evaluating the SDF grid")
        values[i] = torch.cat(parts).view(counts[1], counts[2]).float().cpu().numpy()
    return values, np.full(3, voxel)


def marching_cubes(values: np.ndarray, origin: np.ndarray, voxel: np.ndarray, level: float):
    """Iso-surface {sdf = level} of grid values (negative inside) -> vertices [V, 3] in the
    grid's frame, faces [F, 3] wound so that normals point outwards (towards sdf > level)."""
    import mcubes  # lazily: it imports scipy (~0.5 s) that a training start need not pay

    vertices, faces = mcubes.marching_cubes(-values, -level)
    return vertices * voxel + origin, faces.astype(np.int64)


def cube_bounds(radius: float) -> np.ndarray:
    """[-radius, radius]^3 as bounds [2, 3]"""
    return np.array([[-radius] * 3, [radius] * 3], dtype=np.float64)


def fine_bounds(coarse: np.ndarray, voxel: float, level: float, radius: float) -> Optional[np.ndarray]:
    """Where the fine pass goes: the bounding box of the surface in the coarse grid over
    cube_bounds(radius), plus two coarse voxels, inside that cube -> bounds [2, 3] (None
    when the coarse grid holds no surface)"""
    vertices, _ = marching_cubes(coarse, cube_bounds(radius)[0], voxel, level)
    if len(vertices) == 0:
        return None
    return np.clip(np.stack([vertices.min(0) - 2 * voxel, vertices.max(0) + 2 * voxel]), -radius, radius)


def no_surface() -> Tuple[np.ndarray, np.ndarray]:
    """vertices [0, 3], faces [0, 3]"""
    return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)


GridFn = Callable[[np.ndarray, int], Tuple[Optional[np.ndarray], float]]


def local_grid(sdf_fn: Callable[[torch.Tensor], torch.Tensor], chunk: int, device) -> GridFn:
    """grid_fn for extract_surface in one process: (bounds, resolution) -> sdf_on_grid's values, voxel."""
    return lambda bounds, resolution: sdf_on_grid(sdf_fn, bounds, resolution, chunk, device)


def extract_surface(
    grid_fn: GridFn,
    radius: float,
    resolution: int,
    level: float,
    coarse_resolution: int = COARSE_RESOLUTION,
    agree: Callable[[Optional[np.ndarray]], Optional[np.ndarray]] = lambda bounds: bounds,
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Coarse marching cubes over [-radius, radius]^3, then a fine pass at `resolution` over
    the coarse surface's bounding box (plus two coarse voxels). Normalised frame.

    grid_fn(bounds, resolution) -> SDF values [nx, ny, nz], voxel size (values None in a
    process that only contributes its share to another's grid); agree(bounds) gives every
    process the fine box of the one holding the coarse grid (identity in one process).
    -> vertices [V, 3], faces [F, 3] where the grid was held, else None."""
    coarse, voxel = grid_fn(cube_bounds(radius), min(coarse_resolution, resolution))
    bounds = agree(fine_bounds(coarse, voxel, level, radius) if coarse is not None else None)
    if bounds is None:
        return no_surface() if coarse is not None else None
    values, voxel = grid_fn(bounds, resolution)
    return marching_cubes(values, bounds[0], voxel, level) if values is not None else None


def component_labels(faces: np.ndarray) -> np.ndarray:
    """The connected piece (faces sharing an edge) of each face: [F] -> labels [F] in 0..n-1"""
    import trimesh  # lazily: ~1 s of imports a training start need not pay

    adjacency = trimesh.graph.face_adjacency(faces)
    return trimesh.graph.connected_component_labels(adjacency, node_count=len(faces))


def largest_component(faces: np.ndarray) -> np.ndarray:
    """The faces of the connected piece with the most faces."""
    if len(faces) == 0:
        return faces
    labels = component_labels(faces)
    return faces[labels == np.bincount(labels).argmax()]


def remove_unused_vertices(vertices: np.ndarray, faces: np.ndarray, *attributes: np.ndarray):
    """Drop vertices no face uses -> vertices, faces (re-indexed), attributes (same rows kept)."""
    used = np.unique(faces)
    remap = np.full(len(vertices), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return (vertices[used], remap[faces], *(a[used] for a in attributes))


def faces_inside_masks(
    vertices_world: np.ndarray,
    faces: np.ndarray,
    world_mats: Sequence[np.ndarray],
    masks: np.ndarray,
    dilation: int = 12,
) -> np.ndarray:
    """The faces none of whose vertices projects inside an image but outside its dilated mask.
    world_mats: per view, for the masks' resolution; masks [N, H, W]."""
    keep = np.ones(len(vertices_world), dtype=bool)
    kernel = np.ones((2 * dilation + 1, 2 * dilation + 1), np.uint8)
    for world_mat, mask in zip(world_mats, masks):
        grown = cv2.dilate((mask > 0.5).astype(np.uint8), kernel) > 0
        uv, depth = project(vertices_world, world_mat)
        px = np.round(uv).astype(np.int64)
        h, w = mask.shape
        inside = (depth > 0) & (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
        idx = np.nonzero(inside)[0]
        keep[idx[~grown[px[idx, 1], px[idx, 0]]]] = False
    return faces[keep[faces].all(axis=1)]


def to_world(vertices: np.ndarray, scale_mat: np.ndarray) -> np.ndarray:
    """Normalised frame -> dataset world frame: X_world = scale_mat @ [X, 1]."""
    homo = np.concatenate([vertices, np.ones((len(vertices), 1))], axis=1)
    return (homo @ scale_mat.T)[:, :3]


def save_mesh(
    path_stem: str, vertices: np.ndarray, faces: np.ndarray, colors: Optional[np.ndarray], formats: List[str]
) -> List[str]:
    """Write `path_stem.<fmt>` for each format (ply, obj, stl); colours [V, 3] in [0, 1]."""
    import trimesh

    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    if colors is not None:
        mesh.visual.vertex_colors = np.concatenate(
            [np.clip(colors * 255 + 0.5, 0, 255), np.full((len(colors), 1), 255)], axis=1
        ).astype(np.uint8)
    paths = []
    os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
    for fmt in formats:
        if fmt not in ("ply", "obj", "stl"):
            raise ValueError(f"mesh format must be ply, obj or stl, got '{fmt}'")
        path = f"{path_stem}.{fmt}"
        mesh.export(path)
        paths.append(path)
    return paths


def rasterize_silhouette(
    vertices_world: np.ndarray, faces: np.ndarray, world_mat: np.ndarray, size, supersample: int = 5
) -> np.ndarray:
    """Which pixel centres the mesh covers: bool [H, W] for size (W, H).

    Triangles are filled on a grid `supersample` (odd) times finer and read back at the
    fine pixel that holds each pixel centre, so the rasteriser's edge pixels widen the
    silhouette by 1/supersample of a pixel at most rather than by one pixel."""
    w, h = size
    if len(faces) == 0:
        return np.zeros((h, w), dtype=bool)
    fine_mat = np.linalg.inv(downscale_matrix(supersample)) @ world_mat[:3, :4]
    image = np.zeros((h * supersample, w * supersample), np.uint8)
    uv, depth = project(vertices_world, fine_mat)
    tris = faces[(depth[faces] > 0).all(axis=1)]
    shift = 4  # sub-pixel precision: coordinates in 1/16 pixel
    pts = np.round(uv[tris] * (1 << shift)).astype(np.int32)  # [F, 3, 2]
    # one call per triangle: fillPoly on many polygons uses the even-odd rule, so overlaps would be holes
    for tri in pts:
        cv2.fillConvexPoly(image, tri, 1, lineType=cv2.LINE_8, shift=shift)
    centre = (supersample - 1) // 2
    return image[centre::supersample, centre::supersample] > 0


def silhouette_scores(
    vertices_world: np.ndarray, faces: np.ndarray, world_mats: Sequence[np.ndarray], masks: np.ndarray
) -> np.ndarray:
    """Per-view (IoU, precision, recall) of the mesh's silhouette S against the mask M (> 0.5):
    IoU = |S & M| / |S | M|, precision = |S & M| / |S|, recall = |S & M| / |M| (1 where the
    denominator is empty). masks [N, H, W], world_mats scaled to the masks' resolution -> [N, 3]"""
    scores = []
    for world_mat, mask in zip(world_mats, masks):
        sil = rasterize_silhouette(vertices_world, faces, world_mat, (mask.shape[1], mask.shape[0]))
        ref = mask > 0.5
        both, union, n_sil, n_ref = (sil & ref).sum(), (sil | ref).sum(), sil.sum(), ref.sum()
        scores.append([both / union if union else 1.0, both / n_sil if n_sil else 1.0, both / n_ref if n_ref else 1.0])
    return np.asarray(scores, dtype=np.float64)


def silhouette_iou(
    vertices_world: np.ndarray, faces: np.ndarray, world_mats: Sequence[np.ndarray], masks: np.ndarray
) -> List[float]:
    """Per-view IoU between the mesh's silhouette and the mask (> 0.5); masks [N, H, W] and
    world_mats already scaled to the masks' resolution (silhouette_scores' first column)."""
    return silhouette_scores(vertices_world, faces, world_mats, masks)[:, 0].tolist()
