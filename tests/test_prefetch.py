"""utils.prefetch: the pixels decoded ahead are those cv2.imread gives, each taken once; the byte
cap; which files a NeuS-layout scene lists; and the loaders reading through it."""
import os

import cv2
import numpy as np
import pytest

from utils import prefetch


@pytest.fixture(autouse=True)
def _clean():
    prefetch.stop()
    yield
    prefetch.stop()


def _write(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, image)
    return path


def _scene(tmp_path):
    rng = np.random.default_rng(0)
    photos = [_write(str(tmp_path / "image" / f"{i:03d}.png"), rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
              for i in range(2)]
    photos.append(_write(str(tmp_path / "image" / "002.JPG"), rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)))
    (tmp_path / "image" / "notes.txt").write_text("not an image")
    masks = [_write(str(tmp_path / "mask" / f"{i:03d}.png"), rng.integers(0, 256, (6, 8), dtype=np.uint8))
             for i in range(3)]
    return photos, masks


def test_scene_files_lists_photos_then_masks_with_their_flags(tmp_path):
    photos, masks = _scene(tmp_path)
    files = prefetch.scene_files(str(tmp_path))
    assert files == [(photos[0], cv2.IMREAD_UNCHANGED), (photos[1], cv2.IMREAD_UNCHANGED),
                     (photos[2], cv2.IMREAD_COLOR),  # a JPEG: upright after EXIF, like loading.read_photo
                     *[(m, cv2.IMREAD_GRAYSCALE) for m in masks]]
    assert prefetch.scene_files(str(tmp_path / "absent")) == []


def test_prefetched_pixels_are_the_files_and_taken_once(tmp_path, monkeypatch):
    photos, masks = _scene(tmp_path)
    prefetch.start(prefetch.scene_files(str(tmp_path)))
    for future in list(prefetch._pending.values()):
        future.result()  # decoded before cv2.imread is watched below
    reads = []
    real_imread = cv2.imread
    monkeypatch.setattr(cv2, "imread", lambda p, f: reads.append(p) or real_imread(p, f))
    for path in photos:
        np.testing.assert_array_equal(prefetch.imread(path, prefetch.photo_flags(path)),
                                      real_imread(path, prefetch.photo_flags(path)))
    np.testing.assert_array_equal(prefetch.imread(masks[0], cv2.IMREAD_GRAYSCALE),
                                  real_imread(masks[0], cv2.IMREAD_GRAYSCALE))
    assert reads == []  # all from the prefetch
    # taken once: the second read, and a read with other flags, go to the file
    prefetch.imread(photos[0], cv2.IMREAD_UNCHANGED)
    prefetch.imread(masks[1], cv2.IMREAD_COLOR)
    assert reads == [photos[0], masks[1]]


def test_byte_cap_leaves_the_rest_to_the_loader(tmp_path, monkeypatch):
    """6 x 8 x 3 = 144 bytes a photo: with a cap of 100 only the first is held; the others read
    from the file, the same pixels."""
    photos, _ = _scene(tmp_path)
    monkeypatch.setattr(prefetch, "MAX_BYTES", 100)
    prefetch.start([(p, cv2.IMREAD_UNCHANGED) for p in photos[:2]])
    for path in photos[:2]:
        np.testing.assert_array_equal(prefetch.imread(path, cv2.IMREAD_UNCHANGED), cv2.imread(path, cv2.IMREAD_UNCHANGED))
    assert prefetch._held == 144


def test_missing_file_reads_as_none_as_before(tmp_path):
    missing = str(tmp_path / "image" / "gone.png")
    prefetch.start([(missing, cv2.IMREAD_UNCHANGED)])
    assert prefetch.imread(missing, cv2.IMREAD_UNCHANGED) is None  # loading.py turns None into its DatasetError


def test_stop_drops_what_was_not_taken(tmp_path):
    photos, _ = _scene(tmp_path)
    prefetch.start([(photos[0], cv2.IMREAD_UNCHANGED)])
    prefetch.stop()
    assert prefetch._pending == {} and prefetch._held == 0
    np.testing.assert_array_equal(prefetch.imread(photos[0], cv2.IMREAD_UNCHANGED),
                                  cv2.imread(photos[0], cv2.IMREAD_UNCHANGED))


def test_run_prefetch_is_a_hint(tmp_path):
    """run.py's prefetch: a config it cannot read starts nothing and raises nothing (set_up
    reports it); a good one starts the scene's files."""
    import run

    run.prefetch_scene(str(tmp_path / "absent.yaml"), [])
    assert prefetch._pending == {}
    photos, masks = _scene(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("dataset:\n  root_dir: somewhere\n")
    run.prefetch_scene(str(config), [f"dataset.root_dir={tmp_path}"])
    assert len(prefetch._pending) == len(photos) + len(masks)
