"""Textured mesh export: decimate, lay out a UV atlas, colour each texel from the training
views that see it, write OBJ + MTL + PNG and a GLB in the dataset's world frame.

Called by the mesh export when `export.texture` is true (`--mesh export.texture=true`, or at
the end of training). The atlas and camera maths (rasterising UV triangles, seam padding,
projection, z-buffer, view weights) is in utils/texture.py; this module is the model's side:
which 3D point each texel shows and the colour it gets there, by export.texture_colour:
- `photos`: the training photos that see the point (depth test against the mesh, the mask where
  there is one), blended with weights cos^VIEW_POWER (all of them, or the export.texture_views
  most frontal); the colour network seen head-on where no photo sees the point;
- `network_views`: the colour network along those same views' directions, blended alike;
- `head_on`: the colour network seen head-on from the normal, as the .ply's vertex colours
  (NeuSModel.surface_colors). No photo sees a surface from there, so it matches no view well.
Network evaluations run in chunks under no_grad.
"""
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import trimesh
from PIL import Image

from utils.mesh import to_world
from utils.texture import (
    depth_map,
    depth_test,
    dilate,
    facing,
    grid_atlas,
    project,
    rasterize_atlas,
    sample_image,
    texel_points,
    top_views,
    view_weights,
)

log = logging.getLogger(__name__)

# a view's weight: cos(normal, to camera)^VIEW_POWER. A texel has one colour for every direction, and
# the photos of one point differ from view to view (DTU's lights move with the camera): the colour
# that errs least in an unseen view is the mean over the views, with a mild preference for frontal
# views (they see the surface at the finest footprint). Scan 24, held-out views, masked PSNR at the
# mesh's hits: 3 views at cos^4: 17.2 dB, all views at cos^4: 18.9, at cos^1: 19.6, uniform: 19.7.
VIEW_POWER = 1.0
MIN_COS = 0.1  # views more grazing than this (about 84 degrees) do not count
DEPTH_SIZE = 800  # the z-buffers' longer side, pixels (the photos are sampled at their own size)
DEPTH_SLACK = 0.005  # depth test: a point this far (normalised units) + 2 z-buffer pixels behind the surface still counts as seen


def decimate(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> Tuple[np.ndarray, np.ndarray]:
    """Quadric-error decimation (fast-simplification) to about target_faces faces; a mesh
    already that small comes back unchanged. vertices [V, 3], faces [F, 3] -> the same."""
    if target_faces <= 0 or len(faces) <= target_faces:
        return vertices, faces
    import fast_simplification

    reduction = 1.0 - target_faces / len(faces)
    points, triangles = fast_simplification.simplify(
        np.ascontiguousarray(vertices, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.int32), reduction
    )
    return points.astype(np.float64), triangles.astype(np.int64)


def surface_colours(model, points: np.ndarray, chunk: int, device) -> np.ndarray:
    """The colour network at points [N, 3] (normalised frame), seen head-on from the SDF
    normal -> colours [N, 3] in [0, 1] (float32, on the CPU). Chunks of `chunk` points."""
    model.eval()
    out = np.empty((len(points), 3), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(points), chunk):
            x = torch.from_numpy(points[start:start + chunk].astype(np.float32)).to(device)
            out[start:start + chunk] = model.surface_colors(x, chunk).clamp(0, 1).cpu().numpy()
    return out


@dataclass
class Cameras:
    """The training views a texture is coloured from (normalised frame)."""

    intrinsics: np.ndarray  # [C, 3, 3]
    c2w: np.ndarray  # [C, 3, 4]
    images: np.ndarray  # [C, H, W, 3] uint8
    masks: Optional[np.ndarray] = None  # [C, H, W] in [0, 1], or None

    @classmethod
    def training(cls, dataset) -> "Cameras":
        """The training split of a RayDataset (never its held-out views)."""
        index = list(dataset.split["train"])
        views = dataset.views
        masks = views.masks[index] if dataset.has_masks and views.masks is not None else None
        return cls(views.intrinsics[index].astype(np.float64), views.c2w[index].astype(np.float64),
                   views.images[index], masks)


class ViewSelector:
    """Which training cameras see the points of one mesh, and how much each counts: the mesh's
    z-buffer in every camera (at most DEPTH_SIZE pixels a side), built once."""

    def __init__(self, cameras: Cameras, vertices: np.ndarray, faces: np.ndarray):
        self.cameras = cameras
        height, width = cameras.images.shape[1:3]
        self.scale = min(1.0, DEPTH_SIZE / max(height, width))
        self.size = (max(1, round(width * self.scale)), max(1, round(height * self.scale)))
        self.depth_intrinsics = cameras.intrinsics * np.array([self.scale, self.scale, 1.0])[None, :, None]
        depths = []
        for c in range(len(cameras.c2w)):
            uv, z = project(vertices, self.depth_intrinsics[c:c + 1], cameras.c2w[c:c + 1])
            depths.append(depth_map(uv[0], z[0], faces, *self.size))
        self.depth = np.stack(depths)  # [C, h, w]
        if cameras.masks is not None:  # where the photo shows the background nothing is seen: depth -inf
            self.depth[self.background_at_depth_pixels(cameras.masks)] = -np.inf

    def background_at_depth_pixels(self, masks: np.ndarray) -> np.ndarray:
        """masks [C, H, W] (photo size) -> bool [C, h, w]: the z-buffer pixels whose nearest photo
        pixel is background (mask < 0.5). At scale 1 it is the mask itself. The rounding is
        utils.texture.nearest_pixel's, done per axis: [h] rows and [w] columns, not [C, h w] pairs."""
        width, height = self.size
        cols = np.clip(np.rint(np.arange(width) / self.scale), 0, masks.shape[2] - 1).astype(np.int64)
        rows = np.clip(np.rint(np.arange(height) / self.scale), 0, masks.shape[1] - 1).astype(np.int64)
        return masks[:, rows[:, None], cols[None, :]] < 0.5

    def select(self, points: np.ndarray, normals: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """points [N, 3], unit normals [N, 3] -> the k most frontal cameras that see each point
        (k <= 0: every camera, in camera order):
        view [N, k], weight [N, k] (summing to 1; all 0 where no camera sees the point) and
        where it lies in their photos, uv [N, k, 2]."""
        cams = self.cameras
        # float32 for the [C, N] arrays (half the memory traffic; 1e-4 pixel at 1000 pixels)
        points, normals = points.astype(np.float32), normals.astype(np.float32)
        c2w = cams.c2w.astype(np.float32)
        uv, z = project(points, cams.intrinsics.astype(np.float32), c2w)  # [C, N, 2], [C, N]
        tolerance = DEPTH_SLACK + 2.0 * z / self.depth_intrinsics[:, 0, 0][:, None].astype(np.float32)  # [C, N]
        visible = depth_test(uv * np.float32(self.scale), z, self.depth, tolerance)  # [C, N] (and on the mask: see __init__)
        cos = facing(normals, points, c2w[:, :, 3])  # [C, N]
        view, weight = top_views(view_weights(cos, visible, VIEW_POWER, MIN_COS), k if k > 0 else len(cams.c2w))
        return view, weight, uv[view, np.arange(len(points))[:, None]]


def colour_points(model, points: np.ndarray, normals: np.ndarray, rule: str, selector: Optional[ViewSelector],
                  k: int, chunk: int, device) -> np.ndarray:
    """The colour of surface points [N, 3] (normalised frame, unit normals [N, 3]) by `rule`
    (export.texture_colour; see the module's docstring) -> [N, 3] float32 in [0, 1].
    Without a selector (no cameras) every rule falls back to head_on."""
    if rule == "head_on" or selector is None:
        return surface_colours(model, points, chunk, device)
    out = np.empty((len(points), 3), dtype=np.float32)
    unseen = []
    step = 32768  # points a selection (its [C, step, 3] arrays stay a few hundred MB)
    for start in range(0, len(points), step):
        p, n = points[start:start + step], normals[start:start + step]
        view, weight, uv = selector.select(p, n, k)  # [m, k], [m, k], [m, k, 2]
        if rule == "photos":  # only where a view counts (with all views, about half are occluded or behind)
            counts = weight > 0  # [m, k]
            colours = np.zeros((*view.shape, 3), dtype=np.float32)
            colours[counts] = sample_image(selector.cameras.images, view[counts], uv[counts]) / 255.0
        elif rule == "network_views":
            dirs = p[:, None] - selector.cameras.c2w[view, :, 3]  # [m, k, 3] camera -> point
            dirs /= np.maximum(np.linalg.norm(dirs, axis=-1, keepdims=True), 1e-12)
            colours = network_colours(model, p, dirs, chunk, device)
        else:
            raise ValueError(f"unknown texture colour rule '{rule}'")
        out[start:start + step] = np.einsum("mk,mkc->mc", weight, colours)
        unseen.append(start + np.flatnonzero(weight.sum(axis=1) == 0))
    unseen = np.concatenate(unseen)
    if len(unseen):  # no training photo sees them: the network, head-on
        out[unseen] = surface_colours(model, points[unseen], chunk, device)
    log.info("texture colours (%s): %d points, %.1f%% seen by no training view", rule, len(points),
             100.0 * len(unseen) / max(len(points), 1))
    return out


def network_colours(model, points: np.ndarray, dirs: np.ndarray, chunk: int, device) -> np.ndarray:
    """The colour network at points [N, 3] seen along dirs [N, K, 3] -> [N, K, 3] float32."""
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(points.astype(np.float32)).to(device)
        d = torch.from_numpy(dirs.astype(np.float32)).to(device)
        return model.surface_colors(x, max(1, chunk // dirs.shape[1]), d).clamp(0, 1).cpu().numpy()


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted smooth vertex normals [V, 3] (outward for marching cubes' winding)."""
    return np.asarray(trimesh.Trimesh(vertices=vertices, faces=faces, process=False).vertex_normals)


def vertex_colours(model, vertices: np.ndarray, faces: np.ndarray, export_config, cameras: Optional[Cameras],
                   device) -> np.ndarray:
    """The mesh's vertex colours [V, 3] by export.texture_colour (normalised frame)."""
    cfg = export_config
    rule = getattr(cfg, "texture_colour", "head_on")
    selector = ViewSelector(cameras, vertices, faces) if cameras is not None and rule != "head_on" else None
    return colour_points(model, vertices, vertex_normals(vertices, faces), rule, selector,
                         getattr(cfg, "texture_views", 0), cfg.mesh_chunk, device)


def bake_texture(model, vertices: np.ndarray, faces: np.ndarray, size: int, chunk: int, device,
                 rule: str = "head_on", cameras: Optional[Cameras] = None, k: int = 0):
    """A per-triangle atlas for the mesh (vertices [V, 3] in the NORMALISED frame, faces
    [F, 3]) and its texture -> corner_vertex [3F], uv [3F, 2], uv_faces [F, 3] (see
    utils.texture.grid_atlas) and the texture image uint8 [size, size, 3] (row 0 on top).
    Texel colours by `rule` from `cameras` (colour_points), texel normals interpolated from
    the smooth vertex normals."""
    corner_vertex, uv, uv_faces = grid_atlas(vertices, faces, size)
    face_id, bary = rasterize_atlas(uv, uv_faces, size)
    points, index = texel_points(vertices[corner_vertex], uv_faces, face_id, bary)
    selector = ViewSelector(cameras, vertices, faces) if cameras is not None and rule != "head_on" else None
    if selector is None:
        colours = surface_colours(model, points, chunk, device)
    else:
        normals, _ = texel_points(vertex_normals(vertices, faces)[corner_vertex], uv_faces, face_id, bary)
        normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
        colours = colour_points(model, points, normals, rule, selector, k, chunk, device)
    image = np.zeros((size * size, 3), dtype=np.float32)
    image[index] = colours
    filled = np.zeros(size * size, dtype=bool)
    filled[index] = True
    image = dilate(image.reshape(size, size, 3), filled.reshape(size, size))
    return corner_vertex, uv, uv_faces, np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def textured_trimesh(
    vertices_world: np.ndarray, faces: np.ndarray, corner_vertex: np.ndarray, uv: np.ndarray,
    uv_faces: np.ndarray, image: np.ndarray,
) -> trimesh.Trimesh:
    """The mesh with one vertex per UV corner (positions vertices_world[corner_vertex]),
    the texture as its material, and the smooth normals of the shared-vertex mesh (so
    viewers shade it smooth although every triangle has vertices of its own)."""
    normals = trimesh.Trimesh(vertices=vertices_world, faces=faces, process=False).vertex_normals
    material = trimesh.visual.material.PBRMaterial(
        name="neus_texture", baseColorTexture=Image.fromarray(image), metallicFactor=0.0, roughnessFactor=1.0,
    )
    mesh = trimesh.Trimesh(
        vertices=vertices_world[corner_vertex], faces=uv_faces,
        vertex_normals=normals[corner_vertex],
        visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
        process=False,
    )
    return mesh


def write_textured(mesh: trimesh.Trimesh, stem: str) -> List[str]:
    """stem.obj + stem.mtl + stem.png, and stem.glb (the texture embedded as PNG; no Draco)
    -> their paths."""
    folder, name = os.path.dirname(stem) or ".", os.path.basename(stem)
    os.makedirs(folder, exist_ok=True)
    obj, files = trimesh.exchange.obj.export_obj(
        mesh, include_normals=True, include_texture=True, mtl_name=f"{name}.mtl", return_texture=True,
    )
    paths = [f"{stem}.obj"]
    with open(paths[0], "w") as f:
        f.write(obj)
    png = f"{name}.png"
    for file_name, data in files.items():  # the .mtl and the texture image trimesh names
        if file_name.endswith(".mtl"):
            data = rename_texture(data, png)
            path = os.path.join(folder, file_name)
        elif file_name.lower().endswith((".png", ".jpg", ".jpeg")):
            path = os.path.join(folder, png)
        else:
            path = os.path.join(folder, file_name)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    glb = f"{stem}.glb"
    with open(glb, "wb") as f:
        f.write(trimesh.exchange.gltf.export_glb(trimesh.Scene(mesh), include_normals=True))
    paths.append(glb)
    return paths


def rename_texture(mtl: bytes, png: str) -> bytes:
    """Point the MTL's texture maps (map_Kd, ...) at `png`, with a white diffuse factor and
    no specular term: the texture is the colour as photographed (light baked in), and
    viewers multiply Kd into map_Kd."""
    fixed = {"Ka": "Ka 1.0 1.0 1.0", "Kd": "Kd 1.0 1.0 1.0", "Ks": "Ks 0.0 0.0 0.0"}
    lines = []
    for line in mtl.decode("utf-8").splitlines():
        key = line.split(" ", 1)[0]
        lines.append(f"{key} {png}" if key.startswith("map_") else fixed.get(key, line))
    return ("\n".join(lines) + "\n").encode("utf-8")


def export_textured(
    model, vertices: np.ndarray, faces: np.ndarray, scale_mat: np.ndarray, export_config, stem: str, device,
    timings: Optional[Dict[str, float]] = None, cameras: Optional[Cameras] = None,
) -> List[str]:
    """The cleaned mesh (vertices [V, 3] in the normalised frame, faces [F, 3]) decimated to
    export.texture_faces, textured at export.texture_size^2 (colours by
    export.texture_colour from `cameras`, the training views; head-on without) and written as
    `<stem>-textured.{obj,mtl,png,glb}` in the world frame (X_world = scale_mat @ [X, 1])
    -> the paths. `timings`, when given, receives the seconds of each stage."""
    cfg = export_config
    times = timings if timings is not None else {}
    start = time.perf_counter()
    vertices, faces = decimate(vertices, faces, cfg.texture_faces)
    times["decimate"] = time.perf_counter() - start
    start = time.perf_counter()
    rule = getattr(cfg, "texture_colour", "head_on")
    corner_vertex, uv, uv_faces, image = bake_texture(model, vertices, faces, cfg.texture_size, cfg.mesh_chunk, device,
                                                      rule, cameras, getattr(cfg, "texture_views", 0))
    times["bake"] = time.perf_counter() - start
    start = time.perf_counter()
    mesh = textured_trimesh(to_world(vertices, scale_mat), faces, corner_vertex, uv, uv_faces, image)
    paths = write_textured(mesh, f"{stem}-textured")
    times["write"] = time.perf_counter() - start
    log.info("textured mesh (%s colours): %d faces, %d^2 texture (decimate %.1f s, bake %.1f s, write %.1f s) -> %s",
             rule, len(faces), cfg.texture_size, times["decimate"], times["bake"], times["write"], ", ".join(paths))
    return paths
