"""The built-in demo scene: a textured analytic object rendered into the NeuS format.

The object is a smooth union of four primitives, given as an exact(ish) signed distance
function in the NORMALISED frame (z up, everything inside radius ~0.72):

    base     rounded box, half extents (0.50, 0.38, 0.10), corner radius 0.06, centre (0, 0, -0.33)
    sphere   radius 0.27 at (-0.22, 0.06, 0.03), resting on the base
    torus    ring radius 0.19, tube radius 0.065, standing upright on the base at (0.27, -0.10, -0.02),
             its plane turned 35 degrees about z
    capsule  radius 0.075 from (0.36, 0.24, -0.23) to (0.22, 0.26, 0.38), a leaning pillar

joined with a polynomial smooth-min (k = 0.04), so small fillets form where they touch. The
albedo is procedural and has texture at several scales: a per-primitive base colour, a
slow colour drift, a soft 3D checker (cells 0.12), fine stripes (period 0.06), three
octaves of value noise and sparse light and dark spots (noise and spots drawn from `seed`);
with `detail` > 0 a layer of fine high-contrast spots (lattice period 1/60) is added on top,
which gives SIFT enough corners to recover the cameras accurately (the imgs2poses test).
Shading is Lambertian with one directional light from above plus ambient, no shadows, on a
white background, so the scene is photo-consistent and has SIFT features all over the object.

The WORLD frame is not the normalised one: the object centre sits at (12, -7, 30) world units
with scale 80 (world units read as millimetres, like DTU):
X_world = scale_mat @ X_normalised, scale_mat = [[80, 0, 0, 12], [0, 80, 0, -7], [0, 0, 80, 30], [0, 0, 0, 1]].

Cameras (pinhole, OpenCV axes: x right, y down, z forward; integer pixel coordinates are pixel
centres, principal point at the image centre ((W-1)/2, (H-1)/2)) lie at distance 2.7 normalised
units on a spiral: elevation from -10 to 60 degrees, azimuth stepping by the golden angle, all
looking at the centre with world +z up in the image; horizontal field of view 44 degrees.

Written to out_dir:

    image/000000.png ...     RGB 8-bit renders, one per view
    mask/000.png ...         object masks (hit test of the pixel-centre ray), 0/255, 3 channels like DTU's
    cameras_sphere.npz       per view i: world_mat_i = K [R | t] (4x4, world frame), scale_mat_i,
                             camera_mat_i (K as 4x4), and the inverses world_mat_inv_i,
                             scale_mat_inv_i, camera_mat_inv_i (the keys NeuS writes)
    gt_mesh.ply              ground-truth surface (marching cubes of the analytic SDF, 256^3 over
                             [-1, 1]^3), in the WORLD frame, faces wound outwards
    scene.json               parameters, world frame, object radius in world units, a description;
                             written last, it marks the scene as complete

The object itself (SDF, albedo, shading by sphere tracing) is process_data/synthetic_object.py;
this module places the cameras and writes the files.

Load it with process_data.dtu.load_neus_scene(out_dir, "cameras_sphere.npz", 1.0, use_masks=True).

CLI: python -m process_data.synthetic --out inputs/demo_scene [--n_views 48 --width 400 --height 300 --detail 0 --overwrite]
"""
import argparse
import glob
import json
import math
import os
import time
from typing import Dict, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from process_data.synthetic_object import LIGHT_DIR, Albedo, float_tensor, scene_sdf, shade
from utils.mesh import marching_cubes, sdf_on_grid, to_world

GENERATOR = "process_data.synthetic"
VERSION = 1  # bump when the scene or its rendering changes: existing scenes are then re-rendered

WORLD_CENTER = np.array([12.0, -7.0, 30.0])
WORLD_SCALE = 80.0
CAMERA_DISTANCE = 2.7  # normalised units
FOV_X_DEG = 44.0
ELEVATION_RANGE_DEG = (-10.0, 60.0)
MESH_RESOLUTION = 256

DESCRIPTION = (
    "A rounded box plinth carrying a sphere, an upright torus and a leaning capsule (smooth union), "
    "textured with a colour drift, a soft checker, fine stripes, value noise and spots, Lambertian-shaded "
    "under one directional light plus ambient on a white background, seen by cameras on a spiral "
    "from -10 to 60 degrees elevation."
)


# ----------------------------------------------------------------------------- cameras


def camera_poses(n_views: int) -> np.ndarray:
    """Cameras on a spiral around the object, looking at the centre: -> c2w [n, 3, 4] in
    the normalised frame (OpenCV axes; world +z points up in the image)."""
    c2ws = []
    golden = math.pi * (3.0 - math.sqrt(5.0))
    lo, hi = np.radians(ELEVATION_RANGE_DEG)
    for i in range(n_views):
        elevation = lo + (hi - lo) * (i / max(n_views - 1, 1))
        azimuth = i * golden
        center = CAMERA_DISTANCE * np.array(
            [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)]
        )
        forward = -center / np.linalg.norm(center)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        c2w = np.zeros((3, 4))
        c2w[:, 0], c2w[:, 1], c2w[:, 2], c2w[:, 3] = right, down, forward, center
        c2ws.append(c2w)
    return np.stack(c2ws)


def intrinsics(width: int, height: int) -> np.ndarray:
    """K [3, 3]: square pixels, horizontal field of view FOV_X_DEG, principal point at the
    image centre in pixel-centre coordinates."""
    f = 0.5 * width / math.tan(math.radians(FOV_X_DEG) / 2)
    return np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])


def scale_matrix() -> np.ndarray:
    """scale_mat [4, 4]: X_world = scale_mat @ X_normalised."""
    m = np.eye(4) * WORLD_SCALE
    m[:3, 3] = WORLD_CENTER
    m[3, 3] = 1.0
    return m


def world_projection(K: np.ndarray, c2w: np.ndarray, scale_mat: np.ndarray) -> np.ndarray:
    """world_mat [4, 4] = K [R | t] for WORLD points, from K [3, 3] and a normalised-frame
    pose c2w [3, 4]; world_mat @ scale_mat projects normalised points."""
    R = c2w[:, :3].T  # world-to-camera rotation (scale_mat has no rotation)
    center_world = (scale_mat @ np.append(c2w[:, 3], 1.0))[:3]
    P = np.eye(4)
    P[:3, :4] = K @ np.concatenate([R, -(R @ center_world)[:, None]], axis=1)
    return P


# ----------------------------------------------------------------------------- rendering


def _ray_dirs(u: torch.Tensor, v: torch.Tensor, K: np.ndarray, c2w: np.ndarray) -> torch.Tensor:
    """Unit directions (normalised frame) through pixel coordinates u, v [n] -> [n, 3]."""
    x = (u - float(K[0, 2])) / float(K[0, 0])
    y = (v - float(K[1, 2])) / float(K[1, 1])
    d = torch.stack([x, y, torch.ones_like(x)], dim=-1) @ float_tensor(c2w[:, :3]).T
    return d / d.norm(dim=-1, keepdim=True)


# rotated-grid 2x2 supersampling pattern (pixel units around the pixel centre)
_SUBSAMPLES = ((0.125, -0.375), (0.375, 0.125), (-0.125, 0.375), (-0.375, -0.125))


@torch.no_grad()
def render_view(
    K: np.ndarray, c2w: np.ndarray, width: int, height: int, albedo: Albedo
) -> Tuple[np.ndarray, np.ndarray]:
    """One view: K [3, 3], c2w [3, 4] (normalised frame) -> image [H, W, 3] uint8 RGB,
    mask [H, W] bool (the pixel-centre ray hits the object).

    Every pixel centre is traced; pixels whose 3x3 neighbourhood has an edge (a mask change or
    a colour step > 0.06) are re-rendered as the mean of 2x2 rotated-grid subsamples."""
    rows, cols = torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32)
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    u, v = u.reshape(-1), v.reshape(-1)
    origin = float_tensor(c2w[:, 3])
    rgb, hit = shade(origin, _ray_dirs(u, v, K, c2w), albedo)
    image = rgb.view(height, width, 3).permute(2, 0, 1)[None]  # [1, 3, H, W]
    mask = hit.view(height, width)
    both = torch.cat([image, mask[None, None].float()], dim=1)
    spread = F.max_pool2d(both, 3, 1, 1) + F.max_pool2d(-both, 3, 1, 1)  # max - min over 3x3
    edge = (spread[0, :3].amax(dim=0) > 0.06) | (spread[0, 3] > 0)
    sel = torch.nonzero(edge.reshape(-1))[:, 0]
    if sel.numel():
        us = torch.cat([u[sel] + du for du, _ in _SUBSAMPLES])
        vs = torch.cat([v[sel] + dv for _, dv in _SUBSAMPLES])
        sub, _ = shade(origin, _ray_dirs(us, vs, K, c2w), albedo)
        rgb[sel] = sub.view(len(_SUBSAMPLES), -1, 3).mean(dim=0)
    image = (rgb.view(height, width, 3) * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    return image, mask.numpy()


# ----------------------------------------------------------------------------- scene files


def ground_truth_mesh(resolution: int = MESH_RESOLUTION) -> Tuple[np.ndarray, np.ndarray]:
    """Marching cubes of scene_sdf over [-1, 1]^3 -> vertices [V, 3] (normalised frame),
    faces [F, 3] wound so that normals point outwards."""
    box = np.array([[-1.0] * 3, [1.0] * 3])
    values, voxel = sdf_on_grid(scene_sdf, box, resolution, chunk=1 << 18, device="cpu")
    return marching_cubes(values, box[0], voxel, 0.0)


def _params(n_views: int, width: int, height: int, seed: int, detail: float) -> Dict:
    params = {"n_views": int(n_views), "width": int(width), "height": int(height), "seed": int(seed)}
    if detail > 0:  # only then: scenes rendered before `detail` existed keep matching their marker
        params["detail"] = float(detail)
    return params


def _read_marker(out_dir: str):
    try:
        with open(os.path.join(out_dir, "scene.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, content: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(tmp, path)


def make_demo_scene(
    out_dir: str, n_views: int = 48, width: int = 400, height: int = 300, seed: int = 0, overwrite: bool = False,
    detail: float = 0.0,
) -> str:
    """Render the demo scene into out_dir in the NeuS format (see the module docstring) and
    return out_dir.

    A complete scene already there with the same parameters (and generator version) is kept
    as it is unless overwrite; one with other parameters is replaced. A folder holding other
    data (image/, mask/ or cameras_sphere.npz without this generator's scene.json) is left
    alone with FileExistsError unless overwrite.
    Images are [height, width] RGB; n_views views; seed draws the texture noise; detail (0-1) is
    the contrast of the extra fine spots (0: none, the demo scene)."""
    if n_views < 1 or width < 8 or height < 8:
        raise ValueError(f"need n_views >= 1 and an image of at least 8x8, got {n_views} views of {width}x{height}")
    params = _params(n_views, width, height, seed, detail)
    marker = _read_marker(out_dir)
    ours = isinstance(marker, dict) and marker.get("generator") == GENERATOR
    if (
        not overwrite
        and ours
        and marker.get("complete")
        and marker.get("version") == VERSION
        and marker.get("params") == params
        and all(os.path.isfile(os.path.join(out_dir, f)) for f in ("cameras_sphere.npz", "gt_mesh.ply"))
    ):
        return out_dir
    if not ours and not overwrite:
        names = ("image", "images", "mask", "cameras_sphere.npz")
        foreign = [f for f in names if os.path.exists(os.path.join(out_dir, f))]
        if foreign:
            raise FileExistsError(
                f"{out_dir} holds {', '.join(foreign)} but no demo-scene scene.json; "
                "pick another folder or pass overwrite=True (--overwrite) to replace it"
            )

    threads = torch.get_num_threads()
    # one thread: the batches shrink to a few thousand rays as they converge, where OpenMP
    # barriers cost more than they give (and stall badly on a busy machine)
    torch.set_num_threads(1)
    try:
        _render_scene(out_dir, params)
    finally:
        torch.set_num_threads(threads)
    return out_dir


def _prepare_folders(out_dir: str) -> Tuple[str, str]:
    """Create out_dir/image and out_dir/mask, mark the scene incomplete and remove the views of
    an earlier scene -> (image_dir, mask_dir)."""
    image_dir, mask_dir = os.path.join(out_dir, "image"), os.path.join(out_dir, "mask")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    # incomplete until the end: a crash leaves a scene that the next call re-renders
    _write_json(os.path.join(out_dir, "scene.json"), {"generator": GENERATOR, "version": VERSION, "complete": False})
    for folder in (image_dir, mask_dir):  # stale views of an earlier scene would be loaded too
        for path in glob.glob(os.path.join(folder, "*.png")):
            os.remove(path)
    return image_dir, mask_dir


def _view_cameras(
    i: int, world_mat: np.ndarray, scale_mat: np.ndarray, camera_mat: np.ndarray
) -> Dict[str, np.ndarray]:
    """The cameras_sphere.npz entries of view i (each [4, 4]) with their inverses, as NeuS writes them."""
    return {
        f"world_mat_{i}": world_mat,
        f"world_mat_inv_{i}": np.linalg.inv(world_mat),
        f"scale_mat_{i}": scale_mat,
        f"scale_mat_inv_{i}": np.linalg.inv(scale_mat),
        f"camera_mat_{i}": camera_mat,
        f"camera_mat_inv_{i}": np.linalg.inv(camera_mat),
    }


def _write_view(image_path: str, mask_path: str, image: np.ndarray, mask: np.ndarray) -> None:
    """Write a render image [H, W, 3] (RGB uint8) and its mask [H, W] (bool) as 8-bit PNGs, the
    mask 0/255 in 3 channels like DTU's."""
    cv2.imwrite(image_path, image[:, :, ::-1])  # [H, W, 3] BGR
    mask_u8 = np.repeat(mask[:, :, None].astype(np.uint8) * 255, 3, axis=2)  # [H, W, 3]
    cv2.imwrite(mask_path, mask_u8)


def _render_views(
    image_dir: str, mask_dir: str, K: np.ndarray, c2ws: np.ndarray, scale_mat: np.ndarray,
    width: int, height: int, albedo: Albedo,
) -> Dict[str, np.ndarray]:
    """Render and write every view: K [3, 3], c2ws [n_views, 3, 4] (normalised frame), scale_mat
    [4, 4] -> the cameras_sphere.npz entries of all views."""
    n_views = len(c2ws)
    image_digits, mask_digits = max(6, len(str(n_views - 1))), max(3, len(str(n_views - 1)))
    camera_mat = np.eye(4)  # [4, 4]
    camera_mat[:3, :3] = K
    cameras = {}
    for i in tqdm(range(n_views), desc="rendering demo scene", unit="view"):
        image, mask = render_view(K, c2ws[i], width, height, albedo)
        _write_view(os.path.join(image_dir, f"{i:0{image_digits}d}.png"),
                    os.path.join(mask_dir, f"{i:0{mask_digits}d}.png"), image, mask)
        cameras.update(_view_cameras(i, world_projection(K, c2ws[i], scale_mat), scale_mat, camera_mat))
    return cameras


def _write_ground_truth_mesh(path: str, scale_mat: np.ndarray) -> float:
    """Write ground_truth_mesh() in the WORLD frame to path (PLY) -> the object's radius in
    normalised units (the farthest vertex from the centre)."""
    vertices, faces = ground_truth_mesh()  # [V, 3] normalised frame, [F, 3]
    radius = float(np.linalg.norm(vertices, axis=1).max())
    import trimesh  # lazily: ~1 s of imports a training start need not pay

    trimesh.Trimesh(vertices=to_world(vertices, scale_mat), faces=faces, process=False).export(path)
    return radius


def _complete_marker(params: Dict, radius: float, start: float) -> Dict:
    """scene.json of a complete scene: params, the scene's geometry (radius: normalised units)
    and the seconds since `start`."""
    return {
        "generator": GENERATOR,
        "version": VERSION,
        "complete": True,
        "params": params,
        "description": DESCRIPTION,
        "object_center_world": WORLD_CENTER.tolist(),
        "world_scale": WORLD_SCALE,
        "object_radius_normalised": radius,
        "object_radius_world": radius * WORLD_SCALE,
        "camera_distance_normalised": CAMERA_DISTANCE,
        "fov_x_deg": FOV_X_DEG,
        "elevation_range_deg": list(ELEVATION_RANGE_DEG),
        "light_direction_normalised": LIGHT_DIR.tolist(),
        "render_seconds": round(time.time() - start, 2),
    }


def _render_scene(out_dir: str, params: Dict) -> None:
    """Write all the files of make_demo_scene (scene.json last)."""
    n_views, width, height, seed = params["n_views"], params["width"], params["height"], params["seed"]
    start = time.time()
    image_dir, mask_dir = _prepare_folders(out_dir)
    K = intrinsics(width, height)  # [3, 3]
    c2ws = camera_poses(n_views)  # [n_views, 3, 4]
    scale_mat = scale_matrix()  # [4, 4]
    albedo = Albedo(seed, params.get("detail", 0.0))
    cameras = _render_views(image_dir, mask_dir, K, c2ws, scale_mat, width, height, albedo)
    np.savez(os.path.join(out_dir, "cameras_sphere.npz"), **cameras)
    radius = _write_ground_truth_mesh(os.path.join(out_dir, "gt_mesh.ply"), scale_mat)
    _write_json(os.path.join(out_dir, "scene.json"), _complete_marker(params, radius, start))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Render the built-in demo scene in the NeuS format.")
    parser.add_argument("--out", default="inputs/demo_scene", help="output folder")
    parser.add_argument("--n_views", type=int, default=48)
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detail", type=float, default=0.0, help="contrast of extra fine spots for SIFT (0-1; 0: none)")
    parser.add_argument("--overwrite", action="store_true", help="re-render even if the scene is already there")
    args = parser.parse_args(argv)
    start = time.time()
    out = make_demo_scene(args.out, args.n_views, args.width, args.height, args.seed, args.overwrite, args.detail)
    print(f"demo scene in {out} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
