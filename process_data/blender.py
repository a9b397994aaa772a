"""Blender / nerf_synthetic scenes (the NeRF paper's synthetic format):

    <root_dir>/transforms_train.json, transforms_val.json, transforms_test.json
        camera_angle_x              horizontal field of view (radians); or fl_x [, fl_y, cx, cy]
                                    (instant-ngp's keys), in pixels
        frames[i].file_path         image path relative to root_dir, with or without ".png"
        frames[i].transform_matrix  camera-to-world 4x4 with OpenGL/Blender camera axes
                                    (x right, y up, z backward)
    images: RGBA PNGs; alpha is the object's mask

The camera axes are converted to the framework's OpenCV ones (x right, y down, z forward) in
one place, opengl_to_opencv. The principal point defaults to the image centre, (W - 1) / 2 in
the framework's pixel-centre coordinates. The normalised frame is the Blender frame scaled by
1 / region_radius about region_center (nerf_synthetic objects lie within radius 1.5 of the
origin): X_world = scale_mat @ X_normalised. The train split trains; the test split
(every test_every-th frame) is held out for --test.
"""
import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np
from tqdm import tqdm

from process_data.base import BackgroundColor, DatasetConfig, RayDataset, Views, resolve_gt_mesh
from process_data.colmap import scale_matrix
from process_data.loading import DatasetError, check_same_size, downscaled_size, read_photo, resize, size_of
from process_data.registry import DATASETS
from utils.camera import downscale_matrix
from utils.config import Configurable

OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0])  # flips the camera's y and z axes


def opengl_to_opencv(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world with OpenGL axes (x right, y up, z backward) [..., 3, 4] -> the same
    camera with OpenCV axes (x right, y down, z forward): R' = R diag(1, -1, -1), same centre."""
    out = c2w.copy()
    out[..., :3, :3] = c2w[..., :3, :3] @ OPENGL_TO_OPENCV
    return out


def blender_intrinsics(meta: dict, width: int, height: int) -> np.ndarray:
    """K [3, 3] from a transforms file: fl_x/fl_y/cx/cy when given, else square pixels with
    f = W / (2 tan(camera_angle_x / 2)) and the principal point at the image centre.
    Principal points given as cx, cy (pixel-corner coordinates, as NeRF writes them) move by
    -0.5 to the framework's pixel centres."""
    if "fl_x" in meta:
        fx = float(meta["fl_x"])
        fy = float(meta.get("fl_y", fx))
    elif "camera_angle_x" in meta:
        fx = fy = 0.5 * width / math.tan(0.5 * float(meta["camera_angle_x"]))
    else:
        raise KeyError("camera_angle_x (or fl_x)")
    cx = float(meta.get("cx", width / 2)) - 0.5
    cy = float(meta.get("cy", height / 2)) - 0.5
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def read_transforms(root_dir: str, split: str) -> dict:
    path = os.path.join(root_dir, f"transforms_{split}.json")
    if not os.path.isfile(path):
        raise DatasetError(f"{path} not found (a Blender scene has transforms_train.json, transforms_test.json...)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    if not meta.get("frames"):
        raise DatasetError(f"{path} has no frames")
    return meta


def image_path(root_dir: str, file_path: str) -> str:
    path = os.path.normpath(os.path.join(root_dir, file_path))
    return path if os.path.splitext(path)[1] else path + ".png"


def read_rgba(path: str, full_size: Tuple[int, int], size: Tuple[int, int], first_path: str) -> Tuple[np.ndarray, np.ndarray]:
    """An RGBA, RGB or gray image, 8- or 16-bit (loading.read_photo), that must be full_size
    (w, h) like first_path, resized to size (w, h) -> rgb [H, W, 3] uint8, alpha [H, W] in
    [0, 1] (ones without an alpha channel)."""
    rgb, alpha = read_photo(path)
    check_same_size(path, rgb, first_path, full_size)
    if alpha is None:
        return resize(rgb, size), np.ones((size[1], size[0]), np.float32)
    rgba = resize(np.dstack([rgb, alpha]), size)  # [h, w, 4] uint8, resized together
    return np.ascontiguousarray(rgba[:, :, :3]), rgba[:, :, 3].astype(np.float32) / 255.0


def load_blender_scene(
    root_dir: str, splits: List[Tuple[str, int]], img_downscale: float, center: List[float], radius: float
) -> Tuple[Views, List[str]]:
    """Every step-th frame of each (split, step), in order -> Views in the normalised frame and
    the split of each view."""
    if not os.path.isdir(root_dir):
        raise DatasetError(f"dataset.root_dir {root_dir} does not exist")
    if radius <= 0:
        raise DatasetError(f"dataset.region_radius must be > 0, got {radius}")
    scale_mat = scale_matrix(np.asarray(center, dtype=np.float64), radius)
    images, masks, intrinsics, c2ws, names, view_splits = [], [], [], [], [], []
    full_size = first_path = None
    for split, step in splits:
        meta = read_transforms(root_dir, split)
        frames = meta["frames"][::step]
        if full_size is None:
            first_path = image_path(root_dir, frames[0]["file_path"])
            full_size = size_of(read_photo(first_path)[0])
        full_w, full_h = full_size
        size = downscaled_size(full_w, full_h, img_downscale)
        try:
            K = downscale_matrix(full_w / size[0]) @ blender_intrinsics(meta, full_w, full_h)
        except KeyError as e:
            raise DatasetError(f"{os.path.join(root_dir, f'transforms_{split}.json')} has no {e.args[0]}") from None
        for frame in tqdm(frames, desc=f"loading {split}", leave=False):
            matrix = np.asarray(frame.get("transform_matrix"), dtype=np.float64)
            if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
                raise DatasetError(f"transforms_{split}.json: frame {frame.get('file_path')} needs a finite 4x4 transform_matrix")
            rgb, alpha = read_rgba(image_path(root_dir, frame["file_path"]), full_size, size, first_path)
            c2w = opengl_to_opencv(matrix[:3, :4])
            c2w[:, 3] = (c2w[:, 3] - scale_mat[:3, 3]) / radius
            images.append(rgb)
            masks.append(alpha)
            intrinsics.append(K)
            c2ws.append(c2w)
            names.append(frame["file_path"])
            view_splits.append(split)
    c2ws, intrinsics = np.stack(c2ws), np.stack(intrinsics)
    world_mats = np.tile(np.eye(4), (len(names), 1, 1))
    for i in range(len(names)):  # K [R | t] of the world frame: R = R_c2w^T, t = -R c_world
        R = c2ws[i, :, :3].T
        centre_world = scale_mat[:3, :3] @ c2ws[i, :, 3] + scale_mat[:3, 3]
        world_mats[i, :3, :4] = intrinsics[i] @ np.concatenate([R, -(R @ centre_world)[:, None]], axis=1)
    views = Views(
        images=np.stack(images), masks=np.stack(masks), intrinsics=intrinsics, c2w=c2ws,
        scale_mat=scale_mat, world_mats=world_mats, names=names,
    )
    return views, view_splits


@DATASETS.register("blender")
class BlenderDataset(Configurable, RayDataset):
    @dataclass
    class Config(DatasetConfig):
        name: str = "blender"
        root_dir: str = "./inputs/nerf_synthetic/lego"
        img_downscale: float = 1.0  # 2: 800x800 -> 400x400
        train_split: str = "train"
        test_split: str = "test"  # held out for --test; "" for none
        test_every: int = 8  # every K-th frame of the test split (nerf_synthetic has 200)
        region_center: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # Blender frame
        region_radius: float = 1.5  # the object lies within this radius of region_center
        apply_mask: bool = True  # composite onto background_color by alpha per ray; false: onto white at load
        background_color: BackgroundColor = "white"  # white (nerf_synthetic's) | black | random (a colour per ray)

    def __init__(self, config: "BlenderDataset.Config", device="cpu"):
        if config.test_every < 1:
            raise DatasetError(f"dataset.test_every must be >= 1, got {config.test_every}")
        splits = [(config.train_split, 1)] + ([(config.test_split, config.test_every)] if config.test_split else [])
        views, view_splits = load_blender_scene(
            config.root_dir, splits, config.img_downscale, list(config.region_center), config.region_radius
        )
        if not config.apply_mask:
            views.images = composite_on_white(views.images, views.masks)
        super().__init__(views, 0, config.apply_mask, config.background_color, device)
        n_train = view_splits.count(config.train_split)
        self.split = {"train": list(range(n_train)), "test": list(range(n_train, len(view_splits)))}
        self.train_views = self.train_views.new_tensor(self.split["train"])
        self.config = config
        self.gt_mesh = resolve_gt_mesh(config)


def composite_on_white(images: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """rgb a + 255 (1 - a): images [N, H, W, 3] uint8, alpha [N, H, W] -> [N, H, W, 3] uint8"""
    out = images.astype(np.float32) * alpha[..., None] + 255.0 * (1.0 - alpha[..., None])
    return (out + 0.5).astype(np.uint8)

