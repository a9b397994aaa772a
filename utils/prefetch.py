"""Decoding a scene's image files ahead of need.

A run spends its first ~3 s importing torch and the framework: single-threaded Python, one core
busy. run.py starts decoding the scene's photos and masks on one background thread before that
(OpenCV releases the GIL while it decodes), and the loaders take the decoded pixels instead of
reading the files again (process_data/loading.py reads every file through `imread`). A file the
prefetch did not reach, or that it was never told about, is read as before; a wrong guess of
the files costs only the decoding. OpenCV and numpy only: run.py imports it before torch.
"""
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

MAX_BYTES = 1 << 30  # decoded pixels held at most; past it the rest is read when needed
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared in lower case: .JPG, .Jpeg ... count

_lock = threading.Lock()
_pending: Dict[Tuple[str, int], Future] = {}
_executor: Optional[ThreadPoolExecutor] = None
_held = 0  # bytes decoded so far (taken or not)


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def is_jpeg(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in (".jpg", ".jpeg")


def list_images(folder: str) -> List[str]:
    """Paths of the images in folder (.png/.jpg/.jpeg, any letter case), in sorted name order
    (NeuS's order: view i is the i-th file); [] without the folder."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, name) for name in os.listdir(folder)
        if is_image_file(name) and os.path.isfile(os.path.join(folder, name))
    )


def photo_flags(path: str) -> int:
    """How a photo is decoded: JPEGs upright after their EXIF rotation (IMREAD_COLOR applies it,
    IMREAD_UNCHANGED would not; a JPEG has no alpha and 8 bits), other files as stored."""
    return cv2.IMREAD_COLOR if is_jpeg(path) else cv2.IMREAD_UNCHANGED


def _key(path: str, flags: int) -> Tuple[str, int]:
    return os.path.abspath(path), int(flags)


def _decode(path: str, flags: int) -> Optional[np.ndarray]:
    global _held
    with _lock:
        if _held >= MAX_BYTES:
            return None
    image = cv2.imread(path, flags)
    if image is not None:
        with _lock:
            _held += image.nbytes
    return image


def start(files: Sequence[Tuple[str, int]]) -> None:
    """Decode files [(path, cv2.imread flags)] in this order on one background thread."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        for path, flags in files:
            key = _key(path, flags)
            if key not in _pending:
                _pending[key] = _executor.submit(_decode, path, flags)


def imread(path: str, flags: int) -> Optional[np.ndarray]:
    """cv2.imread(path, flags): the prefetched pixels when there are (waiting for a decode under
    way; a decode not yet begun is cancelled and done here), else the file read now."""
    with _lock:
        future = _pending.pop(_key(path, flags), None)
    if future is not None and not future.cancel():
        image = future.result()
        if image is not None:
            return image
    return cv2.imread(path, flags)


def stop() -> None:
    """Drop what was not taken (its memory) and end the thread."""
    global _executor, _held
    with _lock:
        futures, executor = list(_pending.values()), _executor
        _pending.clear()
        _executor, _held = None, 0
    for future in futures:
        future.cancel()
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)


def scene_files(root_dir: str) -> List[Tuple[str, int]]:
    """The files a scene in the NeuS layout (DTU, custom captures, the demo) will be read from,
    photos first, each with its flags: <root_dir>/image/ (or images/) as photos, <root_dir>/mask/
    in grayscale (loading.read_mask). Other layouts: nothing."""
    image_dir = next((os.path.join(root_dir, d) for d in ("image", "images")
                      if os.path.isdir(os.path.join(root_dir, d))), None)
    if image_dir is None:
        return []
    photos = [(path, photo_flags(path)) for path in list_images(image_dir)]
    masks = [(path, cv2.IMREAD_GRAYSCALE) for path in list_images(os.path.join(root_dir, "mask"))]
    return photos + masks
