"""Silhouette IoU of a mesh against a NeuS-format scene's masks, over all views.

    python -m scripts.eval_silhouette --mesh outputs/.../save/it004000-mc256.ply \
        --root_dir ../shared/data/dtu_scan24 --img_downscale 4

The mesh must be in the scene's world frame (what --mesh writes). Prints per-view and mean IoU,
precision and recall.
"""
import argparse
import json
import sys

import numpy as np
import trimesh

from process_data.dtu import load_neus_scene
from utils.mesh import silhouette_scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--root_dir", required=True)
    parser.add_argument("--cameras_file", default="cameras_sphere.npz")
    parser.add_argument("--img_downscale", type=float, default=4.0)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    mesh = trimesh.load(args.mesh, process=False)
    views = load_neus_scene(args.root_dir, args.cameras_file, args.img_downscale, use_masks=True)
    if views.masks is None:
        print(f"{args.root_dir} has no mask/ folder", file=sys.stderr)
        return 2
    scores = silhouette_scores(np.asarray(mesh.vertices), np.asarray(mesh.faces), views.world_mats, views.masks)
    for name, (iou, precision, recall) in zip(views.names, scores):
        print(f"{name}: IoU {iou:.4f} precision {precision:.4f} recall {recall:.4f}")
    iou, precision, recall = scores.mean(axis=0)
    print(f"mean over {len(scores)} views: IoU {iou:.4f} precision {precision:.4f} recall {recall:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mean_iou": float(iou), "mean_precision": float(precision), "mean_recall": float(recall),
                       "per_view": dict(zip(views.names, scores[:, 0].tolist()))}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
