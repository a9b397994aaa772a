"""COLMAP reconstructions: read an undistorted sparse model, choose the region of interest
(the normalisation shared with gen_cameras), and train on it directly (the `colmap` dataset).

    <root_dir>/sparse/0/                cameras, images, points3D (.bin or .txt), PINHOLE or
                                        SIMPLE_PINHOLE cameras (undistorted: imgs2poses does it)
    <root_dir>/images_undistorted/      the photos of that model (imgs2poses), else images/
    <root_dir>/masks_undistorted/       optional masks (white = object), else masks/; the mask of
                                        photo NAME is NAME, NAME.png or STEM.png
    <root_dir>/sparse_points_interest.ply   optional: points around the object of interest

The normalised frame: X_world = scale_mat @ X_normalised with scale_mat = [[r I, c], [0, 1]],
the sphere of centre c and radius r in COLMAP's world frame (see region_of_interest).
COLMAP puts the centre of the top-left pixel at (0.5, 0.5); the framework's intrinsics put
it at (0, 0), so principal points shift by -0.5 (colmap_intrinsics).
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from process_data.base import DatasetConfig, RayDataset, Views, resolve_gt_mesh
from process_data.loading import DatasetError, binary_mask, downscaled_size, find_mask, read_image
from process_data.registry import DATASETS
from utils.camera import axes_meeting_point, downscale_matrix
from utils.config import Configurable

SPARSE_MODEL = os.path.join("sparse", "0")
IMAGE_DIRS = ("images_undistorted", "images")
MASK_DIRS = ("masks_undistorted", "masks")
INTEREST_POINTS = "sparse_points_interest.ply"
PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")


def import_pycolmap():
    """pycolmap, or a DatasetError saying how to install it."""
    try:
        import pycolmap
    except ImportError:
        raise DatasetError(
            "reading COLMAP models needs pycolmap: pip install -r requirements.txt (or pip install pycolmap)"
        ) from None
    return pycolmap


@dataclass
class SparseModel:
    """A pinhole COLMAP model as arrays, views sorted by image name. intrinsics [N, 3, 3]
    (pixel centres at integers); w2c [N, 3, 4] world-to-camera [R | t] (OpenCV axes, as
    COLMAP's); points [P, 3] world frame; colors [P, 3] uint8; track_lengths [P] (how many
    views see each point)."""

    names: List[str]
    intrinsics: np.ndarray
    w2c: np.ndarray
    width: int
    height: int
    points: np.ndarray
    colors: np.ndarray
    track_lengths: np.ndarray

    @property
    def c2w(self) -> np.ndarray:
        """Camera-to-world [N, 3, 4]: [R^T | -R^T t]."""
        R_t = np.transpose(self.w2c[:, :, :3], (0, 2, 1))  # [N, 3, 3]
        centres = -np.einsum("nij,nj->ni", R_t, self.w2c[:, :, 3])  # [N, 3]
        return np.concatenate([R_t, centres[:, :, None]], axis=2)


def colmap_intrinsics(camera) -> np.ndarray:
    """K [3, 3] of a pinhole pycolmap camera, principal point moved from COLMAP's pixel
    coordinates (top-left pixel centre at (0.5, 0.5)) to the framework's (at (0, 0))."""
    K = np.array(camera.calibration_matrix(), dtype=np.float64)
    K[:2, 2] -= 0.5
    return K


def read_sparse_model(model_dir: str) -> SparseModel:
    """An undistorted COLMAP model (cameras/images/points3D .bin or .txt) -> SparseModel.
    Refuses distorted camera models and images of different sizes."""
    if not any(os.path.isfile(os.path.join(model_dir, f"cameras.{ext}")) for ext in ("bin", "txt")):
        raise DatasetError(
            f"no COLMAP model in {model_dir} (expected cameras.bin, images.bin, points3D.bin or the .txt files): "
            "run python -m process_data.imgs2poses on the scene folder first"
        )
    pycolmap = import_pycolmap()
    try:
        model = pycolmap.Reconstruction(model_dir)
    except Exception as e:
        raise DatasetError(f"cannot read the COLMAP model in {model_dir}: {e}") from None
    images = sorted((model.image(i) for i in model.reg_image_ids()), key=lambda image: image.name)
    if not images:
        raise DatasetError(f"the COLMAP model in {model_dir} has no registered images")
    intrinsics, w2c, sizes = [], [], set()
    for image in images:
        camera = model.camera(image.camera_id)
        if camera.model.name not in PINHOLE_MODELS:
            raise DatasetError(
                f"{model_dir}: camera {image.camera_id} ({image.name}) is {camera.model.name}, a distorted model; "
                "undistort first (python -m process_data.imgs2poses does it; with COLMAP: colmap image_undistorter)"
            )
        sizes.add((camera.width, camera.height))
        intrinsics.append(colmap_intrinsics(camera))
        w2c.append(np.asarray(image.cam_from_world().matrix(), dtype=np.float64))
    if len(sizes) > 1:
        raise DatasetError(f"{model_dir}: the images have {len(sizes)} different sizes {sorted(sizes)}; one size is needed")
    points = list(model.points3D.values())
    width, height = sizes.pop()
    return SparseModel(
        names=[image.name for image in images],
        intrinsics=np.stack(intrinsics),
        w2c=np.stack(w2c),
        width=width,
        height=height,
        points=np.array([p.xyz for p in points], dtype=np.float64).reshape(-1, 3),
        colors=np.array([p.color for p in points], dtype=np.uint8).reshape(-1, 3),
        track_lengths=np.array([p.track.length() for p in points], dtype=np.int64),
    )


def bounding_sphere(points: np.ndarray) -> Tuple[np.ndarray, float]:
    """NeuS's region from points of interest [P, 3]: centre c = the middle of their bounding
    box, radius = max_i |p_i - c| -> c [3], radius."""
    centre = 0.5 * (points.min(0) + points.max(0))
    return centre, float(np.linalg.norm(points - centre, axis=1).max())


def automatic_region(c2w: np.ndarray, points: np.ndarray, track_lengths: np.ndarray, margin: float) -> Tuple[np.ndarray, float]:
    """The region of interest without user input: the centre is where the optical axes meet
    (least squares, axes_meeting_point), since photos of an object keep it in the middle;
    the radius covers the sparse points seen by the most views (track length at least the
    median: the object, not the stray background points seen once or twice), with distance
    outliers dropped (beyond median + 3 * 1.4826 * MAD of the distances), times margin, and
    at most 0.9 of the nearest camera's distance (cameras must stay outside the sphere).
    c2w [N, 3, 4], points [P, 3], track_lengths [P] -> centre [3], radius"""
    centre = axes_meeting_point(c2w)
    camera_distance = np.linalg.norm(c2w[:, :, 3] - centre, axis=1)  # [N]
    if len(points) == 0:
        return centre, 0.5 * float(camera_distance.min())
    seen = points[track_lengths >= np.median(track_lengths)]  # [P', 3]
    distance = np.linalg.norm(seen - centre, axis=1)  # [P']
    median = np.median(distance)
    mad = np.median(np.abs(distance - median))
    inliers = distance[distance <= median + 3.0 * 1.4826 * mad]
    radius = margin * float(inliers.max())
    return centre, min(radius, 0.9 * float(camera_distance.min()))


def scale_matrix(centre: np.ndarray, radius: float) -> np.ndarray:
    """scale_mat [4, 4] = [[r I, c], [0, 1]]: X_world = scale_mat @ X_normalised maps the unit
    sphere onto the sphere of centre c, radius r."""
    scale_mat = np.diag([radius, radius, radius, 1.0])
    scale_mat[:3, 3] = centre
    return scale_mat


def region_of_interest(root_dir: str, model: SparseModel, margin: float) -> Tuple[np.ndarray, str]:
    """scale_mat [4, 4] of the scene and where it came from: the bounding sphere of
    root_dir/sparse_points_interest.ply when the user gave one (as NeuS does), otherwise
    automatic_region."""
    interest = os.path.join(root_dir, INTEREST_POINTS)
    if os.path.isfile(interest):
        try:
            import trimesh  # lazily: ~1 s of imports (networkx, scipy) a training start need not pay

            vertices = np.asarray(trimesh.load(interest, process=False).vertices, dtype=np.float64)
        except Exception as e:
            raise DatasetError(f"cannot read {interest}: {e}") from None
        if len(vertices) < 2:
            raise DatasetError(f"{interest} holds {len(vertices)} points; it should keep the sparse points of the object")
        centre, radius = bounding_sphere(vertices)
        source = interest
    else:
        centre, radius = automatic_region(model.c2w, model.points, model.track_lengths, margin)
        source = "automatic (optical axes' meeting point, well-seen sparse points)"
    if not radius > 0:
        raise DatasetError(f"the region of interest of {root_dir} ({source}) has radius {radius}")
    return scale_matrix(centre, radius), source


def world_projections(model: SparseModel) -> np.ndarray:
    """world_mat [N, 4, 4] = K [R | t] of every view (world frame), the NeuS camera format."""
    world_mats = np.tile(np.eye(4), (len(model.names), 1, 1))
    world_mats[:, :3, :4] = model.intrinsics @ model.w2c
    return world_mats


def normalised_poses(c2w: np.ndarray, scale_mat: np.ndarray) -> np.ndarray:
    """Camera-to-world in the normalised frame: same rotation (scale_mat has none), centre
    (c - centre) / radius. c2w [N, 3, 4] world frame -> [N, 3, 4]"""
    radius, centre = scale_mat[0, 0], scale_mat[:3, 3]
    out = c2w.copy()
    out[:, :, 3] = (c2w[:, :, 3] - centre) / radius
    return out


def first_folder(root_dir: str, candidates) -> Optional[str]:
    return next((os.path.join(root_dir, d) for d in candidates if os.path.isdir(os.path.join(root_dir, d))), None)


def mask_path(mask_dir: str, name: str) -> str:
    """The mask of photo `name`: mask_dir/NAME, NAME.png (COLMAP's habit), or a name that
    differs only in extension or zero-padding (STEM.png, STEM.jpg, 1.png for 0001.jpg...)."""
    return find_mask(mask_dir, name)


def load_colmap_scene(root_dir: str, sparse_dir: str, img_downscale: float, use_masks: bool, margin: float) -> Views:
    """A COLMAP scene (see the module docstring) as Views in the normalised frame."""
    if not os.path.isdir(root_dir):
        raise DatasetError(f"dataset.root_dir {root_dir} does not exist")
    model = read_sparse_model(os.path.join(root_dir, sparse_dir))
    image_dir = first_folder(root_dir, IMAGE_DIRS)
    if image_dir is None:
        raise DatasetError(f"no {' or '.join(IMAGE_DIRS)} folder in {root_dir}")
    scale_mat, _ = region_of_interest(root_dir, model, margin)
    width, height = downscaled_size(model.width, model.height, img_downscale)
    rescale = downscale_matrix(model.width / width)
    full_size = (model.width, model.height)
    images = []
    for name in tqdm(model.names, desc=f"loading {os.path.basename(os.path.normpath(root_dir))}", leave=False):
        path = os.path.join(image_dir, name)
        if not os.path.isfile(path):
            raise DatasetError(f"{path} not found: the COLMAP model in {sparse_dir} registers photo {name}")
        images.append(read_image(path, full_size, (width, height), first_path=f"the COLMAP camera of {name}"))
    masks = None
    mask_dir = first_folder(root_dir, MASK_DIRS)
    if use_masks and mask_dir is not None:
        masks = np.stack([
            binary_mask(read_image(mask_path(mask_dir, n), full_size, (width, height), grayscale=True,
                                   first_path=os.path.join(image_dir, n)))
            for n in model.names
        ])
    world_mats = world_projections(model)
    world_mats[:, :3, :4] = rescale @ world_mats[:, :3, :4]
    return Views(
        images=np.stack(images),
        masks=masks,
        intrinsics=rescale @ model.intrinsics,
        c2w=normalised_poses(model.c2w, scale_mat),
        scale_mat=scale_mat,
        world_mats=world_mats,
        names=model.names,
    )


@DATASETS.register("colmap")
class ColmapDataset(Configurable, RayDataset):
    @dataclass
    class Config(DatasetConfig):
        name: str = "colmap"
        root_dir: str = "./inputs/my_capture"
        sparse_dir: str = SPARSE_MODEL  # relative to root_dir: an undistorted (pinhole) model
        img_downscale: float = 1.0
        region_margin: float = 1.1  # automatic region: radius of the well-seen sparse points times this
        use_masks: bool = True  # load masks_undistorted/ (or masks/) when present
        apply_mask: bool = False  # true: train on the masked object (needs masks)
        holdout_every: int = 8  # views 0, K, 2K... are held out for testing; 0: none

    def __init__(self, config: "ColmapDataset.Config", device="cpu"):
        views = load_colmap_scene(config.root_dir, config.sparse_dir, config.img_downscale, config.use_masks, config.region_margin)
        if config.apply_mask and views.masks is None:
            raise DatasetError(f"dataset.apply_mask is true but {config.root_dir} has no {' or '.join(MASK_DIRS)} folder")
        super().__init__(views, config.holdout_every, config.apply_mask, config.background_color, device)
        self.config = config
        self.gt_mesh = resolve_gt_mesh(config)
