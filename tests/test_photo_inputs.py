"""Photos as users have them (issue 15, point 3): each case loads correctly or is refused with
one line that names the file and what to do, writing nothing. Tiny 16x12 scenes in the NeuS
format (image/, mask/, cameras_sphere.npz) written to tmp_path; the imgs2poses / gen_cameras
input folders (DIR/images, DIR/masks) where the case applies to them."""
import logging
import os

import cv2
import numpy as np
import pytest

import run
from process_data import photos
from process_data.dtu import DTUDataset, load_neus_scene
from process_data.loading import DatasetError, find_mask, list_images, name_key
from tests.conftest import ROOT
from utils.camera import look_at

W, H = 16, 12
CONFIG = os.path.join(ROOT, "confs", "neus-dtu-wmask-cpu.yaml")


def write_cameras(root, n_views):
    """cameras_sphere.npz of n_views cameras on a ring of radius 3 looking at the origin."""
    K = np.array([[20.0, 0, (W - 1) / 2], [0, 20.0, (H - 1) / 2], [0, 0, 1]])
    cameras = {}
    for i in range(n_views):
        angle = 2 * np.pi * i / n_views
        c2w = look_at(np.array([3 * np.cos(angle), 3 * np.sin(angle), 0.5]), np.zeros(3), np.array([0, 0, 1.0]))
        R = c2w[:, :3].T
        world_mat = np.eye(4)
        world_mat[:3, :4] = K @ np.concatenate([R, -(R @ c2w[:, 3])[:, None]], axis=1)
        cameras[f"world_mat_{i}"], cameras[f"scale_mat_{i}"] = world_mat, np.eye(4)
    np.savez(os.path.join(root, "cameras_sphere.npz"), **cameras)


def photo(i, channels=3, dtype=np.uint8, size=(W, H)):
    """A smooth pattern, distinct per view (JPEG keeps it to a few levels): [h, w, channels]
    (or [h, w] for 1 channel); 16-bit adds noise in the low byte, which the scaling rounds."""
    y, x, c = np.meshgrid(np.arange(size[1]), np.arange(size[0]), np.arange(channels), indexing="ij")
    image = 10 + 6 * x + 5 * y + 10 * i + 20 * c  # <= 235 for views i <= 4
    if dtype == np.uint16:
        image = image * 257 + np.random.default_rng(i).integers(-128, 128, image.shape)
    image = image.astype(dtype)
    return image[:, :, 0] if channels == 1 else image


def object_mask(i, size=(W, H)):
    """uint8 {0, 255} [h, w]: a rectangle whose place depends on the view (to check pairing)."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[2 : 2 + 4 + i % 5, 3 + i : 9 + i] = 255
    return mask


def scene(tmp_path, images, masks=None):
    """A NeuS-format scene: images {name: array}, masks {name: array} or None (no mask/)."""
    root = tmp_path / "scene"
    os.makedirs(root / "image")
    for name, image in images.items():
        assert cv2.imwrite(str(root / "image" / name), image)
    if masks is not None:
        os.makedirs(root / "mask")
        for name, mask in masks.items():
            assert cv2.imwrite(str(root / "mask" / name), mask)
    write_cameras(str(root), len(images))
    return str(root)


def load(root, use_masks=True):
    return load_neus_scene(root, "cameras_sphere.npz", 1, use_masks=use_masks)


def dataset(root, apply_mask=False, use_masks=True):
    config = DTUDataset.Config(root_dir=root, img_downscale=1, apply_mask=apply_mask, use_masks=use_masks,
                               background_color="white", holdout_every=0)
    return DTUDataset(config, "cpu")


# --- loaded correctly -------------------------------------------------------------------------
def test_jpeg_with_any_case_of_extension(tmp_path):
    names = ["000.jpg", "001.JPG", "002.jpeg", "003.JPEG", "004.Jpg"]
    root = scene(tmp_path, {n: photo(i) for i, n in enumerate(names)})
    views = load(root)
    assert views.names == sorted(names) and views.images.shape == (5, H, W, 3)
    assert list_images(os.path.join(root, "image")) == [os.path.join(root, "image", n) for n in sorted(names)]
    original = photo(names.index(views.names[0]))[:, :, ::-1].astype(int)  # written as BGR
    assert np.abs(views.images[0].astype(int) - original).mean() < 3  # JPEG at quality 95


def test_8bit_png_exact(tmp_path):
    root = scene(tmp_path, {f"{i:06d}.png": photo(i) for i in range(3)})
    views = load(root)
    assert views.images.dtype == np.uint8
    np.testing.assert_array_equal(views.images[1], photo(1)[:, :, ::-1])
    assert views.masks is None and views.mask_source is None


def test_16bit_png_scaled_to_unit_range(tmp_path):
    root = scene(tmp_path, {f"{i:06d}.png": photo(i, dtype=np.uint16) for i in range(3)})
    rays = dataset(root).view_rays(2)["rgb"].numpy()  # [H*W, 3] in [0, 1]
    expected = photo(2, dtype=np.uint16)[:, :, ::-1].reshape(-1, 3) / 65535.0
    np.testing.assert_allclose(rays, expected, atol=0.5 / 255 + 1e-6)
    assert rays.max() <= 1.0 and rays.min() >= 0.0


def test_grayscale_expanded_to_three_channels(tmp_path):
    images = {"0.png": photo(0, channels=1), "1.png": photo(1, channels=1), "2.jpg": photo(2, channels=1)}
    views = load(scene(tmp_path, images))
    assert views.images.shape == (3, H, W, 3)
    for c in range(3):
        np.testing.assert_array_equal(views.images[0, :, :, c], photo(0, channels=1))
    assert (views.images[2, :, :, 0] == views.images[2, :, :, 1]).all()  # the JPEG too


def test_rgba_alpha_is_the_mask_when_there_is_no_mask_folder(tmp_path, caplog):
    images = {}
    for i in range(3):
        rgba = photo(i, channels=4)
        rgba[:, :, 3] = object_mask(i)
        images[f"{i:03d}.png"] = rgba
    root = scene(tmp_path, images)
    with caplog.at_level(logging.INFO):
        data = dataset(root, apply_mask=True)  # apply_mask needs masks: the alpha gives them
    assert "alpha channels are the masks" in caplog.text
    assert data.views.mask_source == "alpha" and data.has_masks
    for i in range(3):
        np.testing.assert_array_equal(data.views.masks[i], object_mask(i) / 255.0)
        np.testing.assert_array_equal(data.views.images[i], images[f"{i:03d}.png"][:, :, 2::-1])
    # a mask/ folder, when present, wins over the alpha
    os.makedirs(os.path.join(root, "mask"))
    for i in range(3):
        cv2.imwrite(os.path.join(root, "mask", f"{i:03d}.png"), np.full((H, W), 255, np.uint8))
    assert load(root).masks.min() == 1.0
    # use_masks=false: neither
    assert load(root, use_masks=False).masks is None


@pytest.mark.parametrize("kind", ["png_1ch", "png_3ch", "jpg_1ch", "jpg_3ch", "png_16bit"])
def test_masks_of_one_or_three_channels_png_or_jpeg(tmp_path, kind):
    ext = ".jpg" if kind.startswith("jpg") else ".png"
    masks = {}
    for i in range(3):
        mask = object_mask(i)
        if kind.endswith("3ch"):
            mask = np.repeat(mask[:, :, None], 3, axis=2)
        if kind == "png_16bit":
            mask = mask.astype(np.uint16) * 257
        masks[f"{i:06d}{ext}"] = mask
    views = load(scene(tmp_path, {f"{i:06d}.png": photo(i) for i in range(3)}, masks))
    assert views.masks.dtype == np.float32
    for i in range(3):
        np.testing.assert_array_equal(views.masks[i], object_mask(i) / 255.0)


@pytest.mark.parametrize("image_names,mask_names", [
    (["0008.jpg", "0009.jpg", "0010.jpg"], ["8.png", "9.png", "10.png"]),  # sorted, 10.png would come first
    (["000001.png", "000002.png", "000003.png"], ["000001.jpg", "000002.jpg", "000003.jpg"]),
    (["a.JPG", "b.JPG", "c.JPG"], ["a.png", "b.png", "c.png"]),
    (["IMG_1.jpg", "IMG_2.jpg", "IMG_3.jpg"], ["IMG_1.jpg.png", "IMG_2.jpg.png", "IMG_3.jpg.png"]),  # COLMAP's
])
def test_image_and_mask_names_differing_in_padding_or_extension(tmp_path, image_names, mask_names):
    images = {n: photo(i) for i, n in enumerate(image_names)}
    masks = {n: object_mask(i) for i, n in enumerate(mask_names)}
    views = load(scene(tmp_path, images, masks))
    for index, name in enumerate(views.names):
        np.testing.assert_array_equal(views.masks[index], object_mask(image_names.index(name)) / 255.0)
    # the same lookup serves imgs2poses and gen_cameras (DIR/masks of DIR/images)
    mask_dir = str(tmp_path / "scene" / "mask")
    assert os.path.basename(find_mask(mask_dir, image_names[2])) == mask_names[2]
    assert name_key("image/0001.JPG") == name_key("1.png") == "1"


# --- refused: one line naming the file and what to do ----------------------------------------
def refusal(root, **kwargs):
    with pytest.raises(DatasetError) as error:
        dataset(root, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_mixed_sizes_refused_naming_two_files(tmp_path):
    images = {"000.png": photo(0), "001.png": photo(1), "002.png": photo(2, size=(W, H + 2))}
    message = refusal(scene(tmp_path, images))
    assert "002.png is 16x14" in message and "000.png is 16x12" in message and "same size" in message
    # a mask of another size than its image, too
    root = scene(tmp_path / "b", {f"{i}.png": photo(i) for i in range(3)},
                 {f"{i}.png": object_mask(i, size=(W // 2, H // 2)) for i in range(3)})
    message = refusal(root)
    assert "mask" in message and "0.png is 8x6" in message and "image/0.png is 16x12" in message


def test_fewer_than_three_views_refused(tmp_path):
    message = refusal(scene(tmp_path, {"a.png": photo(0), "b.png": photo(1)}))
    assert "holds 2 image(s) (a.png, b.png)" in message and "at least 3 views" in message and "add photos" in message


def test_mask_missing_or_alpha_on_some_images_refused(tmp_path):
    root = scene(tmp_path, {f"{i:04d}.jpg": photo(i) for i in range(3)}, {"0.png": object_mask(0), "1.png": object_mask(1)})
    message = refusal(root)
    assert "no mask for image" in message and "0002.jpg" in message and "use_masks=false" in message
    rgba = photo(0, channels=4)
    rgba[:, :, 3] = object_mask(0)
    message = refusal(scene(tmp_path / "b", {"0.png": rgba, "1.png": photo(1), "2.png": photo(2)}))
    assert "0.png has a transparent background" in message and "1.png has none" in message
    message = refusal(scene(tmp_path / "c", {f"{i}.png": photo(i) for i in range(3)}), apply_mask=True)
    assert "no mask/ folder" in message and "apply_mask=false" in message


@pytest.mark.parametrize("case", ["mixed_sizes", "two_views"])
def test_run_refuses_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    if case == "mixed_sizes":
        images = {"000.png": photo(0), "001.png": photo(1, size=(H, W)), "002.png": photo(2)}
        expected = ["data error:", "001.png is 12x16", "000.png is 16x12"]
    else:
        images = {"000.png": photo(0), "001.png": photo(1)}
        expected = ["data error:", "holds 2 image(s)", "at least 3 views"]
    root = scene(tmp_path, images, {n: object_mask(0, size=(W, H)) for n in ("000.png", "001.png")})
    outputs = tmp_path / "outputs"
    code = run.main(["--config", CONFIG, "--train", "--outputs_dir", str(outputs), "device=cpu",
                     f"dataset.root_dir={root}", "dataset.img_downscale=1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1, err
    assert all(part in lines[0] for part in expected), lines[0]
    assert not outputs.exists()


# --- the photo folders of imgs2poses / gen_cameras --------------------------------------------
def test_imgs2poses_folder_any_extension_case_and_at_least_three_photos(tmp_path):
    folder = tmp_path / "images"
    os.makedirs(folder)
    for i, name in enumerate(["a.JPG", "b.jpeg", "c.PNG"]):
        cv2.imwrite(str(folder / name), photo(i))
    assert photos.photo_names(str(folder)) == ["a.JPG", "b.jpeg", "c.PNG"]
    os.remove(folder / "c.PNG")
    with pytest.raises(DatasetError, match=r"only 2 photos \(a.JPG, b.jpeg\).*at least 3 views.*add photos"):
        photos.photo_names(str(folder))


def test_imgs2poses_masks_from_alpha(tmp_path):
    folder = tmp_path / "images"
    os.makedirs(folder)
    names = [f"p{i}.png" for i in range(3)]
    for i, name in enumerate(names):
        rgba = photo(i, channels=4)
        rgba[:, :, 3] = object_mask(i)
        cv2.imwrite(str(folder / name), rgba)
    out = photos.masks_from_alpha(str(folder), names, str(tmp_path / "colmap"))
    for i, name in enumerate(names):
        np.testing.assert_array_equal(cv2.imread(find_mask(out, name), cv2.IMREAD_UNCHANGED), object_mask(i))
    opaque = tmp_path / "opaque"
    os.makedirs(opaque)
    for name in names:
        cv2.imwrite(str(opaque / name), np.full((H, W, 4), 255, np.uint8))
    assert photos.masks_from_alpha(str(opaque), names, str(tmp_path / "colmap2")) is None


def test_gen_cameras_writes_8bit_rgb_and_binary_masks(tmp_path):
    """16-bit gray photos and 3-channel JPEG masks named with other padding -> image/ 8-bit
    RGB, mask/ {0, 255}."""
    pytest.importorskip("pycolmap", reason="needs pycolmap")
    from process_data.colmap import SparseModel
    from process_data.gen_cameras import write_views

    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    names = ["0001.png", "0002.png", "0003.png"]
    for i, name in enumerate(names):
        cv2.imwrite(str(tmp_path / "images" / name), photo(i, channels=1, dtype=np.uint16))
        cv2.imwrite(str(tmp_path / "masks" / f"{i + 1}.jpg"), np.repeat(object_mask(i)[:, :, None], 3, axis=2))
    model = SparseModel(names=names, intrinsics=None, w2c=None, width=W, height=H, points=None, colors=None,
                        track_lengths=None)
    write_views(str(tmp_path), model, str(tmp_path / "images"), str(tmp_path / "masks"))
    for i in range(3):
        image = cv2.imread(str(tmp_path / "image" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.shape == (H, W, 3)
        gray16 = photo(i, channels=1, dtype=np.uint16).astype(np.int64)
        assert np.abs(image[:, :, 0].astype(np.int64) - gray16 * 255 / 65535).max() <= 0.5 + 1e-9
        np.testing.assert_array_equal(cv2.imread(str(tmp_path / "mask" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED),
                                      object_mask(i))
