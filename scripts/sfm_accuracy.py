"""How well imgs2poses + gen_cameras recover known cameras: a NeuS-format scene with true
cameras (DTU, the demo scene) is taken as a folder of plain photos (optionally downscaled),
run through structure from motion, and its cameras compared with the true ones after a
similarity alignment of the camera centres (utils.camera.aligned_pose_errors).

    python scripts/sfm_accuracy.py --scene ../shared/data/dtu_scan24 --work /tmp/dtu24_sfm --downscale 2

Writes the SfM scene to --work (photos in --work/images) and the figures to
--work/sfm_accuracy.json; prints them. The true cameras are read only for the comparison.
"""
import argparse
import json
import os
import shutil
import sys
import time

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from process_data.loading import decompose_projection, list_images  # noqa: E402
from process_data.gen_cameras import gen_cameras  # noqa: E402
from process_data.imgs2poses import SfMOptions, run_sfm  # noqa: E402
from utils.camera import aligned_pose_errors, downscale_matrix  # noqa: E402


def copy_photos(image_dir: str, out_dir: str, downscale: int) -> list:
    """The scene's photos, downscaled by an integer factor, into out_dir (same names)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    paths = list_images(image_dir)
    for path in tqdm(paths, desc="copying photos", unit="photo"):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if downscale > 1:
            image = cv2.resize(image, (image.shape[1] // downscale, image.shape[0] // downscale), interpolation=cv2.INTER_AREA)
        cv2.imwrite(os.path.join(out_dir, os.path.basename(path)), image)
    return [os.path.basename(p) for p in paths]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scene", required=True, help="NeuS-format scene: image/ (or images/) and cameras_sphere.npz")
    parser.add_argument("--work", required=True, help="folder for the SfM scene (replaced)")
    parser.add_argument("--downscale", type=int, default=2, help="integer factor applied to the photos first")
    parser.add_argument("--matcher", default="exhaustive")
    parser.add_argument("--num_threads", type=int, default=1)
    args = parser.parse_args(argv)

    image_dir = next(os.path.join(args.scene, d) for d in ("image", "images") if os.path.isdir(os.path.join(args.scene, d)))
    all_names = copy_photos(image_dir, os.path.join(args.work, "images"), args.downscale)
    start = time.time()
    run_sfm(args.work, SfMOptions(matcher=args.matcher, num_threads=args.num_threads))
    summary = gen_cameras(args.work)
    seconds = time.time() - start

    ours = np.load(os.path.join(args.work, "cameras_sphere.npz"))
    true = np.load(os.path.join(args.scene, "cameras_sphere.npz"))
    index = [all_names.index(name) for name in summary["views"]]
    c2w = np.stack([decompose_projection(ours[f"world_mat_{i}"][:3])[1] for i in range(len(index))])
    c2w_true = np.stack([decompose_projection(true[f"world_mat_{j}"][:3])[1] for j in index])
    rotation, centre, (s, R, t) = aligned_pose_errors(c2w, c2w_true)
    K_ours = decompose_projection(ours["world_mat_0"][:3])[0]
    K_true = downscale_matrix(args.downscale) @ decompose_projection(true[f"world_mat_{index[0]}"][:3])[0]
    region_centre = s * R @ np.array(summary["region_centre"]) + t
    true_scale = true[f"scale_mat_{index[0]}"]
    result = {
        "photos": len(all_names),
        "registered": len(index),
        "not_registered": sorted(set(all_names) - set(summary["views"])),
        "resolution": list(cv2.imread(os.path.join(args.work, "images", all_names[0])).shape[1::-1]),
        "seconds_sfm_and_gen_cameras": round(seconds, 1),
        "rotation_error_deg": {"max": float(rotation.max()), "mean": float(rotation.mean())},
        "centre_error_percent_of_camera_distance": {"max": float(100 * centre.max()), "mean": float(100 * centre.mean())},
        "focal_px": {"ours": float(K_ours[0, 0]), "true_at_this_resolution": float(K_true[0, 0])},
        "region_in_true_frame": {
            "centre": region_centre.tolist(), "radius": float(s * summary["region_radius"]),
            "true_scale_mat_centre": true_scale[:3, 3].tolist(), "true_scale_mat_radius": float(true_scale[0, 0]),
        },
    }
    with open(os.path.join(args.work, "sfm_accuracy.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
