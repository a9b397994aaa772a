"""Scenes in the NeuS format (DTU, BlendedMVS, custom captures made with gen_cameras):

    <root_dir>/cameras_sphere.npz   world_mat_i = K [R | t] (world frame), scale_mat_i (unit
                                    sphere -> object region); P_i = world_mat_i @ scale_mat_i
    <root_dir>/image/*.png          (or images/) view i is the i-th file in sorted order
    <root_dir>/mask/*.png           optional, same order; white = object
"""
import glob
import os
from dataclasses import dataclass
from typing import List, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from process_data.base import RayDataset, Views
from process_data.registry import DATASETS
from utils.camera import downscale_matrix
from utils.distributed import is_main
from utils.config import BackgroundColor, Configurable

IMAGE_EXTENSIONS = ("*.png", "*.jpg", "*.jpeg", "*.PNG", "*.JPG", "*.JPEG")


class DatasetError(ValueError):
    """Scene data that cannot be used; the message names the file and what was expected."""


def decompose_projection(P: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """P [3, 4] = K [R | t] -> K [3, 3] (K[2, 2] = 1), camera-to-world [3, 4]."""
    K, R, t = cv2.decomposeProjectionMatrix(P)[:3]
    K = K / K[2, 2]
    c2w = np.zeros((3, 4))
    c2w[:, :3] = R.T
    c2w[:, 3] = (t[:3] / t[3])[:, 0]
    return K, c2w


def list_images(folder: str) -> List[str]:
    return sorted(set(sum((glob.glob(os.path.join(folder, e)) for e in IMAGE_EXTENSIONS), [])))


def read_image(
    path: str, full_size: Tuple[int, int], size: Tuple[int, int], grayscale: bool = False
) -> np.ndarray:
    """An image (RGB, or grayscale for masks) that must be full_size (w, h) on disk, resized
    to size (w, h)."""
    flag = cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR
    img = cv2.imread(path, flag)
    if img is None:
        raise DatasetError(f"cannot read image {path} (corrupt or not an image)")
    if (img.shape[1], img.shape[0]) != full_size:
        raise DatasetError(
            f"{path} is {img.shape[1]}x{img.shape[0]} but the scene's first image is {full_size[0]}x{full_size[1]}: "
            f"all images and masks must have the same size"
        )
    if (img.shape[1], img.shape[0]) != size:
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img if grayscale else img[:, :, ::-1]


def downscaled_size(full_w: int, full_h: int, img_downscale: float) -> Tuple[int, int]:
    """(w, h) / img_downscale, which must give whole pixel counts (so that K scales exactly)."""
    if img_downscale <= 0:
        raise DatasetError(f"dataset.img_downscale must be > 0, got {img_downscale}")
    width, height = full_w / img_downscale, full_h / img_downscale
    if abs(width - round(width)) > 1e-6 or abs(height - round(height)) > 1e-6:
        raise DatasetError(
            f"dataset.img_downscale {img_downscale} turns {full_w}x{full_h} images into {width:g}x{height:g} "
            f"pixels; choose a factor that divides both sides (e.g. 2, 4 or 8)"
        )
    if round(width) < 8 or round(height) < 8:
        raise DatasetError(f"dataset.img_downscale {img_downscale} leaves {width:g}x{height:g} pixels of {full_w}x{full_h}")
    return round(width), round(height)


def load_neus_scene(root_dir: str, cameras_file: str, img_downscale: float, use_masks: bool) -> Views:
    if not os.path.isdir(root_dir):
        raise DatasetError(f"dataset.root_dir {root_dir} does not exist")
    image_dir = next((d for d in ("image", "images") if os.path.isdir(os.path.join(root_dir, d))), None)
    if image_dir is None:
        raise DatasetError(f"no image/ (or images/) folder in {root_dir}")
    image_paths = list_images(os.path.join(root_dir, image_dir))
    if not image_paths:
        raise DatasetError(f"no images (.png/.jpg) in {os.path.join(root_dir, image_dir)}")
    cameras_path = os.path.join(root_dir, cameras_file)
    if not os.path.isfile(cameras_path):
        raise DatasetError(f"camera file {cameras_path} not found (expected world_mat_i, scale_mat_i)")
    try:
        cameras = dict(np.load(cameras_path))
    except Exception as e:
        raise DatasetError(f"cannot read camera file {cameras_path}: {e}") from None
    n_views = len(image_paths)

    first = cv2.imread(image_paths[0], cv2.IMREAD_UNCHANGED)
    if first is None:
        raise DatasetError(f"cannot read image {image_paths[0]} (corrupt or not an image)")
    full_h, full_w = first.shape[:2]
    width, height = downscaled_size(full_w, full_h, img_downscale)

    intrinsics, c2ws, world_mats = [], [], []
    scale_mat = None
    for i in range(n_views):
        for key in (f"world_mat_{i}", f"scale_mat_{i}"):
            if key not in cameras:
                raise DatasetError(f"{cameras_path} has no {key} for image {image_paths[i]}")
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

    images = []
    for path in tqdm(image_paths, desc=f"loading {os.path.basename(root_dir)}", leave=False, disable=not is_main()):
        images.append(read_image(path, (full_w, full_h), (width, height)))
    masks = None
    mask_dir = os.path.join(root_dir, "mask")
    if use_masks and os.path.isdir(mask_dir):
        mask_paths = list_images(mask_dir)
        if len(mask_paths) != n_views:
            raise DatasetError(
                f"{mask_dir} has {len(mask_paths)} masks for {n_views} images in {os.path.join(root_dir, image_dir)}: "
                f"every view needs a mask (or set dataset.use_masks=false)"
            )
        masks = np.stack([read_image(p, (full_w, full_h), (width, height), grayscale=True) for p in mask_paths])
        masks = (masks > 127).astype(np.float32)
    return Views(
        images=np.stack(images),
        masks=masks,
        intrinsics=np.stack(intrinsics),
        c2w=np.stack(c2ws),
        scale_mat=scale_mat,
        world_mats=np.stack(world_mats),
        names=[os.path.basename(p) for p in image_paths],
    )


@DATASETS.register("dtu")
class DTUDataset(Configurable, RayDataset):
    @dataclass
    class Config:
        name: str = "dtu"
        root_dir: str = "./inputs/dtu_scan24"
        cameras_file: str = "cameras_sphere.npz"
        img_downscale: float = 4.0  # 4: 1600x1200 -> 400x300
        use_masks: bool = True  # load mask/ when present (mask loss, masked metrics, culling)
        apply_mask: bool = True  # replace the pixels outside the mask with the background colour
        background_color: BackgroundColor = "random"  # random (training; white for evaluation) | white | black
        holdout_every: int = 8  # views 0, K, 2K... are held out for testing; 0: none
        gt_mesh: str = ""  # ground-truth mesh in the world frame (default: <root_dir>/gt_mesh.ply if present)

    def __init__(self, config: "DTUDataset.Config", device="cpu"):
        views = load_neus_scene(config.root_dir, config.cameras_file, config.img_downscale, config.use_masks)
        if config.apply_mask and views.masks is None:
            raise DatasetError(f"dataset.apply_mask is true but {config.root_dir} has no mask/ folder")
        super().__init__(views, config.holdout_every, config.apply_mask, config.background_color, device)
        self.config = config
