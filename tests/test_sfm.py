"""Structure from motion on photos (imgs2poses), the NeuS format made from it (gen_cameras) and
the `colmap` dataset: the demo scene, rendered with fine texture into a folder of plain photos,
must give back its true cameras with either matcher; masks must keep the SIFT features on the
object; bad folders must give clear errors."""
import json
import os
import shutil
import time

import cv2
import numpy as np
import pytest
import trimesh
from PIL import Image

pycolmap = pytest.importorskip("pycolmap", reason="pycolmap is not installed (pip install -r requirements.txt)")

from process_data.colmap import ColmapDataset, load_colmap_scene, read_sparse_model  # noqa: E402
from process_data.dtu import load_neus_scene  # noqa: E402
from process_data.loading import DatasetError, decompose_projection  # noqa: E402
from process_data.gen_cameras import gen_cameras  # noqa: E402
from process_data.imgs2poses import SfMOptions, extract_features, run_sfm  # noqa: E402
from process_data.photos import exif_orientation, upright_photos, write_feature_masks  # noqa: E402
from process_data.synthetic import camera_poses, make_demo_scene  # noqa: E402
from utils.camera import aligned_pose_errors  # noqa: E402

N_VIEWS = 48


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """The demo scene: 48 views, 400x300, fine spots (rendered once for the module)."""
    return make_demo_scene(str(tmp_path_factory.mktemp("truth")), n_views=N_VIEWS, width=400, height=300, detail=0.9)


def make_capture(truth: str, capture: str, order) -> None:
    """A capture folder of the truth's views taken in `order`: capture/images/KK_VV.png
    (K: the place in the order, V: the true view) and the object masks as capture/masks/KK_VV.png."""
    os.makedirs(os.path.join(capture, "images"))
    os.makedirs(os.path.join(capture, "masks"))
    views = sorted(os.listdir(os.path.join(truth, "image")))
    for k, i in enumerate(order):
        name = f"{k:02d}_{i:02d}.png"
        shutil.copy(os.path.join(truth, "image", views[i]), os.path.join(capture, "images", name))
        shutil.copy(os.path.join(truth, "mask", f"{i:03d}.png"), os.path.join(capture, "masks", name))


def true_index(name: str) -> int:
    """The true view of photo KK_VV.png (make_capture)."""
    return int(os.path.splitext(name)[0].split("_")[1])


def aligned_to_truth(truth: str, names, c2w: np.ndarray):
    """aligned_pose_errors of the cameras c2w [N, 3, 4] of photos `names` against the truth:
    rotation errors [N] degrees, centre errors [N] (fractions of the camera distance), (s, R, t)."""
    true = np.load(os.path.join(truth, "cameras_sphere.npz"))
    c2w_true = np.stack([decompose_projection(true[f"world_mat_{true_index(n)}"][:3])[1] for n in names])
    return aligned_pose_errors(c2w, c2w_true)


def report(label: str, n_registered: int, seconds: float, rotation: np.ndarray, centre: np.ndarray) -> None:
    print(
        f"\n{label}: {n_registered}/{N_VIEWS} views registered in {seconds:.1f} s; rotation error "
        f"max {rotation.max():.3f} mean {rotation.mean():.3f} deg; centre error max {100 * centre.max():.3f}% "
        f"mean {100 * centre.mean():.3f}% of the camera distance"
    )


@pytest.fixture(scope="module")
def recovered(truth, tmp_path_factory):
    """The demo views as photos + masks in a capture folder (in the order rendered), run
    through imgs2poses (exhaustive matching) and gen_cameras -> (truth dir, capture dir, seconds of SfM)."""
    capture = str(tmp_path_factory.mktemp("sfm") / "capture")
    make_capture(truth, capture, range(N_VIEWS))
    start = time.time()
    run_sfm(capture, SfMOptions(num_threads=1))
    gen_cameras(capture)
    return truth, capture, time.time() - start


def test_recovers_the_true_cameras(recovered):
    """>= 90% of the views register; after a similarity alignment every registered view is
    within 1 degree and 1% of the camera distance of the truth."""
    truth, capture, seconds = recovered
    with open(os.path.join(capture, "gen_cameras.json")) as f:
        names = json.load(f)["views"]
    ours = np.load(os.path.join(capture, "cameras_sphere.npz"))
    c2w = np.stack([decompose_projection(ours[f"world_mat_{i}"][:3])[1] for i in range(len(names))])
    rotation, centre, _ = aligned_to_truth(truth, names, c2w)
    report("SfM on the demo scene", len(names), seconds, rotation, centre)
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
    c2w_world = np.stack([decompose_projection(views.world_mats[i][:3])[1] for i in range(len(names))])
    _, _, (s, R, t) = aligned_to_truth(truth, names, c2w_world)
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


def keypoints(database_path: str):
    """{photo name: its SIFT keypoints' (x, y) [K, 2]} in a COLMAP database (COLMAP's pixel
    coordinates: the top-left pixel spans [0, 1)^2, so pixel (row, col) = (int(y), int(x)))."""
    database = pycolmap.Database.open(database_path)
    try:
        return {image.name: database.read_keypoints(image.image_id)[:, :2] for image in database.read_all_images()}
    finally:
        database.close()


def on_mask(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[K] bool: the keypoints (x, y) [K, 2] that lie on a white (> 127) pixel of mask [H, W]."""
    return mask[points[:, 1].astype(int), points[:, 0].astype(int)] > 127


def test_features_lie_on_the_masks(recovered):
    """With DIR/masks/ present, imgs2poses extracts SIFT features on the object only: every
    keypoint of every photo lies on a white pixel of its mask."""
    _, capture, _ = recovered
    found = keypoints(os.path.join(capture, "colmap", "database.db"))
    masks = {name: cv2.imread(os.path.join(capture, "masks", name), cv2.IMREAD_GRAYSCALE) for name in found}
    inside = {name: on_mask(points, masks[name]).mean() for name, points in found.items()}
    counts = [len(points) for points in found.values()]
    print(f"\nfeatures of the {len(found)} masked photos: {min(counts)}-{max(counts)} keypoints each, "
          f"shares on the masks {min(inside.values()):.3f}-{max(inside.values()):.3f}")
    assert len(found) == N_VIEWS and min(counts) > 100
    assert all(share == 1.0 for share in inside.values()), {n: share for n, share in inside.items() if share < 1}


def walk_order(n_views: int):
    """The demo views in the order of a video taken walking around the object. They are
    rendered on a golden-angle spiral (consecutive views 137.5 degrees apart in azimuth);
    the walk starts at view 0 and always steps to the nearest view not yet taken (steps of
    about 22 degrees; two steps near the end jump 85 degrees to fill the gaps left). Circling
    rings of elevation in turn instead drifts a little more (1.1-1.2% centre error here): no
    loop closure joins the rings."""
    centres = camera_poses(n_views)[:, :, 3]  # [N, 3]
    order, left = [0], set(range(1, n_views))
    while left:
        nearest = min(left, key=lambda j: np.linalg.norm(centres[j] - centres[order[-1]]))
        order.append(nearest)
        left.remove(nearest)
    return order


def test_sequential_matcher_recovers_the_true_cameras(truth, tmp_path):
    """The demo views as video frames (walk_order), each matched with its neighbours in name
    order only (--matcher sequential, far fewer pairs than exhaustive): every view registers,
    within 1 degree and 1% of the camera distance of the truth, like exhaustive matching."""
    capture = str(tmp_path / "capture")
    make_capture(truth, capture, walk_order(N_VIEWS))
    start = time.time()
    run_sfm(capture, SfMOptions(matcher="sequential", num_threads=1))
    seconds = time.time() - start
    model = read_sparse_model(os.path.join(capture, "sparse", "0"))
    rotation, centre, _ = aligned_to_truth(truth, model.names, model.c2w)
    report("Sequential matching on the demo scene walked around", len(model.names), seconds, rotation, centre)
    database = pycolmap.Database.open(os.path.join(capture, "colmap", "database.db"))
    n_pairs = database.num_matched_image_pairs()
    database.close()
    print(f"{n_pairs} pairs matched (exhaustive: {N_VIEWS * (N_VIEWS - 1) // 2})")
    assert n_pairs < N_VIEWS * (N_VIEWS - 1) / 4, f"{n_pairs} pairs matched: not sequential"
    assert len(model.names) == N_VIEWS
    assert rotation.max() < 1.0
    assert centre.max() < 0.01


def write_photos(folder, images, ext=".png"):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        cv2.imwrite(os.path.join(folder, f"photo_{i:02d}{ext}"), image)


def noise_photos(n: int, width: int = 200, height: int = 150):
    """n independent blurred-noise photos [height, width, 3]: SIFT finds features all over them."""
    rng = np.random.default_rng(0)
    return [cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (3, 3), 0) for _ in range(n)]


def left_half_masks(folder, n: int, width: int = 200, height: int = 150) -> None:
    """Masks photo_KK.png, black on the left half (x < width / 2), white on the right."""
    os.makedirs(folder)
    mask = np.full((height, width), 255, np.uint8)
    mask[:, : width // 2] = 0
    for i in range(n):
        cv2.imwrite(os.path.join(folder, f"photo_{i:02d}.png"), mask)


def test_masks_keep_the_features_off_the_masked_out_region(tmp_path):
    """Masks black on the left half of .jpg photos (named STEM.png): with them no keypoint lies
    there, without them many do."""
    write_photos(tmp_path / "images", noise_photos(3), ext=".jpg")
    left_half_masks(tmp_path / "masks", 3)
    names = sorted(os.listdir(tmp_path / "images"))
    write_feature_masks(str(tmp_path / "masks"), str(tmp_path / "images"), names, str(tmp_path / "colmap_masks"))
    assert sorted(os.listdir(tmp_path / "colmap_masks")) == [n + ".png" for n in names]  # COLMAP's naming
    options = SfMOptions(num_threads=1)
    extract_features(str(tmp_path / "masked.db"), str(tmp_path / "images"), names, options, str(tmp_path / "colmap_masks"))
    extract_features(str(tmp_path / "plain.db"), str(tmp_path / "images"), names, options)
    masked, plain = keypoints(str(tmp_path / "masked.db")), keypoints(str(tmp_path / "plain.db"))
    left = {n: (int((masked[n][:, 0] < 100).sum()), int((plain[n][:, 0] < 100).sum())) for n in names}
    print(f"\nkeypoints (masked, unmasked): all {[(len(masked[n]), len(plain[n])) for n in names]}, "
          f"on the left half {list(left.values())}")
    assert all(masked_left == 0 and plain_left > 50 for masked_left, plain_left in left.values()), left
    assert all(len(masked[n]) > 50 for n in names)


def test_no_feature_masks_extracts_on_the_whole_photos(tmp_path):
    """feature_masks=False (--no_feature_masks) ignores DIR/masks/ at extraction; with masks,
    the registration error suggests it. (The noise photos never register: only the features
    in the database are checked.)"""
    write_photos(tmp_path / "images", noise_photos(3))
    left_half_masks(tmp_path / "masks", 3)
    database_path = str(tmp_path / "colmap" / "database.db")
    with pytest.raises(DatasetError, match="--no_feature_masks"):
        run_sfm(str(tmp_path), SfMOptions(num_threads=1))
    assert all((points[:, 0] >= 100).all() for points in keypoints(database_path).values())
    with pytest.raises(DatasetError, match="do not overlap") as error:
        run_sfm(str(tmp_path), SfMOptions(num_threads=1, feature_masks=False))
    assert "--no_feature_masks" not in str(error.value)
    assert all((points[:, 0] < 100).any() for points in keypoints(database_path).values())


def write_with_orientation(path, image: np.ndarray, orientation: int) -> None:
    """A JPEG of `image` (BGR, stored as is) whose EXIF says how to turn it for viewing."""
    photo = Image.fromarray(image[:, :, ::-1])
    exif = photo.getexif()
    exif[0x0112] = orientation
    photo.save(path, exif=exif.tobytes(), quality=95)


def test_photos_with_an_exif_rotation_are_reconstructed_upright(tmp_path):
    """A phone's portrait photos are stored sideways with EXIF orientation 6 (turn 90 degrees
    clockwise to view). COLMAP ignores the tag, so imgs2poses gives it upright copies: COLMAP's
    camera is then portrait (150x200), as the photos look and as the user's masks are drawn."""
    image_dir = tmp_path / "images"
    os.makedirs(image_dir)
    stored = noise_photos(3)  # [150, 200, 3]: landscape as stored
    for i, image in enumerate(stored):
        write_with_orientation(image_dir / f"photo_{i:02d}.jpg", image, 6)
    names = sorted(os.listdir(image_dir))
    upright_dir = upright_photos(str(image_dir), names, str(tmp_path / "colmap"))
    assert upright_dir == str(tmp_path / "colmap" / "images_upright")
    for name in names:
        sideways = cv2.imread(str(image_dir / name), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        upright = cv2.imread(os.path.join(upright_dir, name), cv2.IMREAD_UNCHANGED)  # the pixels as stored
        assert sideways.shape == (150, 200, 3) and upright.shape == (200, 150, 3)
        assert np.abs(upright.astype(int) - np.rot90(sideways, k=-1).astype(int)).mean() < 1  # re-encoded at q100
        assert exif_orientation(os.path.join(upright_dir, name)) == 1
    extract_features(str(tmp_path / "upright.db"), upright_dir, names, SfMOptions(num_threads=1))
    database = pycolmap.Database.open(str(tmp_path / "upright.db"))
    try:
        assert [(c.width, c.height) for c in database.read_all_cameras()] == [(150, 200)]
    finally:
        database.close()
    plain_dir = tmp_path / "plain"
    write_photos(plain_dir, stored, ext=".jpg")
    assert upright_photos(str(plain_dir), sorted(os.listdir(plain_dir)), str(tmp_path / "unused")) == str(plain_dir)
    assert not os.path.exists(tmp_path / "unused")


def test_error_for_photos_of_different_sizes(tmp_path):
    """One portrait photo among landscape ones (after turning upright) cannot share their camera."""
    write_photos(tmp_path / "images", noise_photos(3), ext=".jpg")
    write_with_orientation(tmp_path / "images" / "photo_01.jpg", noise_photos(1)[0], 6)
    with pytest.raises(DatasetError, match=r"different sizes in \S*images: photo_00.jpg is 200x150, photo_01.jpg is "
                                           r"150x200 \(as shown, after any EXIF rotation\)"):
        run_sfm(str(tmp_path), SfMOptions(num_threads=1))
    assert not os.path.exists(tmp_path / "colmap" / "images_upright")


def test_error_for_a_corrupt_photo(tmp_path):
    write_photos(tmp_path / "images", noise_photos(2), ext=".jpg")
    (tmp_path / "images" / "photo_02.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cannot read the photo \S*photo_02.jpg .*corrupt or not an image"):
        run_sfm(str(tmp_path), SfMOptions(num_threads=1))


@pytest.mark.parametrize("mask,message", [
    pytest.param(np.full((100, 200), 255, np.uint8), r"mask \S*photo_01.png is unreadable or not 200x150 like photo photo_01",
                 id="wrong size"),
    pytest.param(np.zeros((150, 200), np.uint8), r"mask \S*photo_01.png is all black .* photo photo_01.png would get no",
                 id="all black"),
])
def test_error_for_a_bad_mask(tmp_path, mask, message):
    """A mask that cannot restrict the features of its photo stops imgs2poses before
    extraction, naming the file."""
    write_photos(tmp_path / "images", noise_photos(3))
    left_half_masks(tmp_path / "masks", 3)
    cv2.imwrite(str(tmp_path / "masks" / "photo_01.png"), mask)
    with pytest.raises(DatasetError, match=message):
        run_sfm(str(tmp_path), SfMOptions(num_threads=1))
    assert not os.path.exists(tmp_path / "colmap" / "database.db")


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
    write_photos(tmp_path / "images", noise_photos(3))
    with pytest.raises(DatasetError, match=r"only \d of the 3 photos .*photo_00.png.*do not overlap") as error:
        run_sfm(str(tmp_path), SfMOptions(num_threads=1))
    assert all(f"photo_{i:02d}.png" in str(error.value) for i in range(3))


def test_colmap_dataset_refuses_a_missing_model(tmp_path):
    with pytest.raises(DatasetError, match="no COLMAP model.*imgs2poses"):
        load_colmap_scene(str(tmp_path), os.path.join("sparse", "0"), 1.0, use_masks=False, margin=1.1)


@pytest.mark.parametrize("held, moved, kept", [
    (0.4389, 0.4370, "moved"),  # scan 24's photos (800x600): its principal point is 12 and 10 px off centre
    (0.2281, 0.2281, "held"),  # the demo's orbit: the point drifted 10 px at no cost, rotations 1.4 deg off
    (0.4649, 0.4644, "held"),  # the demo's 400x300 JPEGs: 0.11%, below the 0.25% a moved point must gain
])
def test_a_moved_principal_point_is_kept_only_where_it_fits_better(held, moved, kept, monkeypatch):
    from process_data import imgs2poses

    class Model:
        def __init__(self, other=None):
            self.cameras, self.name = {}, "held" if other is not None else "moved"

        def compute_mean_reprojection_error(self):
            return self.error

    def adjust(model, options):
        model.error = moved if options.refine_principal_point else held

    monkeypatch.setattr(pycolmap, "Reconstruction", Model)
    monkeypatch.setattr(pycolmap, "bundle_adjustment", adjust)
    assert imgs2poses.refine_principal_point(Model()).name == kept


def test_cli_fixed_principal_point(tmp_path, monkeypatch):
    """On by default; --fixed_principal_point keeps COLMAP's centred principal point."""
    from process_data import imgs2poses

    given = []
    monkeypatch.setattr(imgs2poses, "run_sfm", lambda scene, options: given.append(options.refine_principal_point))
    assert imgs2poses.main([str(tmp_path)]) == 0 and imgs2poses.main([str(tmp_path), "--fixed_principal_point"]) == 0
    assert given == [True, False]
