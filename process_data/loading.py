"""Reading a scene's files as users have them, shared by every loader and the command-line
tools (imgs2poses, gen_cameras, scripts/): DatasetError, image and mask reading, mask lookup,
size checks. It imports numpy, OpenCV and Pillow (for headers) only, and utils.prefetch (every file
is read through its imread, which may already hold the pixels): no torch, nothing else of the
framework (a leaf: the loaders and the tools build on it).

What a photo may be (read_photo):
    .png .jpg .jpeg in any letter case; 8- or 16-bit (16-bit scaled to 8: round(v * 255 / 65535));
    grayscale (expanded to 3 channels), RGB, gray + alpha or RGBA (the alpha is returned apart:
    a loader may use it as the mask). JPEGs are read upright after their EXIF rotation.
What a mask may be (read_mask): the same files, 1 or 3 channels (or 4: the alpha also counts);
    the object is where its luminance is above half (127 of 255), and opaque.
Which mask belongs to which image (find_mask / match_masks): the same name, or a name that
    differs only in its extension or in the zero-padding of a number (image/0001.jpg with
    mask/1.png, image/000001.png with mask/000001.jpg, photo.jpg with photo.jpg.png).
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import cv2
import numpy as np
from PIL import Image

from utils import prefetch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = prefetch.IMAGE_SUFFIXES  # compared in lower case: .JPG, .Jpeg ... count
MIN_VIEWS = 3  # fewer views cannot constrain a surface (NeuS wants about 20-40)
MASK_THRESHOLD = 127  # 8-bit mask values above it are the object (white)
ALPHA_OPAQUE = 255


T = TypeVar("T")


def map_files(fn: Callable[[Any], T], paths: Sequence[Any], threads: int = 0) -> Iterator[T]:
    """fn(path) for every path, in order, on a few threads: OpenCV's decoding and resizing release
    the GIL, so a scene's photos load about n-cores times faster. threads 0: one per core (at
    most 8). An exception in fn is raised here, at its path's turn."""
    threads = threads or min(8, os.cpu_count() or 1)
    if threads <= 1 or len(paths) <= 1:
        yield from map(fn, paths)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        yield from pool.map(fn, paths)


class DatasetError(ValueError):
    """Scene data that cannot be used; the message names the file and what to do."""


is_image_file = prefetch.is_image_file


list_images = prefetch.list_images


def _decode(path: str, what: str) -> np.ndarray:
    """The pixels as stored (any depth, any channels); JPEGs upright after their EXIF rotation
    (IMREAD_COLOR applies it, IMREAD_UNCHANGED would not; a JPEG has no alpha and 8 bits)."""
    image = prefetch.imread(path, prefetch.photo_flags(path))
    if image is None:
        raise DatasetError(f"cannot read {what} {path} (missing, corrupt or not an image): replace or remove it")
    return image


def _to_8bit(image: np.ndarray, path: str, what: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:  # v * 255 / 65535, rounded
        return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise DatasetError(
        f"{what} {path} holds {image.dtype} pixels: save it as an 8- or 16-bit PNG or as a JPEG"
    )


def _channels(image: np.ndarray, path: str, what: str) -> np.ndarray:
    """[H, W] or [H, W, C] -> [H, W, C] with C in (1, 3, 4)."""
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        return image
    raise DatasetError(f"{what} {path} has {image.shape[2] if image.ndim == 3 else image.ndim} channels: "
                       "save it as grayscale, RGB or RGBA")


def read_photo(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """An image file as users have it -> rgb [H, W, 3] uint8, alpha [H, W] uint8 or None."""
    image = _channels(_to_8bit(_decode(path, "image"), path, "image"), path, "image")
    alpha = np.ascontiguousarray(image[:, :, 3]) if image.shape[2] == 4 else None
    if image.shape[2] == 1:
        rgb = np.repeat(image, 3, axis=2)
    else:
        rgb = np.ascontiguousarray(image[:, :, 2::-1])  # BGR(A) -> RGB
    return rgb, alpha


def read_mask(path: str) -> np.ndarray:
    """A mask file (1, 3 or 4 channels, 8 or 16 bits, PNG or JPEG) -> [H, W] uint8, the
    object bright: its luminance as OpenCV reads it in grayscale (IMREAD_GRAYSCALE, as the
    loaders always did: bit for bit the same masks), times the alpha where there is one (a
    transparent pixel is not the object)."""
    mask = prefetch.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetError(f"cannot read mask {path} (missing, corrupt or not an image): replace or remove it")
    if not prefetch.is_jpeg(path) and has_alpha(path):
        alpha = _channels(_to_8bit(_decode(path, "mask"), path, "mask"), path, "mask")
        if alpha.shape[2] == 4:
            mask = np.minimum(mask, alpha[:, :, 3])
    return mask


def has_alpha(path: str) -> bool:
    """Whether the file has an alpha channel, from its header (no decoding)."""
    try:
        with Image.open(path) as image:
            return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    except (OSError, ValueError):
        return False


def size_of(image: np.ndarray) -> Tuple[int, int]:
    return image.shape[1], image.shape[0]


def check_same_size(path: str, image: np.ndarray, first_path: str, first_size: Tuple[int, int], what: str = "image") -> None:
    """Refuse an image (or mask) whose size is not the scene's, naming both files."""
    width, height = size_of(image)
    if (width, height) != tuple(first_size):
        raise DatasetError(
            f"{what} {path} is {width}x{height} but {first_path} is {first_size[0]}x{first_size[1]}: all images "
            "and masks of a scene must be the same size; crop or resize them to one size (before finding the cameras)"
        )


def resize(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """To size (w, h) by area averaging (a no-op at the same size)."""
    return image if size_of(image) == tuple(size) else cv2.resize(image, tuple(size), interpolation=cv2.INTER_AREA)


def read_image(
    path: str, full_size: Tuple[int, int], size: Tuple[int, int], grayscale: bool = False, first_path: str = "the scene's first image"
) -> np.ndarray:
    """An image (RGB uint8 [h, w, 3]) or, with grayscale, a mask (uint8 [h, w], read_mask) that
    must be full_size (w, h) on disk, resized to size (w, h)."""
    image = read_mask(path) if grayscale else read_photo(path)[0]
    check_same_size(path, image, first_path, full_size, "mask" if grayscale else "image")
    return resize(image, size)


def binary_mask(mask: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> float32 {0, 1}: the object where above MASK_THRESHOLD."""
    return (mask > MASK_THRESHOLD).astype(np.float32)


def name_key(name: str) -> str:
    """What names a view regardless of folder, extension (up to two: photo.jpg.png) and the
    zero-padding of a number: 'image/0001.JPG' -> '1', 'photo.jpg.png' -> 'photo'."""
    stem = os.path.basename(name)
    for _ in range(2):
        root, ext = os.path.splitext(stem)
        if ext.lower() not in IMAGE_SUFFIXES:
            break
        stem = root
    return str(int(stem)) if stem.isdigit() else stem


def _masks_by_key(mask_dir: str) -> Dict[str, List[str]]:
    by_key: Dict[str, List[str]] = {}
    for path in list_images(mask_dir):
        by_key.setdefault(name_key(path), []).append(path)
    return by_key


def _one(candidates: List[str], image: str) -> str:
    if len(candidates) > 1:
        raise DatasetError(
            f"{' and '.join(candidates[:2])} both match image {image}: keep one mask per image"
        )
    return candidates[0]


def find_mask(mask_dir: str, name: str) -> str:
    """The mask of photo `name` in mask_dir: the same name, or one that differs only in its
    extension or zero-padding (name_key)."""
    exact = os.path.join(mask_dir, os.path.basename(name))
    if os.path.isfile(exact):
        return exact
    candidates = _masks_by_key(mask_dir).get(name_key(name))
    if not candidates:
        stem = os.path.splitext(os.path.basename(name))[0]
        raise DatasetError(
            f"no mask for photo {name} in {mask_dir} (expected {stem}.png or .jpg, the number's zero-padding may differ): "
            "give every photo a mask, or remove the mask folder"
        )
    return _one(candidates, name)


def match_masks(image_paths: Sequence[str], mask_dir: str, image_dir: str) -> List[str]:
    """The mask of every image: by name_key when every image finds one; else, when no image
    does and there are as many masks as images, in sorted order (NeuS's habit: view i is the
    i-th file). Otherwise refused, naming an image without a mask."""
    mask_paths = list_images(mask_dir)
    by_key = _masks_by_key(mask_dir)
    keyed = [by_key.get(name_key(path)) for path in image_paths]
    if all(keyed):
        return [_one(candidates, path) for candidates, path in zip(keyed, image_paths)]
    if not any(keyed) and len(mask_paths) == len(image_paths):
        log.info("the masks in %s are named unlike the images in %s: paired in sorted order", mask_dir, image_dir)
        return mask_paths
    missing = next(path for path, candidates in zip(image_paths, keyed) if not candidates)
    stem = os.path.splitext(os.path.basename(missing))[0]
    raise DatasetError(
        f"no mask for image {missing} in {mask_dir} ({len(mask_paths)} masks for {len(image_paths)} images; expected "
        f"{stem}.png or .jpg, the number's zero-padding may differ): give every image a mask, or remove the mask "
        "folder (or set dataset.use_masks=false)"
    )


def alpha_masks(
    image_paths: Sequence[str], alphas: Sequence[Optional[np.ndarray]], mask_folder: str = "mask/"
) -> Optional[List[np.ndarray]]:
    """The images' alpha channels as masks, or None when no image has a (not fully opaque) one.
    Refused when some images have one and others do not (naming one of each)."""
    with_alpha = [a is not None and (a < ALPHA_OPAQUE).any() for a in alphas]
    if not any(with_alpha):
        return None
    if not all(with_alpha):
        first_with = image_paths[with_alpha.index(True)]
        first_without = image_paths[with_alpha.index(False)]
        raise DatasetError(
            f"image {first_with} has a transparent background (an alpha mask) but {first_without} has none: "
            f"give every image an alpha channel, or put the masks in a {mask_folder} folder"
        )
    return list(alphas)


def check_enough_views(image_paths: Sequence[str], folder: str, minimum: int = MIN_VIEWS) -> None:
    if len(image_paths) < minimum:
        names = ", ".join(os.path.basename(p) for p in image_paths)
        raise DatasetError(
            f"{folder} holds {len(image_paths)} image(s) ({names}): at least {minimum} views are needed, and NeuS wants "
            "about 20 (simple object) to 40 (complex object) from all around it; add photos"
        )


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


def decompose_projection(P: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """P [3, 4] = K [R | t] -> K [3, 3] (K[2, 2] = 1), camera-to-world [3, 4]."""
    K, R, t = cv2.decomposeProjectionMatrix(P)[:3]
    K = K / K[2, 2]
    c2w = np.zeros((3, 4))
    c2w[:, :3] = R.T
    c2w[:, 3] = (t[:3] / t[3])[:, 0]
    return K, c2w
