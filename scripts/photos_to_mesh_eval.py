"""Photos to mesh, end to end, scored against a scene with known cameras and masks (issue 15,
point 2): the scene's photos ONLY (no masks, no cameras), resized as a user's folder would
be, go through the README's three commands; the mesh is then mapped into the scene's true
frame and its silhouette scored against the true masks over all views.

    python scripts/photos_to_mesh_eval.py --scene ../shared/data/dtu_scan24 --work /tmp/p2m_scan24
    python scripts/photos_to_mesh_eval.py --scene ... --work ... --stages photos,imgs2poses,gen_cameras
    python scripts/photos_to_mesh_eval.py --scene ... --work ... --stages score [--mesh PATH]

Stages (--stages, in this order; default all):
  photos       the scene's image/ files resized to --width x --height (800x600), as JPEGs
               (quality 95), into WORK/images/ (WORK is replaced)
  imgs2poses   python -m process_data.imgs2poses WORK              (timed)
  gen_cameras  python -m process_data.gen_cameras WORK             (timed)
  train        python run.py --config CONFIG --train dataset.root_dir=WORK
               --outputs_dir WORK/outputs [dataset.img_downscale=2] [--set key=value ...]  (timed)
  score        the newest WORK/outputs/*/*/save/it*-mc*.ply (or --mesh) mapped into the true
               frame by the similarity that best maps the SfM camera centres onto the true
               ones (utils.camera.similarity_transform, Umeyama; view i of WORK is photo
               WORK/gen_cameras.json views[i]), then utils.mesh.silhouette_iou against the
               scene's masks over ALL its views (registered or not), at --score_downscale.

Figures go to WORK/photos_to_mesh.json (merged over runs) and are printed: photos registered
(count and %), seconds per command, the alignment's residual, mean/min silhouette IoU.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)

from process_data.loading import decompose_projection, list_images  # noqa: E402

STAGES = ("photos", "imgs2poses", "gen_cameras", "train", "score")
RESULTS = "photos_to_mesh.json"


def copy_photos(image_dir: str, out_dir: str, size: Tuple[int, int], quality: int = 95) -> List[str]:
    """The scene's photos resized to size (w, h) as JPEGs out_dir/STEM.jpg -> the names written."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    names = []
    for path in list_images(image_dir):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"cannot read {path}")
        if (image.shape[1], image.shape[0]) != tuple(size):
            image = cv2.resize(image, tuple(size), interpolation=cv2.INTER_AREA)
        name = os.path.splitext(os.path.basename(path))[0] + ".jpg"
        cv2.imwrite(os.path.join(out_dir, name), image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        names.append(name)
    return names


def camera_centres(cameras: Dict[str, np.ndarray], indices: Sequence[int]) -> np.ndarray:
    """World-frame centres [N, 3] of views `indices` of a cameras_sphere.npz (world_mat_i = K [R | t])."""
    return np.stack([decompose_projection(np.asarray(cameras[f"world_mat_{i}"], np.float64)[:3, :4])[1][:, 3] for i in indices])


def true_view_indices(registered: Sequence[str], photos: Sequence[str]) -> List[int]:
    """Registered photo names (gen_cameras.json views) -> the index of each in the scene's
    sorted photos, matched by stem (the copies are JPEGs of the scene's PNGs)."""
    stems = [os.path.splitext(p)[0] for p in photos]
    return [stems.index(os.path.splitext(name)[0]) for name in registered]


def align_to_truth(work_cameras, registered: Sequence[str], true_cameras, photos: Sequence[str]):
    """The similarity X_true = s R X_sfm + t from the camera centres (Umeyama) -> s, R [3, 3],
    t [3], and the centres' residual after alignment as a fraction of the true cameras' mean
    distance from their centroid (max, rms)."""
    from utils.camera import similarity_transform

    index = true_view_indices(registered, photos)
    ours = camera_centres(work_cameras, range(len(registered)))
    truth = camera_centres(true_cameras, index)
    s, R, t = similarity_transform(ours, truth)
    residual = np.linalg.norm(s * ours @ R.T + t - truth, axis=1)
    spread = np.linalg.norm(truth - truth.mean(0), axis=1).mean()
    return s, R, t, (float(residual.max() / spread), float(np.sqrt((residual ** 2).mean()) / spread))


def silhouette_scores(vertices_true: np.ndarray, faces: np.ndarray, scene: str, downscale: float) -> Tuple[List[str], List[float]]:
    """Silhouette IoU of a mesh in the scene's world frame against its masks, every view."""
    from process_data.dtu import load_neus_scene
    from utils.mesh import silhouette_iou

    views = load_neus_scene(scene, "cameras_sphere.npz", downscale, use_masks=True)
    if views.masks is None:
        raise SystemExit(f"{scene} has no masks to score against")
    return views.names, silhouette_iou(vertices_true, faces, views.world_mats, views.masks)


def score(scene: str, work: str, mesh_path: str, downscale: float) -> Dict:
    """Align the mesh of the SfM scene `work` into the true frame of `scene` and score it."""
    import trimesh

    with open(os.path.join(work, "gen_cameras.json")) as f:
        registered = json.load(f)["views"]
    photos = [os.path.basename(p) for p in list_images(os.path.join(work, "images"))]
    s, R, t, (residual_max, residual_rms) = align_to_truth(
        np.load(os.path.join(work, "cameras_sphere.npz")), registered,
        np.load(os.path.join(scene, "cameras_sphere.npz")), photos,
    )
    mesh = trimesh.load(mesh_path, process=False)
    vertices = s * np.asarray(mesh.vertices, np.float64) @ R.T + t
    names, ious = silhouette_scores(vertices, np.asarray(mesh.faces), scene, downscale)
    return {
        "mesh": mesh_path,
        "alignment": {"scale": s, "centre_residual_max": residual_max, "centre_residual_rms": residual_rms},
        "silhouette_iou_mean": float(np.mean(ious)),
        "silhouette_iou_min": float(np.min(ious)),
        "silhouette_iou_views": len(ious),
        "silhouette_iou_per_view": dict(zip(names, [round(v, 4) for v in ious])),
    }


def newest_mesh(outputs: str) -> str:
    meshes = [path for path in glob.glob(os.path.join(outputs, "*", "*", "save", "it*-mc*.ply"))
              if not path.endswith("-removed.ply")]  # export.isolate's cut-off part lies beside the mesh
    if not meshes:
        raise SystemExit(f"no mesh under {outputs}/*/*/save/: run the train stage first (or pass --mesh)")
    return max(meshes, key=os.path.getmtime)


def timed(command: List[str]) -> float:
    print("$", " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, cwd=PROJECT_DIR, check=True)
    return round(time.time() - start, 1)


def parse_args(argv=None) -> Tuple[argparse.Namespace, List[str]]:
    """The command line -> the arguments and the stages to run (in the order given); an unknown
    stage is a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scene", required=True, help="NeuS-format scene with image/, mask/, cameras_sphere.npz")
    parser.add_argument("--work", required=True, help="the user's folder: WORK/images/ and what the commands write")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--config", default="confs/neus-custom.yaml")
    parser.add_argument("--train_downscale", type=float, default=2.0,
                        help="dataset.img_downscale for training (2: 800x600 photos train at ~400x300)")
    parser.add_argument("--set", nargs="*", default=[], help="more key=value overrides for run.py")
    parser.add_argument("--mesh", default=None, help="score this mesh (in WORK's SfM frame) instead of the newest")
    parser.add_argument("--score_downscale", type=float, default=4.0, help="of the scene's masks (DTU: 400x300)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; valid: {', '.join(STAGES)}")
    return args, stages


def previous_results(results_path: str, stages: Sequence[str]) -> Dict:
    """The figures of earlier runs to merge into, or {} (the photos stage starts afresh)."""
    if os.path.isfile(results_path) and "photos" not in stages:
        with open(results_path) as f:
            return json.load(f)
    return {}


def photos_stage(scene: str, work: str, size: Tuple[int, int]) -> Dict:
    """Replace WORK with the scene's photos resized to size (w, h) in WORK/images -> figures."""
    shutil.rmtree(work, ignore_errors=True)
    image_dir = next(os.path.join(scene, d) for d in ("image", "images") if os.path.isdir(os.path.join(scene, d)))
    names = copy_photos(image_dir, os.path.join(work, "images"), size)
    return {"scene": scene, "photos": len(names), "size": list(size)}


def registration(work: str) -> Dict:
    """How many of WORK/images gen_cameras registered (WORK/gen_cameras.json) -> figures."""
    with open(os.path.join(work, "gen_cameras.json")) as f:
        registered = json.load(f)["views"]
    photos = list_images(os.path.join(work, "images"))
    return {
        "registered": len(registered),
        "registered_percent": round(100.0 * len(registered) / len(photos), 1),
        "not_registered": sorted({os.path.basename(p) for p in photos} - set(registered)),
    }


def train_command(python: str, work: str, args: argparse.Namespace) -> List[str]:
    """run.py's command line for training on WORK."""
    return [
        python, "run.py", "--config", args.config, "--train", "--outputs_dir", os.path.join(work, "outputs"),
        f"dataset.root_dir={work}", f"dataset.img_downscale={args.train_downscale:g}", *args.set,
    ]


def run_stages(args: argparse.Namespace, stages: Sequence[str], scene: str, work: str, results: Dict) -> None:
    """Run the chosen stages in order, adding their figures (and seconds) to results."""
    python = sys.executable
    if "photos" in stages:
        results.update(photos_stage(scene, work, (args.width, args.height)))
    seconds = results.setdefault("seconds", {})
    if "imgs2poses" in stages:
        seconds["imgs2poses"] = timed([python, "-m", "process_data.imgs2poses", work])
    if "gen_cameras" in stages:
        seconds["gen_cameras"] = timed([python, "-m", "process_data.gen_cameras", work])
        results.update(registration(work))
    if "train" in stages:
        seconds["train"] = timed(train_command(python, work, args))
    if "score" in stages:
        results["score"] = score(scene, work, args.mesh or newest_mesh(os.path.join(work, "outputs")), args.score_downscale)


def brief(results: Dict) -> Dict:
    """results without the per-view silhouette IoUs (for printing)."""
    short = {k: v for k, v in results.items() if k != "score"}
    if "score" in results:
        short["score"] = {k: v for k, v in results["score"].items() if k != "silhouette_iou_per_view"}
    return short


def main(argv=None) -> int:
    """Run the stages of the command line, write WORK/photos_to_mesh.json and print the figures."""
    args, stages = parse_args(argv)
    work, scene = os.path.abspath(args.work), os.path.abspath(args.scene)
    results_path = os.path.join(work, RESULTS)
    results = previous_results(results_path, stages)
    run_stages(args, stages, scene, work, results)
    os.makedirs(work, exist_ok=True)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(brief(results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
