"""Scenes in the NeuS format (DTU, BlendedMVS, custom captures made with gen_cameras):

    <root_dir>/cameras_sphere.npz   world_mat_i = K [R | t] (world frame), scale_mat_i (unit
                                    sphere -> object region); P_i = world_mat_i @ scale_mat_i
    <root_dir>/image/*.png|jpg      (or images/) view i is the i-th file in sorted order; 8- or
                                    16-bit, gray, RGB or RGBA, any case of extension (loading.py)
    <root_dir>/mask/*.png|jpg       optional; white = object; the mask of image/0001.jpg may be
                                    mask/1.png or mask/0001.jpg (loading.match_masks). Without
                                    mask/, RGBA images' alpha channels are the masks.
"""
import functools
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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


def _find_images(root_dir: str) -> Tuple[str, List[str]]:
    """The scene's image folder (image/ or images/) and its photos in sorted order; DatasetError
    when the scene, the folder or the photos are missing."""
    if not os.path.isdir(root_dir):
        raise DatasetError(f"dataset.root_dir {root_dir} does not exist")
    image_dir = next((d for d in ("image", "images") if os.path.isdir(os.path.join(root_dir, d))), None)
    if image_dir is None:
        raise DatasetError(f"no image/ (or images/) folder in {root_dir}")
    image_dir = os.path.join(root_dir, image_dir)
    image_paths = list_images(image_dir)
    if not image_paths:
        raise DatasetError(f"no images (.png/.jpg) in {image_dir}")
    return image_dir, image_paths


def _read_cameras(cameras_path: str) -> Dict[str, np.ndarray]:
    """The arrays of a cameras_sphere.npz by key; DatasetError when it is missing or unreadable."""
    if not os.path.isfile(cameras_path):
        raise DatasetError(f"camera file {cameras_path} not found (expected world_mat_i, scale_mat_i)")
    try:
        return dict(np.load(cameras_path))
    except Exception as e:
        raise DatasetError(f"cannot read camera file {cameras_path}: {e}") from None


def _check_cameras_present(cameras: Dict[str, np.ndarray], cameras_path: str, image_paths: Sequence[str]) -> None:
    """DatasetError naming the first view without a world_mat_i or scale_mat_i (before reading
    any pixels: a missing camera is found at once)."""
    for i in range(len(image_paths)):
        for key in (f"world_mat_{i}", f"scale_mat_{i}"):
            if key not in cameras:
                raise DatasetError(f"{cameras_path} has no {key} for image {image_paths[i]}")


def _read_resized_photo(
    path: str, first_path: str, full_size: Tuple[int, int], size: Tuple[int, int]
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """One photo resized to size (w, h) -> rgb [h, w, 3], alpha [h, w] or None; it must have the
    first photo's full_size (w, h). Runs on loader threads (map_files)."""
    rgb, alpha = read_photo(path)
    check_same_size(path, rgb, first_path, full_size)
    return resize(rgb, size), None if alpha is None else resize(alpha, size)


def _read_photos(
    image_paths: Sequence[str], full_size: Tuple[int, int], size: Tuple[int, int], desc: str
) -> Tuple[List[np.ndarray], List[Optional[np.ndarray]]]:
    """All photos resized to size (w, h), with a progress bar `desc` on the main process ->
    images (each [h, w, 3]) and alphas (each [h, w] or None), one per view."""
    read = functools.partial(_read_resized_photo, first_path=image_paths[0], full_size=full_size, size=size)
    images, alphas = [], []
    for rgb, alpha in tqdm(map_files(read, image_paths), total=len(image_paths), desc=f"loading {desc}",
                           leave=False, disable=not is_main()):
        images.append(rgb)
        alphas.append(alpha)
    return images, alphas


def _parse_cameras(
    cameras: Dict[str, np.ndarray], cameras_path: str, n_views: int, downscale: float
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per view, P = world_mat @ scale_mat decomposed for images downscaled by `downscale`
    (full width / width) -> intrinsics [n_views, 3, 3], c2w [n_views, 3, 4] (normalised frame),
    world_mats [n_views, 4, 4] (rescaled, world frame) and the last view's scale_mat [4, 4]."""
    intrinsics, c2ws, world_mats = [], [], []
    scale_mat = None
    rescale = downscale_matrix(downscale)  # [3, 3]
    for i in range(n_views):
        world_mat = cameras[f"world_mat_{i}"].astype(np.float64)  # [4, 4]
        scale_mat = cameras[f"scale_mat_{i}"].astype(np.float64)  # [4, 4]
        P = (world_mat @ scale_mat)[:3, :4]  # [3, 4]
        if not np.isfinite(P).all() or abs(np.linalg.det(P[:3, :3])) < 1e-12:
            raise DatasetError(f"{cameras_path}: world_mat_{i} @ scale_mat_{i} is not invertible (or not finite)")
        K, c2w = decompose_projection(P)
        intrinsics.append(rescale @ K)
        c2ws.append(c2w)
        world_mats.append(np.vstack([rescale @ world_mat[:3, :4], [0, 0, 0, 1]]))
    return np.stack(intrinsics), np.stack(c2ws), np.stack(world_mats), scale_mat


def _read_resized_mask(paths: Tuple[str, str], full_size: Tuple[int, int], size: Tuple[int, int]) -> np.ndarray:
    """An (image, mask) pair -> the mask resized to size (w, h) and binarised [h, w]; it must have
    the image's full_size (w, h). Runs on loader threads (map_files)."""
    mask = read_mask(paths[1])
    check_same_size(paths[1], mask, paths[0], full_size, "mask")
    return binary_mask(resize(mask, size))


def _read_mask_folder(
    mask_dir: str, image_dir: str, image_paths: Sequence[str], full_size: Tuple[int, int], size: Tuple[int, int]
) -> np.ndarray:
    """The masks in mask_dir matched to the photos (loading.match_masks) -> [n_views, h, w]."""
    pairs = list(zip(image_paths, match_masks(image_paths, mask_dir, image_dir)))
    read = functools.partial(_read_resized_mask, full_size=full_size, size=size)
    return np.stack(list(map_files(read, pairs)))


def _load_masks(
    root_dir: str, image_dir: str, image_paths: Sequence[str], alphas: Sequence[Optional[np.ndarray]],
    full_size: Tuple[int, int], size: Tuple[int, int],
) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """The scene's masks [n_views, h, w] and where they came from (the mask/ folder's path or
    "alpha"), or (None, None): mask/ when present, else the photos' alpha channels if any."""
    mask_dir = os.path.join(root_dir, "mask")
    if os.path.isdir(mask_dir):
        masks = _read_mask_folder(mask_dir, image_dir, image_paths, full_size, size)
        if any(a is not None for a in alphas):
            log.info("%s holds the masks; the images' alpha channels are not used", mask_dir)
        return masks, mask_dir
    from_alpha = alpha_masks(image_paths, alphas)
    if from_alpha is None:
        return None, None
    masks = np.stack([binary_mask(a) for a in from_alpha])  # [n_views, h, w]
    log.info("no mask/ folder in %s: the images' alpha channels are the masks", root_dir)
    return masks, "alpha"


def load_neus_scene(
    root_dir: str, cameras_file: str, img_downscale: float, use_masks: bool, min_views: int = MIN_VIEWS
) -> Views:
    """A NeuS-format scene (see the module docstring) -> Views: images [n_views, h, w, 3] at
    img_downscale, masks [n_views, h, w] (when use_masks and the scene has them) and the cameras
    rescaled to match. DatasetError names what is missing or unusable."""
    image_dir, image_paths = _find_images(root_dir)
    cameras_path = os.path.join(root_dir, cameras_file)
    cameras = _read_cameras(cameras_path)
    check_enough_views(image_paths, image_dir, min_views)
    _check_cameras_present(cameras, cameras_path, image_paths)

    full_size = size_of(read_photo(image_paths[0])[0])  # (w, h)
    size = downscaled_size(*full_size, img_downscale)  # (w, h)
    images, alphas = _read_photos(image_paths, full_size, size, os.path.basename(root_dir))
    downscale = full_size[0] / size[0]
    intrinsics, c2ws, world_mats, scale_mat = _parse_cameras(cameras, cameras_path, len(image_paths), downscale)
    masks, mask_source = None, None
    if use_masks:
        masks, mask_source = _load_masks(root_dir, image_dir, image_paths, alphas, full_size, size)
    return Views(
        images=np.stack(images),  # [n_views, h, w, 3]
        masks=masks,
        intrinsics=intrinsics,
        c2w=c2ws,
        scale_mat=scale_mat,
        world_mats=world_mats,
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
