"""The user's photo folder made ready for structure from motion (process_data/imgs2poses.py, which
runs these before SIFT extraction): which photos, all of one size, turned upright, and the object
masks that keep the SIFT features on the object.

Reads DIR/images/*.jpg|jpeg|png in any letter case, 8 or 16 bits, gray, RGB or RGBA (your photos,
left untouched; process_data/loading.py says what is accepted), and DIR/masks/ (the mask of
photos/0001.jpg may be masks/0001.png, 1.png, 0001.jpg.png...); writes

    DIR/colmap/images_upright/  when a photo carries an EXIF rotation (phones): all photos, that
                                one turned upright, for COLMAP (which ignores the EXIF tag)
    DIR/colmap/masks/           when DIR/masks/ is present: your masks, binarised and named as
                                COLMAP wants them (NAME.png), to keep SIFT features on the object
    DIR/colmap/masks_from_alpha/  without DIR/masks/, when the photos are cut-outs with alpha
                                channels: the alphas as masks (NAME.png), used as DIR/masks/ would be

Masks (white = object, the same size as their photo) restrict the SIFT features to the object:
no features where a mask is black (<= 127), so a cluttered or moving background cannot mislead
the matching; --no_feature_masks extracts on the whole photos (when the background's texture is
needed to register them).
"""
import logging
import os
import shutil
from typing import List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from process_data.colmap import mask_path
from process_data.loading import MASK_THRESHOLD, MIN_VIEWS, DatasetError, alpha_masks, has_alpha, list_images, read_photo
from process_data.loading import read_mask as read_mask_file
from utils.prefetch import is_jpeg

log = logging.getLogger("imgs2poses.photos")


USER_MASKS = "masks"


def photo_names(image_dir: str) -> List[str]:
    """Names (relative to image_dir) of the photos to reconstruct (.png/.jpg/.jpeg in any
    letter case); at least MIN_VIEWS."""
    if not os.path.isdir(image_dir):
        raise DatasetError(f"{image_dir} not found: put your photos (.jpg/.png) in an images/ folder inside the scene folder")
    names = [os.path.basename(p) for p in list_images(image_dir)]
    if not names:
        raise DatasetError(f"no images (.png/.jpg) in {image_dir}")
    if len(names) < MIN_VIEWS:
        held = "a single photo" if len(names) == 1 else f"only {len(names)} photos"
        raise DatasetError(
            f"{image_dir} holds {held} ({', '.join(names)}): structure from motion needs overlapping photos, and "
            f"NeuS at least {MIN_VIEWS} views, about 20 (simple object) to 40 (complex object) from all around it; "
            "add photos"
        )
    return names


EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 (or absent) means the pixels are stored upright
UPRIGHT_IMAGES = "images_upright"
# a JPEG written again: the least loss (quality 100, no chroma subsampling)
JPEG_BEST = [cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]


def photo_header(path: str) -> Tuple[int, int, int]:
    """(width, height) as stored and the EXIF orientation (1: stored upright) of the photo at
    path, from its header (no decoding)."""
    try:
        with Image.open(path) as image:
            return image.size[0], image.size[1], int(image.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"cannot read the photo {path} ({type(e).__name__}): corrupt or not an image") from None


def exif_orientation(path: str) -> int:
    return photo_header(path)[2]


def photo_size(path: str) -> Tuple[int, int]:
    """(width, height) of the photo at path as viewers show it: EXIF orientations 5-8 turn it
    by 90 degrees (what `upright_photos` writes, and what masks are drawn on)."""
    width, height, orientation = photo_header(path)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def check_one_size(image_dir: str, names: List[str]) -> None:
    """All photos must be the same size as shown (after their EXIF rotation): they share one
    camera (one calibration), and the NeuS format one image size. From the headers, so cheap."""
    sizes = {}
    for name in names:
        sizes.setdefault(photo_size(os.path.join(image_dir, name)), name)
    if len(sizes) > 1:
        (size_a, name_a), (size_b, name_b) = list(sizes.items())[:2]
        raise DatasetError(
            f"photos of different sizes in {image_dir}: {name_a} is {size_a[0]}x{size_a[1]}, {name_b} is "
            f"{size_b[0]}x{size_b[1]} (as shown, after any EXIF rotation); all photos share one camera, so take "
            "them with one camera and zoom, in one orientation (or crop/resize them to one size first)"
        )


def upright_photos(image_dir: str, names: List[str], work_dir: str) -> str:
    """The folder to reconstruct from: image_dir itself, or, when some photos carry an EXIF
    rotation, work_dir/images_upright/ with those photos turned upright (as viewers and masks
    show them) and the others copied. COLMAP reads the stored pixels and ignores the tag, so
    without this a phone's portrait photos would be reconstructed (and trained) sideways."""
    rotated = [name for name in names if exif_orientation(os.path.join(image_dir, name)) != 1]
    if not rotated:
        return image_dir
    out_dir = os.path.join(work_dir, UPRIGHT_IMAGES)
    os.makedirs(out_dir, exist_ok=True)
    for name in tqdm(names, desc="turning photos upright", unit="photo"):
        path = os.path.join(image_dir, name)
        if name in rotated:
            upright = cv2.imread(path, cv2.IMREAD_COLOR)  # OpenCV applies the EXIF rotation
            if upright is None:
                raise DatasetError(f"cannot read the photo {path}")
            cv2.imwrite(os.path.join(out_dir, name), upright, JPEG_BEST if is_jpeg(name) else [])
        else:
            shutil.copyfile(path, os.path.join(out_dir, name))
    log.info("%d of %d photos carry an EXIF rotation (e.g. %s): reconstructing upright copies in %s",
             len(rotated), len(names), rotated[0], out_dir)
    return out_dir


def read_mask(path: str, name: str, width: int, height: int) -> np.ndarray:
    """The user's mask at `path` of photo `name` (1, 3 or 4 channels, 8 or 16 bits, PNG or
    JPEG: loading.read_mask) as [H, W] uint8, which must be width x height like the photo."""
    try:
        mask = read_mask_file(path)
    except DatasetError:
        mask = None
    if mask is None or mask.shape != (height, width):
        raise DatasetError(f"mask {path} is unreadable or not {width}x{height} like photo {name}")
    return mask


ALPHA_MASKS = "masks_from_alpha"


def masks_from_alpha(image_dir: str, names: List[str], work_dir: str) -> Optional[str]:
    """When the photos carry alpha channels (cut-outs: the object opaque, the rest transparent)
    and there is no masks/ folder: their alphas as masks in work_dir/masks_from_alpha/NAME.png
    (the folder), used as the user's masks would be; None when no photo has a useful alpha.
    Refused when some photos have one and others do not."""
    with_alpha = [has_alpha(os.path.join(image_dir, name)) for name in names]
    if not any(with_alpha):
        return None
    alphas = [read_photo(os.path.join(image_dir, name))[1] if has else None for name, has in zip(names, with_alpha)]
    if alpha_masks([os.path.join(image_dir, n) for n in names], alphas, USER_MASKS + "/") is None:
        return None  # every alpha channel fully opaque: no mask in them
    out_dir = os.path.join(work_dir, ALPHA_MASKS)
    os.makedirs(out_dir, exist_ok=True)
    for name, alpha in zip(names, alphas):
        cv2.imwrite(os.path.join(out_dir, name + ".png"), np.where(alpha > MASK_THRESHOLD, 255, 0).astype(np.uint8))
    log.info("no %s folder: the photos' alpha channels are the masks (written to %s)", USER_MASKS, out_dir)
    return out_dir


def write_feature_masks(mask_dir: str, image_dir: str, names: List[str], out_dir: str) -> None:
    """The user's masks of all photos, in COLMAP's naming for feature extraction:
    out_dir/NAME.png, 255 where the mask is white (> MASK_THRESHOLD, the object) and 0 elsewhere
    (COLMAP extracts no features where it is 0). The user's files are left untouched."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    for name in tqdm(names, desc="feature masks", unit="mask"):
        path = mask_path(mask_dir, name)
        inside = read_mask(path, name, *photo_size(os.path.join(image_dir, name))) > MASK_THRESHOLD
        if not inside.any():
            raise DatasetError(
                f"mask {path} is all black (no pixel above {MASK_THRESHOLD}), so photo {name} would get no features: "
                "white marks the object; fix the mask, or remove the photo and its mask"
            )
        cv2.imwrite(os.path.join(out_dir, name + ".png"), np.where(inside, 255, 0).astype(np.uint8))


def object_masks(scene_dir: str, image_dir: str, names: List[str], work_dir: str, feature_masks: bool):
    """The photos' object masks: DIR/masks/, else their alpha channels (written to work_dir), else
    none -> (the mask folder, which may not exist; the SIFT feature masks' folder, or None when
    there are no masks or feature_masks is off)."""
    mask_dir = os.path.join(scene_dir, USER_MASKS)
    if not os.path.isdir(mask_dir):
        mask_dir = masks_from_alpha(image_dir, names, work_dir) or mask_dir
    if not (feature_masks and os.path.isdir(mask_dir)):
        return mask_dir, None
    feature_mask_dir = os.path.join(work_dir, USER_MASKS)
    write_feature_masks(mask_dir, image_dir, names, feature_mask_dir)
    return mask_dir, feature_mask_dir
