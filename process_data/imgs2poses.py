"""Camera poses for a folder of photos: structure from motion with pycolmap (COLMAP as a
PyPI wheel, no system COLMAP needed), then undistortion to a pinhole camera.

Reads DIR/images/*.jpg|jpeg|png (your photos, left untouched) and DIR/masks/ when present; the
photos and masks are made ready for COLMAP by process_data/photos.py, which says what it
accepts and writes. Writes

    DIR/colmap/database.db      SIFT features and geometrically verified matches
    DIR/colmap/images_upright/, DIR/colmap/masks/, DIR/colmap/masks_from_alpha/
                                the photos turned upright and the feature masks, when needed
                                (process_data/photos.py)
    DIR/colmap/sparse/0/        the model as mapped: one shared camera with lens distortion
    DIR/sparse/0/, DIR/images_undistorted/, DIR/masks_undistorted/
                                the UNDISTORTED model (one PINHOLE camera), the registered photos
                                and their masks undistorted to it (process_data/undistort.py)

DIR/colmap/ is rebuilt on every run. Masks (white = object) keep the SIFT features on the object;
--no_feature_masks extracts on the whole photos (when the background's texture is needed to
register them).

Stages: SIFT extraction -> matching (exhaustive: every pair; sequential: each photo with its
neighbours in name order, for video frames) -> incremental mapping -> undistortion. All photos
share one camera (one lens and zoom, as in a normal capture): one calibration from all
photos, and one image size after undistortion, which the NeuS format needs.

Next step: python -m process_data.gen_cameras DIR (NeuS format), or train on DIR directly
with the `colmap` dataset.

Progress: a bar for extraction and mapping; COLMAP's own log lines for matching (its blocks
or images); --verbose shows all of COLMAP's log.

CLI: python -m process_data.imgs2poses DIR [--matcher exhaustive|sequential] [--camera_model SIMPLE_RADIAL]
     [--min_registered N] [--max_image_size PX] [--num_threads N] [--seed 0] [--no_feature_masks]
     [--fixed_principal_point] [--verbose]
"""
import argparse
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from tqdm import tqdm

from process_data.colmap import SPARSE_MODEL, import_pycolmap
from process_data.loading import DatasetError
from process_data.photos import check_one_size, object_masks, photo_names, upright_photos
from process_data.undistort import UNDISTORTED_IMAGES, undistort, undistort_masks

pycolmap = import_pycolmap()

log = logging.getLogger("imgs2poses")


MATCHERS = ("exhaustive", "sequential")
EXTRACTION_CHUNK = 8  # photos per extraction call: the progress bar's step
COLMAP_INFO, COLMAP_WARNING = 0, 1  # glog levels of COLMAP's log


@dataclass
class SfMOptions:
    matcher: str = "exhaustive"  # exhaustive | sequential (photos taken in order, e.g. video frames)
    camera_model: str = "SIMPLE_RADIAL"  # COLMAP camera model of the lens (OPENCV for strong distortion)
    min_registered: int = 0  # fewer registered photos is an error; 0: 80% of the photos (at least 2)
    max_image_size: int = 3200  # SIFT runs on photos downscaled to this many pixels on the long side
    peak_threshold: float = 0.02 / 3  # SIFT contrast threshold (COLMAP's); lower finds more features on weak texture
    domain_size_pooling: bool = False  # DSP-SIFT descriptors: better matches across wide baselines, slower
    num_threads: int = -1  # -1: all cores
    sequential_overlap: int = 10  # sequential matcher: photo i with i+1, i+2, i+4, ... i+2^(overlap-1) (quadratic overlap)
    seed: int = 0
    feature_masks: bool = True  # DIR/masks/, when present, keeps the SIFT features on the object
    # a last bundle adjustment may move the principal point off the photo's centre (COLMAP holds
    # it there), kept where it fits the photos better (refine_principal_point below). DTU's photos
    # have it 12 and 10 px away at 800x600: held at the centre, the photos-only scan 24 mesh lost
    # the back roofs to a surface that fit only the low views (silhouette IoU 0.916; moved, 0.9915)
    refine_principal_point: bool = True
    verbose: bool = False  # all of COLMAP's log lines


def required_registrations(n_photos: int, min_registered: int) -> int:
    """The fewest registered photos accepted: min_registered, or ceil(0.8 n) (at least 2) when 0."""
    return min_registered if min_registered > 0 else max(2, math.ceil(0.8 * n_photos))


def verified_partners(database_path: str, min_inliers: int) -> Dict[str, int]:
    """For every photo in the database, how many other photos it shares >= min_inliers
    geometrically verified matches with."""
    database = pycolmap.Database.open(database_path)
    try:
        names = {image.image_id: image.name for image in database.read_all_images()}
        partners = dict.fromkeys(names.values(), 0)
        pair_ids, geometries = database.read_two_view_geometries()
        for pair_id, geometry in zip(pair_ids, geometries):
            if len(geometry.inlier_matches) >= min_inliers:
                for image_id in pycolmap.pair_id_to_image_pair(pair_id):
                    partners[names[image_id]] += 1
    finally:
        database.close()
    return partners


def extract_features(
    database_path: str, image_dir: str, names: List[str], options: SfMOptions, feature_mask_dir: Optional[str] = None
) -> None:
    """SIFT features of all photos into the database, in chunks (for the progress bar); the
    first chunk creates the one shared camera, the others join it. feature_mask_dir: masks in
    COLMAP's naming (photos.write_feature_masks); no features where they are 0."""
    sift = pycolmap.SiftExtractionOptions(
        peak_threshold=options.peak_threshold, domain_size_pooling=options.domain_size_pooling
    )
    extraction = pycolmap.FeatureExtractionOptions(
        num_threads=options.num_threads, max_image_size=options.max_image_size, sift=sift
    )
    with tqdm(total=len(names), desc="SIFT features", unit="photo") as bar:
        for start in range(0, len(names), EXTRACTION_CHUNK):
            reader = pycolmap.ImageReaderOptions(camera_model=options.camera_model)
            if start > 0:
                reader.existing_camera_id = 1
            if feature_mask_dir is not None:
                reader.mask_path = feature_mask_dir
            chunk = names[start : start + EXTRACTION_CHUNK]
            pycolmap.extract_features(
                database_path, image_dir, image_names=chunk, camera_mode=pycolmap.CameraMode.SINGLE,
                reader_options=reader, extraction_options=extraction,
            )
            bar.update(len(chunk))


def match_features(database_path: str, options: SfMOptions) -> None:
    matching = pycolmap.FeatureMatchingOptions(num_threads=options.num_threads)
    if options.matcher == "exhaustive":
        pycolmap.match_exhaustive(database_path, matching_options=matching)
    else:
        pairing = pycolmap.SequentialPairingOptions(overlap=options.sequential_overlap, num_threads=options.num_threads)
        pycolmap.match_sequential(database_path, matching_options=matching, pairing_options=pairing)


PRINCIPAL_POINT_MIN_GAIN = 0.0025  # relative drop of the reprojection error that a moved principal point must bring


def refine_principal_point(model):
    """A last global bundle adjustment that also moves each camera's principal point (the mapper
    holds it at the photo's centre) -> the model to keep.

    The principal point trades off against the cameras' rotations, and where the views do not
    separate the two (an orbit at one height, a distant object) it drifts at little cost. So the
    refined model is kept only when its mean reprojection error is at least
    PRINCIPAL_POINT_MIN_GAIN (0.25%) below that of the same adjustment with the point held.
    Measured: scan 24's photos at 800x600 (true offset 12 and 10 px) 0.43%, kept, within 1 and 4
    px of the truth; the demo's PNGs 0.000% and its 400x300 JPEGs 0.11% (757 points), both held,
    where the point had drifted 10 and 17 px from the true centre. A threshold set on these two
    scenes: `--fixed_principal_point` holds it whatever the gain."""
    held = pycolmap.Reconstruction(model)
    pycolmap.bundle_adjustment(held, pycolmap.BundleAdjustmentOptions(refine_principal_point=False))
    pycolmap.bundle_adjustment(model, pycolmap.BundleAdjustmentOptions(refine_principal_point=True))
    error_held, error_moved = held.compute_mean_reprojection_error(), model.compute_mean_reprojection_error()
    keep = error_moved < (1.0 - PRINCIPAL_POINT_MIN_GAIN) * error_held
    for cam_id, cam in model.cameras.items():
        log.info("principal point of camera %d: %s at %.1f, %.1f px (centre %.1f, %.1f); reprojection error %.4f px "
                 "moved, %.4f held", cam_id, "moved" if keep else "held at the centre, not", cam.principal_point_x,
                 cam.principal_point_y, cam.width / 2, cam.height / 2, error_moved, error_held)
    return model if keep else held


def map_photos(database_path: str, image_dir: str, model_dir: str, n_photos: int, options: SfMOptions):
    """Incremental mapping -> the model with the most registered photos (None if none formed)."""
    mapping = pycolmap.IncrementalPipelineOptions(num_threads=options.num_threads, random_seed=options.seed)
    with tqdm(total=n_photos, desc="mapping", unit="photo") as bar:
        models = pycolmap.incremental_mapping(
            database_path, image_dir, model_dir, options=mapping, next_image_callback=lambda: bar.update(1)
        )
    if not models:
        return None
    if len(models) > 1:
        sizes = sorted((m.num_reg_images() for m in models.values()), reverse=True)
        log.warning("the photos fell into %d separate models (%s photos); keeping the largest", len(models), sizes)
    return max(models.values(), key=lambda m: m.num_reg_images())


def check_registration(model, names: List[str], database_path: str, image_dir: str, required: int, masked: bool) -> None:
    """Refuse a model with fewer than `required` registered photos, naming those that failed
    (masked: the features were kept on the object by masks, which the advice mentions)."""
    registered = {model.image(i).name for i in model.reg_image_ids()} if model is not None else set()
    failed = [n for n in names if n not in registered]
    if len(registered) >= required:
        if failed:
            log.warning("%d of %d photos did not register and are left out: %s", len(failed), len(names), ", ".join(failed))
        return
    partners = verified_partners(database_path, pycolmap.TwoViewGeometryOptions().min_num_inliers)
    isolated = [n for n in names if partners.get(n, 0) == 0]
    why = (
        f"{len(isolated)} of them share no verified matches with any other photo ({', '.join(isolated)}): "
        "the photos do not overlap, or show too little texture"
        if isolated
        else "the photos match in pairs but do not chain into one model: add photos between the views"
    )
    raise DatasetError(
        f"only {len(registered)} of the {len(names)} photos in {image_dir} registered (at least {required} needed; "
        f"--min_registered sets it). Not registered: {', '.join(failed)}. {why}. Take overlapping photos "
        "(neighbours share most of the view) of a textured object, with the object in the middle"
        + ("; or try --no_feature_masks (your masks keep the features on the object; the background may help)" if masked else "")
    )


def run_sfm(scene_dir: str, options: SfMOptions = SfMOptions()):
    """All stages on scene_dir/images (see the module docstring) -> the undistorted model."""
    if options.matcher not in MATCHERS:
        raise DatasetError(f"matcher must be one of {', '.join(MATCHERS)}, got '{options.matcher}'")
    image_dir = os.path.join(scene_dir, "images")
    names = photo_names(image_dir)
    required = required_registrations(len(names), options.min_registered)
    work_dir = os.path.join(scene_dir, "colmap")
    # a fresh database: re-running must not add a second copy of every photo's features
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(os.path.join(work_dir, "sparse"))
    check_one_size(image_dir, names)
    image_dir = upright_photos(image_dir, names, work_dir)
    database_path = os.path.join(work_dir, "database.db")
    pycolmap.set_random_seed(options.seed)
    quiet = COLMAP_INFO if options.verbose else COLMAP_WARNING
    pycolmap.logging.minloglevel = quiet

    start = time.time()
    mask_dir, feature_mask_dir = object_masks(scene_dir, image_dir, names, work_dir, options.feature_masks)
    log.info("[1/4] SIFT features of %d photos in %s%s", len(names), image_dir,
             f", only where the masks in {mask_dir} are white (--no_feature_masks: everywhere)" if feature_mask_dir else "")
    extract_features(database_path, image_dir, names, options, feature_mask_dir)
    log.info("[2/4] %s matching (%.1f s so far); COLMAP's progress follows", options.matcher, time.time() - start)
    pycolmap.logging.minloglevel = COLMAP_INFO
    match_features(database_path, options)
    pycolmap.logging.minloglevel = quiet
    log.info("[3/4] incremental mapping (%.1f s so far)", time.time() - start)
    model = map_photos(database_path, image_dir, os.path.join(work_dir, "sparse"), len(names), options)
    check_registration(model, names, database_path, image_dir, required, masked=feature_mask_dir is not None)
    if options.refine_principal_point:
        model = refine_principal_point(model)
    model_dir = os.path.join(work_dir, "sparse", "0")
    model.write(model_dir)  # the largest model, whichever number the mapper gave it
    log.info(
        "registered %d/%d photos, %d sparse points, mean reprojection error %.2f px",
        model.num_reg_images(), len(names), model.num_points3D(), model.compute_mean_reprojection_error(),
    )
    log.info("[4/4] undistorting to a pinhole camera (%.1f s so far)", time.time() - start)
    undistort(model_dir, image_dir, scene_dir, options.num_threads)
    if os.path.isdir(mask_dir):
        undistort_masks(mask_dir, model, scene_dir)
    log.info("done in %.1f s: %s and %s", time.time() - start,
             os.path.join(scene_dir, SPARSE_MODEL), os.path.join(scene_dir, UNDISTORTED_IMAGES))
    return pycolmap.Reconstruction(os.path.join(scene_dir, SPARSE_MODEL))


def main(argv=None) -> int:
    defaults = SfMOptions()
    parser = argparse.ArgumentParser(description="Camera poses of DIR/images/* by structure from motion (pycolmap).")
    parser.add_argument("scene_dir", metavar="DIR", help="scene folder; the photos are in DIR/images/")
    parser.add_argument("--matcher", choices=MATCHERS, default=defaults.matcher,
                        help="exhaustive: every pair (up to a few hundred photos); sequential: neighbours in name order")
    parser.add_argument("--camera_model", default=defaults.camera_model,
                        help="COLMAP camera model: SIMPLE_RADIAL (default), RADIAL, OPENCV (wide-angle), PINHOLE")
    parser.add_argument("--min_registered", type=int, default=defaults.min_registered,
                        help="fewest registered photos accepted (default: 80%% of them)")
    parser.add_argument("--max_image_size", type=int, default=defaults.max_image_size)
    parser.add_argument("--peak_threshold", type=float, default=defaults.peak_threshold,
                        help="SIFT contrast threshold; lower it (e.g. 0.002) for weakly textured objects")
    parser.add_argument("--domain_size_pooling", action="store_true",
                        help="DSP-SIFT descriptors: more matches between distant views, slower")
    parser.add_argument("--num_threads", type=int, default=defaults.num_threads)
    parser.add_argument("--sequential_overlap", type=int, default=defaults.sequential_overlap)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no_feature_masks", dest="feature_masks", action="store_false",
                        help="extract SIFT features on the whole photos even when DIR/masks/ is present")
    parser.add_argument("--fixed_principal_point", dest="refine_principal_point", action="store_false",
                        help="keep the principal point at the photos' centre (COLMAP's default; for few or "
                             "nearly parallel views, where refining it is ill-posed)")
    parser.add_argument("--verbose", action="store_true", help="show all of COLMAP's log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    options = SfMOptions(**{k: v for k, v in vars(args).items() if k != "scene_dir"})
    try:
        run_sfm(args.scene_dir, options)
    except DatasetError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
