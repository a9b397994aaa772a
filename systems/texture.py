"""Textured mesh export: decimate, lay out a UV atlas, colour each texel with the colour
network, write OBJ + MTL + PNG and a GLB in the dataset's world frame.

Called by the mesh export when `export.texture` is true (`--mesh export.texture=true`, or at
the end of training). The atlas maths (rasterising UV triangles, seam padding) is in
utils/texture.py; this module is the model's side: which 3D point each texel shows, and the
colour the colour network gives it there, seen head-on from the surface normal as the vertex
colours are (NeuSModel.surface_colors), evaluated in chunks under no_grad.
"""
import logging
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import trimesh
from PIL import Image

from utils.mesh import to_world
from utils.texture import dilate, grid_atlas, rasterize_atlas, texel_points

log = logging.getLogger(__name__)


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


def bake_texture(model, vertices: np.ndarray, faces: np.ndarray, size: int, chunk: int, device):
    """A per-triangle atlas for the mesh (vertices [V, 3] in the NORMALISED frame, faces
    [F, 3]) and its texture -> corner_vertex [3F], uv [3F, 2], uv_faces [F, 3] (see
    utils.texture.grid_atlas) and the texture image uint8 [size, size, 3] (row 0 on top)."""
    corner_vertex, uv, uv_faces = grid_atlas(vertices, faces, size)
    face_id, bary = rasterize_atlas(uv, uv_faces, size)
    points, index = texel_points(vertices[corner_vertex], uv_faces, face_id, bary)
    colours = surface_colours(model, points, chunk, device)
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
    timings: Optional[Dict[str, float]] = None,
) -> List[str]:
    """The cleaned mesh (vertices [V, 3] in the normalised frame, faces [F, 3]) decimated to
    export.texture_faces, textured at export.texture_size^2 and written as
    `<stem>-textured.{obj,mtl,png,glb}` in the world frame (X_world = scale_mat @ [X, 1])
    -> the paths. `timings`, when given, receives the seconds of each stage."""
    cfg = export_config
    times = timings if timings is not None else {}
    start = time.perf_counter()
    vertices, faces = decimate(vertices, faces, cfg.texture_faces)
    times["decimate"] = time.perf_counter() - start
    start = time.perf_counter()
    corner_vertex, uv, uv_faces, image = bake_texture(model, vertices, faces, cfg.texture_size, cfg.mesh_chunk, device)
    times["bake"] = time.perf_counter() - start
    start = time.perf_counter()
    mesh = textured_trimesh(to_world(vertices, scale_mat), faces, corner_vertex, uv, uv_faces, image)
    paths = write_textured(mesh, f"{stem}-textured")
    times["write"] = time.perf_counter() - start
    log.info("textured mesh: %d faces, %d^2 texture (decimate %.1f s, bake %.1f s, write %.1f s) -> %s",
             len(faces), cfg.texture_size, times["decimate"], times["bake"], times["write"], ", ".join(paths))
    return paths
