"""Structure from motion on photos (imgs2poses), the NeuS format made from it (gen_cameras) and
the `colmap` dataset: the demo scene, rendered with fine texture into a folder of plain photos,
must give back its true cameras; bad folders must give clear errors."""
import json
import os
import shutil
import time

import cv2
import numpy as np
import pytest
import trimesh

pycolmap = pytest.importorskip("pycolmap", reason="pycolmap is not installed (pip install -r requirements.txt)")

from process_data.colmap import ColmapDataset, load_colmap_scene  # noqa: E402
from process_data.dtu import DatasetError, decompose_projection, load_neus_scene  # noqa: E402
from process_data.gen_cameras import gen_cameras  # noqa: E402
from process_data.imgs2poses import SfMOptions, run_sfm  # noqa: E402
from process_data.synthetic import make_demo_scene  # noqa: E402
from utils.camera import aligned_pose_errors  # noqa: E402

N_VIEWS = 48


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    """The demo scene (48 views, 400x300, fine spots) as photos + masks in a capture folder,
    run through imgs2poses and gen_cameras -> (truth dir, capture dir, seconds of SfM)."""
    root = tmp_path_factory.mktemp("sfm")
    truth = make_demo_scene(str(root / "truth"), n_views=N_VIEWS, width=400, height=300, detail=0.9)
    capture = root / "capture"
    os.makedirs(capture / "masks")
    shutil.copytree(os.path.join(truth, "image"), capture / "images")
    for i, name in enumerate(sorted(os.listdir(capture / "images"))):
        shutil.copy(os.path.join(truth, "mask", f"{i:03d}.png"), capture / "masks" / name)
    start = time.time()
    run_sfm(str(capture), SfMOptions(num_threads=1))
    gen_cameras(str(capture))
    return truth, str(capture), time.time() - start


def true_index(name: str) -> int:
    return int(os.path.splitext(name)[0])


def test_recovers_the_true_cameras(recovered):
    """>= 90% of the views register; after a similarity alignment every registered view is
    within 1 degree and 1% of the camera distance of the truth."""
    truth, capture, seconds = recovered
    with open(os.path.join(capture, "gen_cameras.json")) as f:
        names = json.load(f)["views"]
    ours = np.load(os.path.join(capture, "cameras_sphere.npz"))
    true = np.load(os.path.join(truth, "cameras_sphere.npz"))
    c2w = np.stack([decompose_projection(ours[f"world_mat_{i}"][:3])[1] for i in range(len(names))])
    c2w_true = np.stack([decompose_projection(true[f"world_mat_{true_index(n)}"][:3])[1] for n in names])
    rotation, centre, _ = aligned_pose_errors(c2w, c2w_true)
    print(
        f"\nSfM on the demo scene: {len(names)}/{N_VIEWS} views registered in {seconds:.1f} s; rotation error "
        f"max {rotation.max():.3f} mean {rotation.mean():.3f} deg; centre error max {100 * centre.max():.3f}% "
        f"mean {100 * centre.mean():.3f}% of the camera distance"
    )
    assert len(names) >= 0.9 * N_VIEWS
    assert rotation.max() < 1.0
    assert centre.max() < 0.01


def test_region_holds_the_object(recovered):
    """The automatic region (unit sphere of the normalised frame) holds the whole true object
    and is not much bigger: the ground-truth mesh, taken into the SfM frame by the camera
    alignment, lies within radius 1 and reaches beyond 0.75."""
    truth, capture, _ = recovered
    views = load_neus_scene(capture, "cameras_sphere.npz", 1.0, use_masks=False)
    with open(os.path.join(capture, "gen_cameras.json")) as f:
        names = json.load(f)["views"]
    true = np.load(os.path.join(truth, "cameras_sphere.npz"))
    c2w_world = np.stack([decompose_projection(views.world_mats[i][:3])[1] for i in range(len(names))])
    c2w_true = np.stack([decompose_projection(true[f"world_mat_{true_index(n)}"][:3])[1] for n in names])
    _, _, (s, R, t) = aligned_pose_errors(c2w_world, c2w_true)
    gt = np.asarray(trimesh.load(os.path.join(truth, "gt_mesh.ply"), process=False).vertices)  # [V, 3] true world
    sfm = (gt - t) @ R / s  # [V, 3] SfM world: R^T (x - t) / s
    normalised = (sfm - views.scale_mat[:3, 3]) / views.scale_mat[0, 0]
    radius = np.linalg.norm(normalised, axis=1).max()
    assert 0.75 < radius < 1.0, radius


def test_masks_follow_the_undistorted_photos(recovered):
    """User masks are undistorted with the photos: the undistorted mask and the undistorted
    photo's non-white pixels (the object on the white background) agree (IoU > 0.95)."""
    _, capture, _ = recovered
    views = load_neus_scene(capture, "cameras_sphere.npz", 1.0, use_masks=True)
    ious = []
    for image, mask in zip(views.images[::6], views.masks[::6]):
        rendered = image.min(axis=2) < 250  # [H, W]
        inside = mask > 0.5
        ious.append((rendered & inside).sum() / (rendered | inside).sum())
    assert min(ious) > 0.95, ious


def test_colmap_dataset_equals_gen_cameras_output(recovered):
    """Training on sparse/0 directly gives the same views as the NeuS files gen_cameras wrote."""
    _, capture, _ = recovered
    neus = load_neus_scene(capture, "cameras_sphere.npz", 1.0, use_masks=True)
    direct = load_colmap_scene(capture, os.path.join("sparse", "0"), 1.0, use_masks=True, margin=1.1)
    np.testing.assert_allclose(direct.c2w, neus.c2w, atol=1e-6)
    np.testing.assert_allclose(direct.intrinsics, neus.intrinsics, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(direct.scale_mat, neus.scale_mat, rtol=1e-6)
    np.testing.assert_array_equal(direct.masks, neus.masks)
    assert np.abs(direct.images.astype(int) - neus.images.astype(int)).max() <= 1
    dataset = ColmapDataset(ColmapDataset.Config(root_dir=capture))
    assert dataset.n_views == len(neus.names)


def test_undistorted_photos_are_cropped_so_that_img_downscale_8_divides_them(recovered):
    """The undistorter's arbitrary size (e.g. 400x299) is cropped at the right and bottom to a
    multiple of 8, with the intrinsics untouched, so img_downscale 8 loads (a 400x300 capture
    gives 50x37 at most)."""
    _, capture, _ = recovered
    full = load_neus_scene(capture, "cameras_sphere.npz", 1.0, use_masks=True)
    small = load_neus_scene(capture, "cameras_sphere.npz", 8.0, use_masks=True)
    height, width = full.images.shape[1:3]
    assert width % 8 == 0 and height % 8 == 0 and 360 <= width <= 400 and 270 <= height <= 300
    assert small.images.shape[1:3] == (height // 8, width // 8)
    model = pycolmap.Reconstruction(os.path.join(capture, "sparse", "0"))
    for camera in model.cameras.values():
        assert (camera.width, camera.height) == (width, height)
    np.testing.assert_allclose(small.intrinsics[:, :2, :2] * 8, full.intrinsics[:, :2, :2], rtol=1e-6)


def write_photos(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        cv2.imwrite(os.path.join(folder, f"photo_{i:02d}.png"), image)


def test_error_for_a_folder_without_images(tmp_path):
    os.makedirs(tmp_path / "images")
    with pytest.raises(DatasetError, match="no images"):
        run_sfm(str(tmp_path))
    with pytest.raises(DatasetError, match="images/ folder"):
        run_sfm(str(tmp_path / "missing"))


def test_error_for_a_single_image(tmp_path):
    write_photos(tmp_path / "images", [np.full((60, 80, 3), 128, np.uint8)])
    with pytest.raises(DatasetError, match="single photo.*photo_00.png"):
        run_sfm(str(tmp_path))


def test_error_for_photos_that_do_not_overlap(tmp_path):
    """Independent noise images share no verified matches: the error names every photo."""
    rng = np.random.default_rng(0)
    noise = [cv2.GaussianBlur(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8), (3, 3), 0) for _ in range(3)]
    write_photos(tmp_path / "images", noise)
    with pytest.raises(DatasetError, match=r"only \d of the 3 photos .*photo_00.png.*do not overlap") as error:
        run_sfm(str(tmp_path), SfMOptions(num_threads=1))
    assert all(f"photo_{i:02d}.png" in str(error.value) for i in range(3))


def test_colmap_dataset_refuses_a_missing_model(tmp_path):
    with pytest.raises(DatasetError, match="no COLMAP model.*imgs2poses"):
        load_colmap_scene(str(tmp_path), os.path.join("sparse", "0"), 1.0, use_masks=False, margin=1.1)
