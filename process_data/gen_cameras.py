"""NeuS-format scene from a COLMAP model (after process_data.imgs2poses), as NeuS's
gen_cameras.py makes it, so that the `dtu` dataset and confs/neus-custom.yaml train on it.

Reads DIR/sparse/0 (undistorted, pinhole), DIR/images_undistorted/ (else DIR/images/), masks
from DIR/masks_undistorted/ (else DIR/masks/) when present, and DIR/sparse_points_interest.ply
when the user made one. Writes

    DIR/image/000000.png ...     the registered photos in name order, as PNG
    DIR/mask/000000.png ...      their masks, or all 255 (white = object) without masks
    DIR/cameras_sphere.npz       world_mat_i = K [R | t] (COLMAP's world frame), scale_mat_i
                                 (the region of interest: the unit sphere -> that sphere), and
                                 camera_mat_i, the inverses (the keys NeuS writes)
    DIR/sparse_points.ply        all sparse points, coloured: crop it to the object in a point
                                 cloud editor (MeshLab, CloudCompare) and save the rest as
                                 DIR/sparse_points_interest.ply to choose the region yourself
    DIR/region_sphere.ply        the chosen region as a sphere mesh, to check it over the points
    DIR/gen_cameras.json         view i -> photo name, the region (centre, radius) and its source

The region is the bounding sphere of sparse_points_interest.ply when it exists (as NeuS),
otherwise automatic (process_data.colmap.automatic_region).

CLI: python -m process_data.gen_cameras DIR [--region_margin 1.1]
"""
import argparse
import glob
import json
import os
import sys
from typing import Dict

import cv2
import numpy as np
import trimesh
from tqdm import tqdm

from process_data.colmap import (
    IMAGE_DIRS, MASK_DIRS, SPARSE_MODEL, SparseModel, first_folder, mask_path, read_sparse_model,
    region_of_interest, world_projections,
)
from process_data.loading import DatasetError, binary_mask, check_same_size, read_mask, read_photo


def neus_cameras(world_mats: np.ndarray, K: np.ndarray, scale_mat: np.ndarray) -> Dict[str, np.ndarray]:
    """The cameras_sphere.npz entries of NeuS: world_mats [N, 4, 4], K [N, 3, 3], scale_mat [4, 4]."""
    cameras = {}
    for i, world_mat in enumerate(world_mats):
        camera_mat = np.eye(4)
        camera_mat[:3, :3] = K[i]
        for key, value in (("world_mat", world_mat), ("scale_mat", scale_mat), ("camera_mat", camera_mat)):
            cameras[f"{key}_{i}"] = value
            cameras[f"{key}_inv_{i}"] = np.linalg.inv(value)
    return cameras


def region_mesh(scale_mat: np.ndarray) -> trimesh.Trimesh:
    """The unit sphere mapped to the world frame by scale_mat (an icosphere)."""
    sphere = trimesh.creation.icosphere(subdivisions=3)
    sphere.apply_transform(scale_mat)
    return sphere


def write_views(scene_dir: str, model: SparseModel, image_dir: str, mask_dir) -> None:
    """image/ and mask/ as NeuS numbers them (view i: the i-th registered photo by name)."""
    out_images, out_masks = os.path.join(scene_dir, "image"), os.path.join(scene_dir, "mask")
    for folder in (out_images, out_masks):
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(os.path.join(folder, "*.png")):  # an earlier run may have had more views
            os.remove(stale)
    full = np.full((model.height, model.width), 255, np.uint8)
    for i, name in enumerate(tqdm(model.names, desc="writing image/ and mask/", unit="view")):
        image = np.ascontiguousarray(read_photo(os.path.join(image_dir, name))[0][:, :, ::-1])  # 8-bit BGR, whatever the photo was
        if (image.shape[1], image.shape[0]) != (model.width, model.height):
            raise DatasetError(
                f"{os.path.join(image_dir, name)} is {image.shape[1]}x{image.shape[0]} but the COLMAP camera is "
                f"{model.width}x{model.height}: use the undistorted photos"
            )
        mask = full
        if mask_dir is not None:
            path = mask_path(mask_dir, name)
            mask = read_mask(path)
            check_same_size(path, mask, os.path.join(image_dir, name), (model.width, model.height), "mask")
            mask = (binary_mask(mask) * 255).astype(np.uint8)
        cv2.imwrite(os.path.join(out_images, f"{i:06d}.png"), image)
        cv2.imwrite(os.path.join(out_masks, f"{i:06d}.png"), mask)


def gen_cameras(scene_dir: str, region_margin: float = 1.1) -> Dict:
    """Write the NeuS-format scene (see the module docstring) -> the contents of gen_cameras.json."""
    model = read_sparse_model(os.path.join(scene_dir, SPARSE_MODEL))
    image_dir = first_folder(scene_dir, IMAGE_DIRS)
    if image_dir is None:
        raise DatasetError(f"no {' or '.join(IMAGE_DIRS)} folder in {scene_dir}")
    scale_mat, source = region_of_interest(scene_dir, model, region_margin)
    write_views(scene_dir, model, image_dir, first_folder(scene_dir, MASK_DIRS))
    np.savez(os.path.join(scene_dir, "cameras_sphere.npz"), **neus_cameras(world_projections(model), model.intrinsics, scale_mat))
    trimesh.PointCloud(model.points, colors=model.colors).export(os.path.join(scene_dir, "sparse_points.ply"))
    region_mesh(scale_mat).export(os.path.join(scene_dir, "region_sphere.ply"))
    summary = {
        "views": model.names,
        "image_dir": image_dir,
        "region_centre": scale_mat[:3, 3].tolist(),
        "region_radius": float(scale_mat[0, 0]),
        "region_source": source,
    }
    with open(os.path.join(scene_dir, "gen_cameras.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="NeuS-format scene (image/, mask/, cameras_sphere.npz) from DIR/sparse/0.")
    parser.add_argument("scene_dir", metavar="DIR", help="scene folder processed by python -m process_data.imgs2poses")
    parser.add_argument("--region_margin", type=float, default=1.1,
                        help="automatic region: radius of the well-seen sparse points times this")
    args = parser.parse_args(argv)
    try:
        summary = gen_cameras(args.scene_dir, args.region_margin)
    except DatasetError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    centre = ", ".join(f"{v:.4g}" for v in summary["region_centre"])
    print(
        f"{len(summary['views'])} views -> {args.scene_dir}/image, mask, cameras_sphere.npz; region: centre ({centre}), "
        f"radius {summary['region_radius']:.4g} from {summary['region_source']}; check region_sphere.ply over sparse_points.ply"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
