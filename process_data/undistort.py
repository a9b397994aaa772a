"""The registered photos and their masks undistorted to one pinhole camera, the last stage of
structure from motion (process_data/imgs2poses.py): the NeuS format and the `colmap` dataset need
pinhole cameras. Writes

    DIR/sparse/0/               the UNDISTORTED model: one PINHOLE camera, the poses of the
                                registered photos, the sparse points (cameras/images/points3D.bin)
    DIR/images_undistorted/     the registered photos undistorted to that camera (same names),
                                cropped at the right and bottom to a multiple of 8 pixels so
                                that dataset.img_downscale 2, 4 or 8 divides them
    DIR/masks_undistorted/      when DIR/masks/ holds masks of the photos (NAME, NAME.png or
                                STEM.png; white = object): them, undistorted the same way
"""
import os
import shutil
from typing import Tuple

import cv2
import numpy as np
from tqdm import tqdm

from process_data.colmap import SPARSE_MODEL, import_pycolmap, mask_path
from process_data.loading import MASK_THRESHOLD, DatasetError
from process_data.photos import JPEG_BEST, read_mask
from utils.prefetch import is_jpeg

pycolmap = import_pycolmap()


UNDISTORTED_IMAGES = "images_undistorted"
UNDISTORTED_MASKS = "masks_undistorted"


def undistort(model_dir: str, image_dir: str, scene_dir: str, num_threads: int) -> None:
    """Undistort the registered photos to a PINHOLE camera: DIR/sparse/0, DIR/images_undistorted."""
    staging = os.path.join(scene_dir, "colmap", "undistorted")
    shutil.rmtree(staging, ignore_errors=True)
    pycolmap.undistort_images(staging, model_dir, image_dir, output_type="COLMAP", num_threads=num_threads)
    # COLMAP's layout is staging/{images,sparse,stereo}; the NeuS tools expect sparse/0
    for source, target in ((os.path.join(staging, "sparse"), SPARSE_MODEL), (os.path.join(staging, "images"), UNDISTORTED_IMAGES)):
        target = os.path.join(scene_dir, target)
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(source, target)
    shutil.rmtree(staging)
    crop_to_trainable_size(scene_dir)


TRAINABLE_MULTIPLE = 8  # undistorted photos are cropped to a multiple of this many pixels


def trainable_size(width: int, height: int, multiple: int = TRAINABLE_MULTIPLE) -> Tuple[int, int]:
    """The largest (w, h) <= (width, height) whose sides are multiples of `multiple`."""
    return width - width % multiple, height - height % multiple


def crop_to_trainable_size(scene_dir: str) -> None:
    """Crop DIR/images_undistorted and the cameras of DIR/sparse/0 at the right and bottom to
    trainable_size. The undistorter's sizes are arbitrary (400x299), and the NeuS loaders need
    img_downscale to divide the image; cropping there keeps the pixel origin, so the
    intrinsics (focal, principal point) stay exactly as they are."""
    model_dir = os.path.join(scene_dir, SPARSE_MODEL)
    model = pycolmap.Reconstruction(model_dir)
    sizes = {}
    for camera_id, camera in model.cameras.items():
        camera.width, camera.height = sizes[camera_id] = trainable_size(camera.width, camera.height)
    model.write(model_dir)
    for image in model.images.values():
        width, height = sizes[image.camera_id]
        path = os.path.join(scene_dir, UNDISTORTED_IMAGES, image.name)
        photo = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if photo is None:
            raise DatasetError(f"cannot read the undistorted photo {path}")
        if photo.shape[:2] != (height, width):
            cv2.imwrite(path, photo[:height, :width], JPEG_BEST if is_jpeg(path) else [])


def undistortion_maps(distorted, pinhole):
    """cv2.remap maps [H, W] float32 (x, y) that sample a photo of the distorted pycolmap
    camera at every pixel of the pinhole one. COLMAP's pixel coordinates put the top-left pixel
    centre at (0.5, 0.5), OpenCV's at (0, 0): hence the +-0.5."""
    u, v = np.meshgrid(np.arange(pinhole.width) + 0.5, np.arange(pinhole.height) + 0.5)
    rays = pinhole.cam_from_img(np.stack([u.ravel(), v.ravel()], axis=1))  # [H*W, 2] normalised image plane
    pixels = distorted.img_from_cam(np.concatenate([rays, np.ones((len(rays), 1))], axis=1)) - 0.5  # [H*W, 2]
    pixels = pixels.astype(np.float32).reshape(pinhole.height, pinhole.width, 2)
    return pixels[:, :, 0], pixels[:, :, 1]


def undistort_masks(mask_dir: str, distorted_model, scene_dir: str) -> None:
    """The masks of the registered photos, undistorted like the photos, into
    DIR/masks_undistorted/STEM.png (0 or 255)."""
    pinhole_model = pycolmap.Reconstruction(os.path.join(scene_dir, SPARSE_MODEL))
    out_dir = os.path.join(scene_dir, UNDISTORTED_MASKS)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    maps = {}
    for image_id in tqdm(distorted_model.reg_image_ids(), desc="undistorting masks", unit="mask"):
        image = distorted_model.image(image_id)
        camera = distorted_model.camera(image.camera_id)
        mask = read_mask(mask_path(mask_dir, image.name), image.name, camera.width, camera.height)
        if image.camera_id not in maps:
            pinhole = pinhole_model.camera(pinhole_model.find_image_with_name(image.name).camera_id)
            maps[image.camera_id] = undistortion_maps(camera, pinhole)
        undistorted = cv2.remap(mask, *maps[image.camera_id], cv2.INTER_LINEAR, borderValue=0)
        binary = np.where(undistorted > MASK_THRESHOLD, 255, 0).astype(np.uint8)
        cv2.imwrite(os.path.join(out_dir, os.path.splitext(image.name)[0] + ".png"), binary)
