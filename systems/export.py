"""Mesh export of a trained model over its dataset: marching cubes on the SDF (coarse, then
fine), clean-up (largest component, mask culling), vertex colours, the mesh written in the
dataset's world frame, and its metrics against a ground-truth mesh. Every rank calls
`export` (each evaluates a block of the SDF grid's planes, through the Shards helper it is
given); rank 0 runs marching cubes, the clean-up and writes the files.

A hook that writes more from the same surface (a textured mesh) takes the `Mesh` that
`extract` returns: vertices and faces in the normalised and the world frame.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from utils.distributed import Shards
from utils.config import MeshFormat, TextureColour
from utils.mesh import (
    extract_surface,
    faces_inside_masks,
    grid_shape,
    largest_component,
    remove_unused_vertices,
    save_mesh,
    sdf_on_grid,
    to_world,
)
from utils.isolate import Plane, find_support_plane, split_at_plane, support_plane_from_points
from utils.triangulate import sparse_points
from utils.metrics import mesh_metrics

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    mesh_resolution: int = 512  # marching cubes grid (fine pass) over the object region
    mesh_threshold: float = 0.0  # iso-level of the SDF
    mesh_chunk: int = 65536  # points per SDF evaluation
    formats: List[MeshFormat] = field(default_factory=lambda: ["ply"])
    largest_component: bool = True  # keep only the largest connected piece
    cull_with_masks: bool = False  # drop faces that project outside the (dilated) masks
    fscore_threshold: float = 0.01  # F-score distance, in units of the normalised (unit-sphere) radius
    metrics_points: int = 200000  # surface samples on each mesh for Chamfer / F-score (fewer in the tests)
    # the object without its support (utils/isolate.py): find the plane it stands on (all cameras
    # above it, reaching the region's edge) and cut the surface `isolate_margin` above it (normalised
    # units); what is cut goes to it<step>-mc<res>-removed.ply. On in the unmasked configs.
    isolate: bool = False
    isolate_margin: float = 0.02
    isolate_tolerance: float = 0.01  # RANSAC inlier distance of the plane
    # when the surface holds too little of the table (the background took it), the plane is found
    # among points triangulated from the training photos (utils/triangulate.py: the lowest plane
    # holding many of them) and the surface is cut isolate_points_margin from it: below the band
    # of +-isolate_points_tolerance that the table's points fill, so that the object's foot stays
    isolate_from_points: bool = True
    isolate_points_tolerance: float = 0.02
    isolate_points_margin: float = -0.03
    # a textured mesh beside the coloured one (systems/texture.py): it<step>-mc<res>-textured.obj
    # (+ .mtl, .png) and .glb, the mesh decimated to texture_faces, a texture_size^2 atlas
    texture: bool = False
    texture_faces: int = 100000
    texture_size: int = 2048
    # each texel's colour (and the decimated mesh's vertex colours): `photos` blends the training
    # photos that see the point (depth test against the mesh; all of them, or the texture_views
    # most frontal; weighted by the cosine of the angle to the normal; the network where none sees
    # it); `network_views` evaluates the colour network along those views' directions instead (one
    # evaluation per view: set texture_views, e.g. 3); `head_on` the network viewed from the normal
    # (as the .ply's vertex colours)
    texture_colour: TextureColour = "photos"
    texture_views: int = 0  # 0: every training view that sees the point
    # `photos` samples the training views' files re-read at this many times the training images'
    # resolution (dataset.img_downscale / texture_photo_scale, never finer than the files; the
    # training images themselves when that is their size, e.g. the demo at img_downscale 1). A
    # training pixel is the mean of img_downscale^2 file pixels: finer photos keep the detail a
    # 2048^2 atlas can hold (scan 24: +0.06 dB at one ray a pixel, +0.11 supersampled). The
    # z-buffers keep the training size (their cost; finer ones changed nothing). 1: the training images.
    texture_photo_scale: float = 2.0


@dataclass
class Mesh:
    vertices: np.ndarray  # [V, 3] normalised frame
    vertices_world: np.ndarray  # [V, 3] the dataset's world frame
    faces: np.ndarray  # [F, 3]
    removed: Optional[Tuple[np.ndarray, np.ndarray]] = None  # export.isolate's cut: world vertices, faces


def mesh_stem(save_dir: str, step: int, resolution: int) -> str:
    """save/it<step>-mc<res>: the meshes' path without the format's suffix."""
    return os.path.join(save_dir, f"it{step:06d}-mc{resolution}")


class MeshExport:
    """The surface of `model` (its mesh_sdf and surface_colors) over `dataset` (its frame,
    cameras and masks)."""

    def __init__(self, model: torch.nn.Module, dataset, config: ExportConfig, device: torch.device,
                 shards: Shards = Shards()):
        self.model = model
        self.shards = shards
        self.dataset = dataset
        self.config = config
        self.device = device
        self._photo_points: Optional[np.ndarray] = None  # export.isolate's points, triangulated once

    def export(self, step: int, save_dir: str) -> List[str]:
        """Marching cubes on the SDF -> coloured mesh in the dataset's world frame, written to
        save/it<step>-mc<res>.<fmt> -> the paths (rank 0; [] elsewhere). Every rank must call it."""
        cfg = self.config
        mesh = self.extract()
        if mesh is None:
            return []
        points = torch.from_numpy(mesh.vertices.astype(np.float32)).to(self.device)
        colors = self.model.surface_colors(points, cfg.mesh_chunk).cpu().numpy()
        stem = mesh_stem(save_dir, step, cfg.mesh_resolution)
        paths = save_mesh(stem, mesh.vertices_world, mesh.faces, colors, list(cfg.formats))
        if cfg.texture:
            from systems.texture import Cameras, export_textured

            # the photos (maybe re-read finer, on the CPU) live only for this call
            paths += export_textured(self.model, mesh.vertices, mesh.faces, self.dataset.views.scale_mat, cfg, stem,
                                     self.device, cameras=Cameras.training(self.dataset, cfg.texture_photo_scale))
        log.info("mesh: %d vertices, %d faces -> %s", len(mesh.vertices_world), len(mesh.faces), ", ".join(paths))
        if mesh.removed is not None and len(mesh.removed[1]):
            removed_path = save_mesh(f"{stem}-removed", *mesh.removed, None, ["ply"])[0]
            log.info("isolate: the cut-off support and pieces (%d faces) -> %s", len(mesh.removed[1]), removed_path)
        return paths

    def extract(self) -> Optional[Mesh]:
        """The cleaned surface (rank 0; None elsewhere): largest component, unused vertices
        dropped, faces outside the masks culled when asked."""
        cfg = self.config
        surface = self.surface()
        if surface is None:
            return None
        vertices, faces = surface
        removed = None
        if cfg.isolate:
            faces, cut = self.isolate(vertices, faces)
            if cut is not None:
                removed = remove_unused_vertices(to_world(vertices, self.dataset.views.scale_mat), cut)
        if cfg.largest_component:
            faces = largest_component(faces)
        vertices, faces = remove_unused_vertices(vertices, faces)
        vertices_world = to_world(vertices, self.dataset.views.scale_mat)
        if cfg.cull_with_masks and self.dataset.has_masks:
            views = self.dataset.views
            faces = faces_inside_masks(vertices_world, faces, views.world_mats, views.masks)
            vertices, faces, vertices_world = remove_unused_vertices(vertices, faces, vertices_world)
        return Mesh(vertices, vertices_world, faces, removed)

    def isolate(self, vertices: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """export.isolate: the faces of the object above its supporting plane and the faces cut
        off (None when no support plane is found: the surface is kept whole)."""
        cfg, views = self.config, self.dataset.views
        # a model trained with the opacity prior spared below the photos' plane (its prior plane)
        # may hold surface there: the cut must be that plane's, not one found in the surface
        plane = None if self.model.has_prior_plane else find_support_plane(
            vertices, faces, views.c2w, self.model.config.radius, cfg.isolate_tolerance)
        if plane is not None:
            kept, removed = split_at_plane(vertices, faces, plane, cfg.isolate_margin)
            log.info("isolate: support plane n=(%.3f, %.3f, %.3f) d=%.3f carries %.0f%% of the surface; kept %d of "
                     "%d faces", *plane.normal, plane.offset, 100 * plane.area_share, len(kept), len(faces))
            return kept, removed
        if cfg.isolate_from_points:
            points = self.photo_points()
            plane = self.photo_plane()
            if plane is not None:
                kept, removed = split_at_plane(vertices, faces, plane, cfg.isolate_points_margin)
                log.info("isolate: the surface holds no support plane; the photos' points do: n=(%.3f, %.3f, %.3f) "
                         "d=%.3f holds %.0f%% of %d points; cut %.3f from it, kept %d of %d faces", *plane.normal,
                         plane.offset, 100 * plane.area_share, len(points), cfg.isolate_points_margin, len(kept),
                         len(faces))
                return kept, removed
        log.info("isolate: no supporting plane under the object (in the surface: cameras on one side, reaching the "
                 "region's edge%s); the mesh is kept whole",
                 "; nor in the points triangulated from the photos" if cfg.isolate_from_points else "")
        return faces, None

    def photo_plane(self) -> Optional[Plane]:
        """The plane the object stands on, among the photos' triangulated points (None if none qualifies)."""
        return support_plane_from_points(self.photo_points(), self.dataset.views.c2w, self.model.config.radius,
                                         self.config.isolate_points_tolerance)

    def photo_points(self) -> np.ndarray:
        """Points triangulated from the training photos (utils/triangulate.py), in the normalised
        frame, computed once per run -> [M, 3]"""
        if self._photo_points is None:
            views = self.dataset.views
            train = self.dataset.split["train"] or list(range(len(views.c2w)))
            self._photo_points = sparse_points(views.images[train], views.intrinsics[train], views.c2w[train])
        return self._photo_points

    def surface(self) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """utils.mesh.extract_surface's coarse-then-fine marching cubes, each SDF grid's x-planes
        shared out over the ranks and marching cubes on rank 0 -> vertices [V, 3], faces [F, 3]
        in the normalised frame (rank 0; None elsewhere)."""
        cfg = self.config
        self.model.eval()
        # rank 0 alone holds the coarse grid: the others take its fine box, so all evaluate one grid
        return extract_surface(self.sdf_grid, self.model.config.radius, cfg.mesh_resolution, cfg.mesh_threshold,
                               agree=self.shards.agree)

    def sdf_grid(self, bounds: np.ndarray, resolution: int) -> Tuple[Optional[np.ndarray], np.ndarray]:
        """utils.mesh.sdf_on_grid with the x-planes shared out in N blocks (map_in_turns: rank r
        evaluates block r) -> the whole grid [nx, ny, nz] on rank 0 (None elsewhere), and the
        voxel size."""
        n_planes = grid_shape(bounds, resolution)[0][0]
        blocks = self.shards.blocks(n_planes)

        def planes(block: slice) -> Tuple[np.ndarray, np.ndarray]:  # [planes in block, ny, nz], voxel
            return sdf_on_grid(self.model.mesh_sdf, bounds, resolution, self.config.mesh_chunk, self.device, block)

        parts = [part for _, part in self.shards.map(planes, blocks)]
        voxel = np.full(3, grid_shape(bounds, resolution)[1])
        return (np.concatenate([values for values, _ in parts]) if self.shards.writes else None), voxel

    def metrics(self, mesh_path: str, gt_path: str) -> Dict[str, float]:
        """Chamfer / F-score against the ground-truth mesh at gt_path, if there is one (world units)."""
        if not os.path.isfile(gt_path):
            return {}
        import trimesh  # lazily: ~1 s of imports a training start need not pay

        pred, gt = trimesh.load(mesh_path, process=False), trimesh.load(gt_path, process=False)
        world_radius = float(np.abs(np.linalg.det(self.dataset.views.scale_mat[:3, :3])) ** (1 / 3))
        result = mesh_metrics(
            np.asarray(pred.vertices), np.asarray(pred.faces), np.asarray(gt.vertices), np.asarray(gt.faces),
            n_points=self.config.metrics_points, threshold=self.config.fscore_threshold * world_radius,
        )
        result["gt_mesh"] = gt_path
        result["unit_sphere_radius_world"] = world_radius
        log.info("mesh vs %s: %s", gt_path, result)
        return result
