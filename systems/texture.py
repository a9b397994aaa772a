"""Textured mesh export: decimate, lay out a UV atlas, colour each texel from the training
views that see it, write OBJ + MTL + PNG and a GLB in the dataset's world frame.

Called by the mesh export when `export.texture` is true (`--mesh export.texture=true`, or at
the end of training). The atlas and camera maths (rasterising UV triangles, seam padding,
projection, z-buffer, view weights) is in utils/texture.py; this module is the model's side:
which 3D point each texel shows and the colour it gets there, by export.texture_colour:
- `photos`: the training photos that see the point (depth test against the mesh, the mask where
  there is one), blended with weights cos^VIEW_POWER (all of them, or the export.texture_views
  most frontal); the colour network seen head-on where no photo sees the point. The photos are
  the training views' files re-read export.texture_photo_scale times finer than training
  (Cameras.training); the z-buffers keep the training resolution;
- `network_views`: the colour network along those same views' directions, blended alike;
- `head_on`: the colour network seen head-on from the normal, as the .ply's vertex colours
  (NeuSModel.surface_colors). No photo sees a surface from there, so it matches no view well.
Network evaluations run in chunks under no_grad.
"""
import copy
import dataclasses
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


def photo_downscale(train_downscale: float, photo_scale: float) -> float:
    """dataset.img_downscale of the texture's photos: photo_scale times finer than the training
    images' (train_downscale), never finer than the files (1): max(1, train / scale)."""
    if not photo_scale > 0:
        raise ValueError(f"export.texture_photo_scale must be > 0, got {photo_scale}")
    return max(1.0, float(train_downscale) / float(photo_scale))


def with_img_downscale(config, downscale: float):
    """A copy of a dataset config (an OmegaConf section or a dataclass) with img_downscale set."""
    if dataclasses.is_dataclass(config):
        return dataclasses.replace(config, img_downscale=downscale)
    config = copy.deepcopy(config)
    config.img_downscale = downscale
    return config


def check_same_cameras(photos, training, index) -> None:
    """The re-read views `photos` must be the training views `training` (both Views) seen at
    another resolution: the same poses, the intrinsics the training ones rescaled
    (downscale_matrix(photo width / training width) @ K_photo = K_train). ValueError naming
    export.texture_photo_scale and the first view that differs."""
    from utils.camera import downscale_matrix

    factor = photos.images.shape[2] / training.images.shape[2]
    if abs(photos.images.shape[1] / training.images.shape[1] - factor) > 1e-9:
        raise ValueError(f"export.texture_photo_scale: the photos re-read at {photos.images.shape[2]}x"
                         f"{photos.images.shape[1]} do not scale the training images' "
                         f"{training.images.shape[2]}x{training.images.shape[1]} alike on both axes")
    rescaled = downscale_matrix(factor)[None] @ photos.intrinsics[index]  # [C, 3, 3]
    for c, i in enumerate(index):
        scale = np.abs(training.intrinsics[i]).max()
        if not (np.allclose(photos.c2w[i], training.c2w[i], atol=1e-6)
                and np.allclose(rescaled[c], training.intrinsics[i], rtol=0.0, atol=1e-6 * scale)):
            raise ValueError(f"export.texture_photo_scale: the photos re-read from the files have other cameras than "
                             f"training's (view {i}, {training.names[i]}); set export.texture_photo_scale=1")


def texture_photos(dataset, photo_scale: float):
    """The Views the texture's photos come from: `dataset`'s own (dataset.views) when
    photo_scale asks for no finer photos than training's (it is 1, or the training images are
    the files' size: never finer than the files), else the scene re-read from its files by the
    same loader (DATASETS, the run's dataset config with img_downscale = photo_downscale(...)),
    on the CPU, checked to hold the same cameras. Falls back to dataset.views, with a log line,
    where the loader cannot go finer (no config, or the files do not divide). Logs which
    photo size the texture uses."""
    from process_data import DATASETS
    from process_data.loading import DatasetError

    views = dataset.views
    height, width = views.images.shape[1:3]
    config = getattr(dataset, "config", None)
    if getattr(config, "img_downscale", None) is None or not getattr(config, "name", None):
        log.info("texture photos: the training images as loaded, %dx%d (the dataset has no config to re-read its "
                 "files finer by export.texture_photo_scale %g)", width, height, photo_scale)
        return views
    train_downscale = float(config.img_downscale)
    downscale = photo_downscale(train_downscale, photo_scale)
    if abs(downscale - train_downscale) < 1e-9:
        log.info("texture photos: the training images as loaded, %dx%d (dataset.img_downscale %g; "
                 "export.texture_photo_scale %g%s)", width, height, train_downscale, photo_scale,
                 "" if photo_scale == 1 else ": the files are no finer")
        return views
    start = time.perf_counter()
    try:
        photos = DATASETS.get(config.name)(with_img_downscale(config, downscale), "cpu").views
    except DatasetError as e:
        log.warning("texture photos: the training images as loaded, %dx%d: re-reading the files at "
                    "dataset.img_downscale %g (export.texture_photo_scale %g) failed: %s",
                    width, height, downscale, photo_scale, e)
        return views
    if len(photos.images) != len(views.images):
        raise ValueError(f"export.texture_photo_scale: the files re-read at dataset.img_downscale {downscale:g} hold "
                         f"{len(photos.images)} views, training {len(views.images)}")
    check_same_cameras(photos, views, list(dataset.split["train"]))
    log.info("texture photos: %dx%d, the files re-read at dataset.img_downscale %g (export.texture_photo_scale %g "
             "x the training images' %dx%d, which size the z-buffers) in %.1f s", photos.images.shape[2],
             photos.images.shape[1], downscale, photo_scale, width, height, time.perf_counter() - start)
    return photos


@dataclass
class Cameras:
    """The training views a texture is coloured from (normalised frame): their photos (maybe
    finer than the training images), and the size the z-buffers are made at."""

    intrinsics: np.ndarray  # [C, 3, 3] of the photos
    c2w: np.ndarray  # [C, 3, 4]
    images: np.ndarray  # [C, H, W, 3] uint8, the photos
    masks: Optional[np.ndarray] = None  # [C, H, W] in [0, 1] (the photos' size), or None
    depth_size: Optional[Tuple[int, int]] = None  # (width, height) the z-buffers are sized from (the training images'); None: the photos'

    @classmethod
    def training(cls, dataset, photo_scale: float = 1.0) -> "Cameras":
        """The training split of a RayDataset (never its held-out views), the photos at
        photo_scale times the training images' resolution (texture_photos; at most the
        files'), the z-buffers sized from the training images. Numpy arrays on the CPU."""
        index = list(dataset.split["train"])
        views = texture_photos(dataset, photo_scale)
        masks = views.masks[index] if dataset.has_masks and views.masks is not None else None
        return cls(views.intrinsics[index].astype(np.float64), views.c2w[index].astype(np.float64),
                   views.images[index], masks, (dataset.width, dataset.height))


def depth_pixels(photo_size: Tuple[int, int], depth_size: Tuple[int, int]) -> Tuple[Tuple[int, int], np.ndarray]:
    """The z-buffers' (width, height): depth_size (the training images') fitted within DEPTH_SIZE
    a side, and the z-buffer pixels per photo pixel along x and y, scale [2]. A photo point u
    lies at (u + 0.5) s - 0.5 in the z-buffer (pixel centres at integers on both, as
    utils.camera.downscale_matrix)."""
    fit = min(1.0, DEPTH_SIZE / max(depth_size))
    size = (max(1, round(depth_size[0] * fit)), max(1, round(depth_size[1] * fit)))
    return size, np.array([size[0] / photo_size[0], size[1] / photo_size[1]])


def rescale_matrix(scale: np.ndarray) -> np.ndarray:
    """S [3, 3] with S @ K the camera of an image resampled by scale [2] (x, y) pixels per
    pixel, pixel centres staying at integers: u' = (u + 0.5) s_x - 0.5."""
    return np.array([[scale[0], 0.0, 0.5 * scale[0] - 0.5], [0.0, scale[1], 0.5 * scale[1] - 0.5], [0.0, 0.0, 1.0]])


class ViewSelector:
    """Which training cameras see the points of one mesh, and how much each counts: the mesh's
    z-buffer in every camera (the training images' size, at most DEPTH_SIZE pixels a side), built
    once. Points project into the photos with the photos' intrinsics (where their colour is
    sampled) and into the z-buffers with depth_intrinsics (the depth test)."""

    def __init__(self, cameras: Cameras, vertices: np.ndarray, faces: np.ndarray):
        self.cameras = cameras
        height, width = cameras.images.shape[1:3]
        self.size, self.scale = depth_pixels((width, height), cameras.depth_size or (width, height))
        self.depth_intrinsics = rescale_matrix(self.scale)[None] @ cameras.intrinsics  # [C, 3, 3]
        depths = []
        for c in range(len(cameras.c2w)):
            uv, z = project(vertices, self.depth_intrinsics[c:c + 1], cameras.c2w[c:c + 1])
            depths.append(depth_map(uv[0], z[0], faces, *self.size))
        self.depth = np.stack(depths)  # [C, h, w]
        if cameras.masks is not None:  # where the photo shows the background nothing is seen: depth -inf
            self.depth[self.background_at_depth_pixels(cameras.masks)] = -np.inf

    def background_at_depth_pixels(self, masks: np.ndarray) -> np.ndarray:
        """masks [C, H, W] (photo size) -> bool [C, h, w]: the z-buffer pixels whose footprint in
        the photo is mostly background (the mask's area average over it < 0.5, cv2 INTER_AREA as
        the loaders downscale). At the photo's size it is the mask itself."""
        from process_data.loading import resize

        if (masks.shape[2], masks.shape[1]) == tuple(self.size):
            return masks < 0.5
        return np.stack([resize(np.ascontiguousarray(m, dtype=np.float32), self.size) for m in masks]) < 0.5

    def select(self, points: np.ndarray, normals: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """points [N, 3], unit normals [N, 3] -> the k most frontal cameras that see each point
        (k <= 0: every camera, in camera order):
        view [N, k], weight [N, k] (summing to 1; all 0 where no camera sees the point) and
        where it lies in their photos, uv [N, k, 2]."""
        cams = self.cameras
        # float32 for the [C, N] arrays (half the memory traffic; 1e-4 pixel at 1000 pixels)
        points, normals = points.astype(np.float32), normals.astype(np.float32)
        c2w = cams.c2w.astype(np.float32)
        uv, z = project(points, cams.intrinsics.astype(np.float32), c2w)  # [C, N, 2], [C, N] in the photos
        tolerance = DEPTH_SLACK + 2.0 * z / self.depth_intrinsics[:, 0, 0][:, None].astype(np.float32)  # [C, N]
        scale = self.scale.astype(np.float32)
        depth_uv = uv if (self.scale == 1).all() else (uv + np.float32(0.5)) * scale - np.float32(0.5)  # [C, N, 2]
        visible = depth_test(depth_uv, z, self.depth, tolerance)  # [C, N] (and on the mask: see __init__)
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
