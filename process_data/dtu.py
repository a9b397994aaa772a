"""Scenes in the NeuS format (DTU, BlendedMVS, custom captures made with gen_cameras):

    <root_dir>/cameras_sphere.npz   world_mat_i = K [R | t] (world frame), scale_mat_i (unit
                                    sphere -> object region); P_i = world_mat_i @ scale_mat_i
    <root_dir>/image/*.png|jpg      (or images/) view i is the i-th file in sorted order; 8- or
                                    16-bit, gray, RGB or RGBA, any case of extension (loading.py)
    <root_dir>/mask/*.png|jpg       optional; white = object; the mask of image/0001.jpg may be
                                    mask/1.png or mask/0001.jpg (loading.match_masks). Without
                                    mask/, RGBA images' alpha channels are the masks.
"""
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm import tqdm

from process_data.base import DatasetConfig, RayDataset, Views, resolve_gt_mesh
from process_data.loading import (
    MIN_VIEWS, DatasetError, alpha_masks, binary_mask, check_enough_views, check_same_size, decompose_projection,
    downscaled_size, list_images, map_files, match_masks, read_mask, read_photo, resize, size_of,
)
from process_data.registry import DATASETS
from utils.camera import downscale_matrix
from utils.config import Configurable
from utils.distributed import is_main

log = logging.getLogger(__name__)


def load_neus_scene(
    root_dir: str, cameras_file: str, img_downscale: float, use_masks: bool, min_views: int = MIN_VIEWS
) -> Views:
    if not os.path.isdir(root_dir):
        raise DatasetError(f"dataset.root_dir {root_dir} does not exist")
    image_dir = next((d for d in ("image", "images") if os.path.isdir(os.path.join(root_dir, d))), None)
    if image_dir is None:
        raise DatasetError(f"no image/ (or images/) folder in {root_dir}")
    image_dir = os.path.join(root_dir, image_dir)
    image_paths = list_images(image_dir)
    if not image_paths:
        raise DatasetError(f"no images (.png/.jpg) in {image_dir}")
    cameras_path = os.path.join(root_dir, cameras_file)
    if not os.path.isfile(cameras_path):
        raise DatasetError(f"camera file {cameras_path} not found (expected world_mat_i, scale_mat_i)")
    try:
        cameras = dict(np.load(cameras_path))
    except Exception as e:
        raise DatasetError(f"cannot read camera file {cameras_path}: {e}") from None
    check_enough_views(image_paths, image_dir, min_views)
    n_views = len(image_paths)
    for i in range(n_views):  # before reading any pixels: a missing camera is found at once
        for key in (f"world_mat_{i}", f"scale_mat_{i}"):
            if key not in cameras:
                raise DatasetError(f"{cameras_path} has no {key} for image {image_paths[i]}")

    full_size = size_of(read_photo(image_paths[0])[0])
    size = downscaled_size(*full_size, img_downscale)

    def read_resized(path):  # on loader threads (map_files)
        rgb, alpha = read_photo(path)
        check_same_size(path, rgb, image_paths[0], full_size)
        return resize(rgb, size), None if alpha is None else resize(alpha, size)

    images, alphas = [], []
    for rgb, alpha in tqdm(map_files(read_resized, image_paths), total=n_views, desc=f"loading {os.path.basename(root_dir)}",
                           leave=False, disable=not is_main()):
        images.append(rgb)
        alphas.append(alpha)
    full_w, full_h = full_size
    width, height = size

    intrinsics, c2ws, world_mats = [], [], []
    scale_mat = None
    for i in range(n_views):
        world_mat = cameras[f"world_mat_{i}"].astype(np.float64)
        scale_mat = cameras[f"scale_mat_{i}"].astype(np.float64)
        P = (world_mat @ scale_mat)[:3, :4]
        if not np.isfinite(P).all() or abs(np.linalg.det(P[:3, :3])) < 1e-12:
            raise DatasetError(f"{cameras_path}: world_mat_{i} @ scale_mat_{i} is not invertible (or not finite)")
        K, c2w = decompose_projection(P)
        rescale = downscale_matrix(full_w / width)
        intrinsics.append(rescale @ K)
        c2ws.append(c2w)
        world_mats.append(np.vstack([rescale @ world_mat[:3, :4], [0, 0, 0, 1]]))

    masks, mask_source = None, None
    mask_dir = os.path.join(root_dir, "mask")
    if use_masks and os.path.isdir(mask_dir):
        def read_resized_mask(paths):  # (image, mask) on loader threads
            mask = read_mask(paths[1])
            check_same_size(paths[1], mask, paths[0], full_size, "mask")
            return binary_mask(resize(mask, size))

        pairs = list(zip(image_paths, match_masks(image_paths, mask_dir, image_dir)))
        masks, mask_source = np.stack(list(map_files(read_resized_mask, pairs))), mask_dir
        if any(a is not None for a in alphas):
            log.info("%s holds the masks; the images' alpha channels are not used", mask_dir)
    elif use_masks:
        from_alpha = alpha_masks(image_paths, alphas)
        if from_alpha is not None:
            masks, mask_source = np.stack([binary_mask(a) for a in from_alpha]), "alpha"
            log.info("no mask/ folder in %s: the images' alpha channels are the masks", root_dir)
    return Views(
        images=np.stack(images),
        masks=masks,
        intrinsics=np.stack(intrinsics),
        c2w=np.stack(c2ws),
        scale_mat=scale_mat,
        world_mats=np.stack(world_mats),
        names=[os.path.basename(p) for p in image_paths],
        mask_source=mask_source,
    )


@DATASETS.register("dtu")
class DTUDataset(Configurable, RayDataset):
    @dataclass
    class Config(DatasetConfig):
        name: str = "dtu"
        root_dir: str = "./inputs/dtu_scan24"
        cameras_file: str = "cameras_sphere.npz"
        img_downscale: float = 4.0  # 4: 1600x1200 -> 400x300
        use_masks: bool = True  # load mask/ (or the images' alpha) when present (mask loss, masked metrics, culling)
        holdout_every: int = 8  # views 0, K, 2K... are held out for testing; 0: none

    def __init__(self, config: "DTUDataset.Config", device="cpu"):
        views = load_neus_scene(config.root_dir, config.cameras_file, config.img_downscale, config.use_masks)
        if config.apply_mask and views.masks is None:
            raise DatasetError(
                f"dataset.apply_mask is true but {config.root_dir} has no mask/ folder (nor images with an alpha "
                "channel)" + ("" if config.use_masks else " that dataset.use_masks=false lets load")
                + ": add masks, or set dataset.apply_mask=false"
            )
        super().__init__(views, config.holdout_every, config.apply_mask, config.background_color, device)
        self.config = config
        self.gt_mesh: Optional[str] = resolve_gt_mesh(config)
