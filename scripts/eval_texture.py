"""Measure the textured mesh: masked PSNR in the held-out views of

  (a) the textured mesh (export.texture: decimated to --faces, --size^2 atlas, coloured by each
      rule of --rules, export.texture_colour),
  (b) the vertex-coloured mesh at the SAME face count (the decimated mesh, its vertices coloured
      by the same rule),
  (b') today's full-resolution vertex-coloured mesh (it<step>-mc<res>.ply),
  (c) the volume renders that --test writes (save/it<step>-test/<view>.png; rendered here
      when missing),

each mesh ray-cast with Intel Embree (embreex, through trimesh: triangle id + barycentrics ->
UV -> bilinear texture lookup), rays that miss the mesh taking the evaluation background, as in
the volume renders. Also times the textured export. The photos that colour (a) and (b) are those
of the export (systems.texture.Cameras.training: export.texture_photo_scale times finer than the
training images, at most the files').

Each mesh render is scored twice: with one ray through each pixel's centre (keys "textured",
"vertex_same_faces", "vertex_full") and supersampled (keys "..._ss"): --supersample N x N rays
per pixel at the centres of an N x N grid of sub-pixels (offsets (i + 0.5) / N - 0.5 pixels
around the pixel centre), box-averaged. A held-out pixel at img_downscale d is the mean of a
d x d block of the files' pixels, and a viewer filters a texture with mip-maps; one ray at the pixel
centre point-samples a 2048^2 atlas that is finer than the views' pixels, and aliases, so the
supersampled PSNR is the fair comparison. The volume column (c) is the --test render (one
ray a pixel) either way.

    pip install embreex   # Embree ray casting; not a requirement of the framework, only this script uses it
    python scripts/eval_texture.py --config confs/neus-dtu-wmask-cpu.yaml --resume CKPT \
        dataset.root_dir=../shared/data/dtu_scan24 [--faces 100000 --size 2048] [--rules photos,head_on] \
        [--supersample 4] [--json out.json]

The textured files of each rule go to save/it<step>-mc<res>-<rule>-textured.*; the volume renders
are kept as save/it<step>-texture-eval/volume-<view>-<W>x<H>.npy for the next run.
"""
import argparse
import json
import os
import sys
import time

import imageio.v2 as imageio
import numpy as np
import torch
import trimesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Sample image [H, W, C] (row 0 on top) at uv [N, 2] (v up), bilinear, clamped at the
    border, as a GPU samples a texture without mip-mapping -> [N, C]."""
    h, w = image.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip((1.0 - uv[:, 1]) * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


class MeshCaster:
    """Ray casting of one mesh (normalised frame) with Intel Embree (embreex, through
    trimesh's RayMeshIntersector) -> the first hit's triangle and barycentrics."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        from trimesh.ray.ray_pyembree import RayMeshIntersector

        self.mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
        self.faces = faces
        self.intersector = RayMeshIntersector(self.mesh)

    def cast(self, rays_o: np.ndarray, rays_d: np.ndarray):
        """-> hit [N] bool, face [N], barycentric weights [N, 3] of the face's corners."""
        tri, ray, location = self.intersector.intersects_id(
            rays_o.astype(np.float64), rays_d.astype(np.float64), multiple_hits=False, return_locations=True
        )
        hit = np.zeros(len(rays_o), dtype=bool)
        face = np.zeros(len(rays_o), dtype=np.int64)
        bary = np.zeros((len(rays_o), 3))
        hit[ray], face[ray] = True, tri
        bary[ray] = trimesh.triangles.points_to_barycentric(self.mesh.triangles[tri], location)
        return hit, face, bary


def subpixel_offsets(n: int) -> np.ndarray:
    """The centres of an n x n grid of sub-pixels, as (du, dv) offsets in pixels from the pixel
    centre: (i + 0.5) / n - 0.5 along each axis, row-major (dv outer) -> [n * n, 2]."""
    steps = (np.arange(n) + 0.5) / n - 0.5  # [n]
    dv, du = np.meshgrid(steps, steps, indexing="ij")
    return np.stack([du.reshape(-1), dv.reshape(-1)], axis=1)


def view_rays_at(dataset, view: int, offset) -> tuple:
    """The rays of view `view` through every pixel centre moved by offset (du, dv) pixels, in
    dataset.view_rays's row-major pixel order and through process_data.base.pixel_directions
    (pixel centres at integer (u, v)) -> rays_o [H*W, 3], rays_d [H*W, 3] (numpy)."""
    from process_data.base import pixel_directions

    h, w = dataset.height, dataset.width
    v, u = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    u = u.reshape(-1).float() + float(offset[0])  # [H*W]
    v = v.reshape(-1).float() + float(offset[1])
    intrinsics = dataset.intrinsics[view].cpu().expand(len(u), 3, 3)
    c2w = dataset.c2w[view].cpu().expand(len(u), 3, 4)
    return c2w[:, :, 3].numpy(), pixel_directions(u, v, intrinsics, c2w).numpy()


def supersampled(render, dataset, view: int, n: int) -> np.ndarray:
    """render(rays) -> [H*W, 3] averaged over n x n rays a pixel (subpixel_offsets) -> [H*W, 3]."""
    total = 0.0
    for offset in subpixel_offsets(n):
        total = total + render(view_rays_at(dataset, view, offset))
    return total / (n * n)


def render_vertex_coloured(caster: MeshCaster, colours: np.ndarray, rays, background):
    hit, face, bary = caster.cast(*rays)
    rgb = np.einsum("ni,nic->nc", bary, colours[caster.faces[face]])
    return np.where(hit[:, None], rgb, background)


def render_textured(caster: MeshCaster, uv: np.ndarray, uv_faces: np.ndarray, image: np.ndarray, rays, background):
    hit, face, bary = caster.cast(*rays)
    texel_uv = np.einsum("ni,nic->nc", bary, uv[uv_faces[face]])
    rgb = bilinear(image, texel_uv)
    return np.where(hit[:, None], rgb, background)


def volume_renders(system, views, out_dir: str):
    """(c): the volume render of each view -> {view: [H*W, 3]}, rendered once and kept as
    out_dir/volume-<view>-<W>x<H>.npy for the next run."""
    h, w = system.dataset.height, system.dataset.width
    volume = {}
    for view in views:
        cache = os.path.join(out_dir, f"volume-{view:06d}-{w}x{h}.npy")
        if not os.path.isfile(cache):
            np.save(cache, system.task.evaluation.render_view(view)["rgb"].cpu().numpy().reshape(h, w, 3))
        volume[view] = np.load(cache).reshape(-1, 3)
    return volume


def export_and_reload(system, cfg, rule_stem: str, full, cameras, device, timings: dict):
    """(a)'s export, timed into `timings`, of the full mesh `full` (world frame) to
    <rule_stem>-textured.*, read back as a user would -> its vertices [V, 3] (normalised frame),
    faces [F, 3], uv [V, 2] and texture image [S, S, 3] in [0, 1]; the GLB must hold as many faces."""
    from systems.texture import export_textured

    scale_mat = system.dataset.views.scale_mat
    to_normalised = np.linalg.inv(scale_mat)
    start, cpu_start = time.perf_counter(), time.process_time()
    full_vertices = trimesh.transform_points(np.asarray(full.vertices), to_normalised)
    export_textured(system.model, full_vertices, np.asarray(full.faces), scale_mat, cfg, rule_stem, device,
                    timings, cameras=cameras)
    timings["textured_total"] = time.perf_counter() - start
    timings["textured_total_cpu"] = time.process_time() - cpu_start  # this process's CPU seconds (other load aside)
    textured = trimesh.load(f"{rule_stem}-textured.obj", process=False, force="mesh")
    glb = trimesh.load(f"{rule_stem}-textured.glb", force="mesh")
    assert len(glb.faces) == len(textured.faces)
    image = np.asarray(textured.visual.material.image.convert("RGB"), dtype=np.float32) / 255.0
    uv = np.asarray(textured.visual.uv, dtype=np.float64)
    tex_vertices = trimesh.transform_points(np.asarray(textured.vertices), to_normalised)
    return tex_vertices, np.asarray(textured.faces), uv, image


def score_view(dataset, view: int, meshes, volume_rgb: np.ndarray, supersample: int, panel_path: str) -> dict:
    """Masked PSNR in one held-out view of each mesh render (meshes: name -> render(rays,
    background) -> [H*W, 3]) at one ray a pixel, and at supersample^2 rays a pixel (keys
    "<mesh>_ss") when supersample > 1, and of the volume render volume_rgb [H*W, 3] -> {key: PSNR};
    writes the panel textured | vertex (same faces) | volume | photo to panel_path (the
    supersampled renders when there are some)."""
    from utils.metrics import psnr

    h, w = dataset.height, dataset.width
    rays = dataset.view_rays(view)
    ray_np = (rays["rays_o"].cpu().numpy(), rays["rays_d"].cpu().numpy())
    background = rays["background"].cpu().numpy()
    gt = rays["rgb"].view(h, w, 3)
    mask = rays["mask"].view(h, w)
    renders = {k: render(ray_np, background) for k, render in meshes.items()}
    renders["volume"] = volume_rgb
    if supersample > 1:
        renders.update({f"{k}_ss": supersampled(lambda r, render=render: render(r, background), dataset, view,
                                                supersample) for k, render in meshes.items()})
    scores = {k: psnr(torch.from_numpy(v.reshape(h, w, 3)).float(), gt.cpu().float(), mask.cpu())
              for k, v in renders.items()}
    shown = ("textured_ss", "vertex_same_faces_ss") if supersample > 1 else ("textured", "vertex_same_faces")
    panel = np.concatenate([renders[k].reshape(h, w, 3) for k in (*shown, "volume")] + [gt.cpu().numpy()], axis=1)
    imageio.imwrite(panel_path, (np.clip(panel, 0, 1) * 255 + 0.5).astype(np.uint8))
    return scores


def measure_rule(system, cfg, rule: str, stem: str, full, full_caster, cameras, volume, out_dir: str, device,
                 supersample: int = 1):
    """Export the textured mesh coloured by `rule` and score (a), (b), (b') and (c) in the
    held-out views (cfg: the run's export config, its texture_colour set to `rule`), the meshes
    at one ray a pixel and, with supersample N > 1, also at N x N rays a pixel (keys "<mesh>_ss")
    -> that rule's entry of the result (per view and mean PSNR, faces, seconds); writes
    out_dir/<view>-<rule>.png panels (the supersampled renders when there are some)."""
    from systems.texture import vertex_colours

    cfg.texture_colour = rule
    dataset = system.dataset
    timings = {}
    tex_vertices, tex_faces, uv, image = export_and_reload(system, cfg, f"{stem}-{rule}", full, cameras, device,
                                                           timings)
    # (b) the same decimated mesh with shared vertices, coloured by the same rule
    merged = trimesh.Trimesh(vertices=tex_vertices, faces=tex_faces, process=False)
    merged.merge_vertices(merge_tex=True, merge_norm=True)
    dec_vertices, dec_faces = np.asarray(merged.vertices), np.asarray(merged.faces)
    start = time.perf_counter()
    dec_colours = vertex_colours(system.model, dec_vertices, dec_faces, cfg, cameras, device).astype(np.float64)
    timings["vertex_colours"] = time.perf_counter() - start
    full_colours = np.asarray(full.visual.vertex_colors)[:, :3].astype(np.float64) / 255.0
    tex_caster, dec_caster = MeshCaster(tex_vertices, tex_faces), MeshCaster(dec_vertices, dec_faces)
    meshes = {  # (rays, background) -> [H*W, 3]
        "textured": lambda r, bg: render_textured(tex_caster, uv, tex_faces, image, r, bg),
        "vertex_same_faces": lambda r, bg: render_vertex_coloured(dec_caster, dec_colours, r, bg),
        "vertex_full": lambda r, bg: render_vertex_coloured(full_caster, full_colours, r, bg),
    }
    start = time.perf_counter()
    per_view = {
        f"{view:06d}": score_view(dataset, view, meshes, volume_rgb, supersample,
                                  os.path.join(out_dir, f"{view:06d}-{rule}.png"))
        for view, volume_rgb in volume.items()
    }
    timings["mesh_renders"] = time.perf_counter() - start
    return {
        "views": per_view,
        "mean_psnr_masked": {k: float(np.mean([v[k] for v in per_view.values()])) for k in next(iter(per_view.values()))},
        "faces": {"textured": int(len(tex_faces)), "vertex_same_faces": int(len(dec_faces)),
                  "vertex_full": int(len(full.faces))},
        "seconds": timings,
    }


def load_trained(args, overrides):
    """The run of args.resume with args.config + overrides (export.texture off, the atlas of
    --faces / --size) -> (its Trainer with the checkpoint loaded, the export config, the device)."""
    from run import trial_dir_of
    from systems import RunPaths, Trainer
    from systems.config import load_config
    from utils.misc import resolve_device

    config = load_config(args.config, [*overrides, "export.texture=false"])
    config.export.texture_faces = args.faces
    config.export.texture_size = args.size
    device = resolve_device(config.device)
    system = Trainer(config, RunPaths.for_trial(trial_dir_of(args.resume)), device)
    system.load(args.resume)
    return system, config.export, device


def parse_args(argv=None):
    """-> (the script's arguments, the run.py config overrides)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", required=True, help="checkpoint of a trained run")
    parser.add_argument("--faces", type=int, default=100000, help="export.texture_faces")
    parser.add_argument("--size", type=int, default=2048, help="export.texture_size")
    parser.add_argument("--rules", default=None,
                        help="comma-separated export.texture_colour rules to measure (default: the config's)")
    parser.add_argument("--supersample", type=int, default=4,
                        help="also score the meshes at N x N rays a pixel, box-averaged (1: one ray a pixel only)")
    parser.add_argument("--json", default=None, help="write the table here (default: beside the mesh)")
    args, overrides = parser.parse_known_args(argv)
    if args.supersample < 1:
        parser.error(f"--supersample must be >= 1, got {args.supersample}")
    return args, overrides


def main(argv=None) -> int:
    from systems.texture import Cameras

    args, overrides = parse_args(argv)

    system, cfg, device = load_trained(args, overrides)
    paths, step = system.paths, system.global_step
    stem = os.path.join(paths.save_dir, f"it{step:06d}-mc{cfg.mesh_resolution}")
    start = time.perf_counter()
    if not os.path.isfile(f"{stem}.ply"):
        system.export_mesh()  # today's mesh: marching cubes, clean-up, vertex colours
    mesh_seconds = time.perf_counter() - start
    full = trimesh.load(f"{stem}.ply", process=False)
    full_caster = MeshCaster(trimesh.transform_points(np.asarray(full.vertices), np.linalg.inv(system.dataset.views.scale_mat)),
                             np.asarray(full.faces))
    start = time.perf_counter()
    cameras = Cameras.training(system.dataset, cfg.texture_photo_scale)  # the export's photos
    photos_seconds = time.perf_counter() - start
    rules = args.rules.split(",") if args.rules else [cfg.texture_colour]
    views = system.dataset.split["test"] or system.dataset.split["train"][::8]
    out_dir = os.path.join(paths.save_dir, f"it{step:06d}-texture-eval")
    os.makedirs(out_dir, exist_ok=True)
    volume = volume_renders(system, views, out_dir)
    results = {}
    for rule in rules:
        results[rule] = measure_rule(system, cfg, rule, stem, full, full_caster, cameras, volume, out_dir, device,
                                     args.supersample)
        print(rule, json.dumps({k: results[rule][k] for k in ("mean_psnr_masked", "seconds")}), flush=True)
    result = {
        "checkpoint": os.path.abspath(args.resume),
        "step": step,
        "texture_size": args.size,
        "texture_views": cfg.texture_views,
        "texture_photo_scale": cfg.texture_photo_scale,
        "photo_size": [int(cameras.images.shape[2]), int(cameras.images.shape[1])],
        "depth_size": [int(system.dataset.width), int(system.dataset.height)],
        "photos_seconds": photos_seconds,
        "supersample": args.supersample,
        "mesh_export_seconds": mesh_seconds,
        "rules": results,
        "panels": "textured | vertex-coloured (same faces, same rule) | volume | photo"
                  + (f" (meshes at {args.supersample}x{args.supersample} rays a pixel)" if args.supersample > 1 else ""),
    }
    out = args.json or f"{stem}-texture-eval.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({rule: r["mean_psnr_masked"] for rule, r in results.items()}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
