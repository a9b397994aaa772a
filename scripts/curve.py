"""Mesh quality against wall-clock time, from ONE training run.

    python scripts/curve.py CONFIG [key=value ...] --marks 60,120,300,600,900 [--out DIR]
    python scripts/curve.py CONFIG [key=value ...] --score TRIAL_DIR [--out DIR]   # score a run again

The training is `run.py --config CONFIG --train key=value ... trainer.checkpoint_at_seconds=[marks]`:
each time the command's wall clock (from its process start, imports included, minus the time spent
writing these checkpoints) passes a mark it writes `<trial>/curve/ckpt_<step>.pth`. Its whole
wall time, test stage included, is the `end` row. Afterwards (nothing else runs meanwhile) every
mark's checkpoint and the final one are meshed with the config's export settings and scored:

- silhouette IoU, precision and recall of the mesh against the scene's masks, mean over ALL views;
- PSNR inside the mask over the held-out views (dataset.holdout_every), from every --psnr_stride-th pixel
  in each direction (default 4: an unbiased estimate, 16x cheaper; the test stage reports every pixel);
- Chamfer / F-score and the median signed offset (negative: the surface lies inside the object)
  against `gt_mesh.ply` where the scene has one (see export.fscore_threshold);
- the connected components of the marching-cubes surface before clean-up (and of the written mesh).

Writes DIR/curve.json, DIR/curve.md (a table) and DIR/curve.png (IoU, recall and PSNR against
seconds). DIR defaults to <trial>/curve/.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train(config_file: str, overrides: List[str], marks: List[float], outputs_dir: str) -> Dict[str, Any]:
    """Run the training command; -> {trial_dir, seconds, returncode}."""
    mark_list = "[" + ",".join(f"{m:g}" for m in marks) + "]"
    command = [sys.executable, os.path.join(ROOT, "run.py"), "--config", config_file, "--train",
               "--outputs_dir", outputs_dir, *overrides, f"trainer.checkpoint_at_seconds={mark_list}"]
    print("training:", " ".join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"training failed with exit status {result.returncode}")
    trials = [os.path.join(root, d) for root, dirs, _ in os.walk(outputs_dir) for d in dirs if "@" in d]
    trial = max(trials, key=os.path.getmtime)
    return {"trial_dir": trial, "seconds": seconds}


def components(faces: np.ndarray) -> Dict[str, float]:
    """Connected components (faces sharing an edge) of a triangle list -> their count and the share
    of faces outside the largest."""
    from utils.mesh import component_labels

    if len(faces) == 0:
        return {"components": 0, "faces_outside_largest": 0.0}
    sizes = np.bincount(component_labels(faces))
    return {"components": int(len(sizes)), "faces_outside_largest": float(1.0 - sizes.max() / len(faces))}


def strided_view_metrics(task, view: int, stride: int) -> Dict[str, float]:
    """PSNR (whole view and inside the mask) of held-out `view` rendered at every `stride`-th
    pixel in each direction (pixel centres (stride i + stride // 2, stride j + stride // 2)):
    an unbiased estimate of the full view's, stride^2 times cheaper (an early checkpoint marches
    many samples per ray). stride 1: every pixel (what the test stage reports)."""
    import torch

    from systems.evaluation import as_images, with_ground_truth
    from utils.metrics import psnr

    dataset = task.dataset
    h, w = dataset.height, dataset.width
    rows = torch.arange(stride // 2, h, stride)
    cols = torch.arange(stride // 2, w, stride)
    pixels = (rows[:, None] * w + cols[None, :]).reshape(-1)  # [h' w'] row-major
    rays = {k: v[pixels] for k, v in dataset.view_rays(view).items()}
    images = with_ground_truth(as_images(task.evaluation.render_rays(rays), len(rows), len(cols)), rays,
                               len(rows), len(cols))
    metrics = {"psnr": psnr(images["rgb"], images["gt_rgb"])}
    if dataset.has_masks:
        metrics["psnr_masked"] = psnr(images["rgb"], images["gt_rgb"], images["mask"])
    return metrics


def score(config_file: str, overrides: List[str], trial_dir: str, psnr_stride: int = 4) -> List[Dict[str, Any]]:
    """Mesh and score every mark checkpoint of trial_dir and its final checkpoint."""
    import torch
    import trimesh

    from systems import RunPaths, Trainer
    from systems.config import load_config
    from utils.checkpoint import checkpoints_in
    from utils.mesh import silhouette_scores
    from utils.misc import resolve_device, seed_everything

    marks_file = os.path.join(trial_dir, "curve", "marks.json")
    rows = json.load(open(marks_file)) if os.path.isfile(marks_file) else []
    final = checkpoints_in(os.path.join(trial_dir, "ckpt"))[-1]
    rows.append({"mark": "end", "seconds": None, "step": None, "path": final})
    config = load_config(config_file, overrides)
    seed_everything(config.seed)
    trainer = Trainer(config, RunPaths.for_trial(trial_dir), resolve_device(config.device))
    task = trainer.task
    views = task.dataset.views
    held_out = task.dataset.split["test"] or task.dataset.split["train"][::8]
    for row in rows:
        trainer.load(row["path"])
        row["step"] = trainer.global_step
        with torch.no_grad():
            metrics = [strided_view_metrics(task, v, psnr_stride) for v in held_out]
        for key in metrics[0]:
            row[key] = float(np.mean([m[key] for m in metrics]))
        vertices, faces = task.mesh.surface()
        row.update({f"raw_{k}": v for k, v in components(faces).items()})
        mesh_path = trainer.export_mesh()[0]
        mesh = trimesh.load(mesh_path, process=False)
        row["mesh"] = mesh_path
        row["mesh_components"] = components(np.asarray(mesh.faces))["components"]
        if views.masks is not None:
            scores = silhouette_scores(np.asarray(mesh.vertices), np.asarray(mesh.faces), views.world_mats, views.masks)
            row["iou"], row["precision"], row["recall"] = (float(x) for x in scores.mean(axis=0))
        # the mesh metrics' precision / recall are the F-score's (distances), not the silhouette's
        row.update({(f"fscore_{k}" if k in ("precision", "recall") else k): v
                    for k, v in task.mesh_metrics(mesh_path).items() if isinstance(v, float)})
        print(json.dumps({k: v for k, v in row.items() if k not in ("path", "mesh")}), flush=True)
    return rows


COLUMNS = [("mark", "mark (s)"), ("seconds", "wall s"), ("step", "step"), ("iou", "IoU"), ("precision", "precision"),
           ("recall", "recall"), ("psnr_masked", "PSNR in mask"), ("psnr", "PSNR"), ("chamfer", "Chamfer"),
           ("fscore", "F-score"), ("offset_median", "offset (median, - inside)"), ("raw_components", "components (raw)"), ("mesh_components", "components (mesh)")]


def write_table(rows: List[Dict[str, Any]], path: str, title: str) -> None:
    columns = [(k, name) for k, name in COLUMNS if any(k in r for r in rows)]
    lines = [f"# {title}", "", "| " + " | ".join(n for _, n in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            cells.append("" if value is None else f"{value:.4f}" if isinstance(value, float) and key not in
                         ("seconds",) else f"{value:.0f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows: List[Dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [r["seconds"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, style in (("iou", "o-"), ("recall", "s--"), ("precision", "^:")):
        if all(key in r for r in rows):
            ax.plot(seconds, [r[key] for r in rows], style, label=f"silhouette {key}")
    ax.set_xlabel("wall-clock seconds from the command's start")
    ax.set_ylabel("silhouette score (all views)")
    ax.set_ylim(max(0.0, min(min(r.get("iou", 1.0) for r in rows) - 0.02, 0.9)), 1.0)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    top = ax
    if all("psnr_masked" in r for r in rows):
        top = ax.twinx()  # drawn over ax: the one legend goes on it
        top.plot(seconds, [r["psnr_masked"] for r in rows], "d-", color="tab:red", label="held-out PSNR in mask")
        top.set_ylabel("PSNR (dB)", color="tab:red")
        more = top.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    top.legend(handles, labels, loc="lower right", fontsize=8, framealpha=0.9)  # one legend, nothing hidden
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--marks", default="60,120,300,600,900", help="wall-clock seconds, comma-separated")
    parser.add_argument("--outputs_dir", default="./outputs")
    parser.add_argument("--score", default=None, help="score this trial folder again instead of training")
    parser.add_argument("--psnr_stride", type=int, default=4,
                        help="held-out PSNR from every N-th pixel in each direction (1: all; 4: 16x cheaper)")
    parser.add_argument("--out", default=None, help="where curve.json/.md/.png go (default: <trial>/curve)")
    args, overrides = parser.parse_known_args(argv)
    marks = [float(m) for m in args.marks.split(",") if m.strip()]
    if args.score:
        trial, seconds = os.path.abspath(args.score), None
        previous = os.path.join(trial, "curve", "curve.json")
        if os.path.isfile(previous):
            seconds = json.load(open(previous)).get("end_seconds")
    else:
        run = train(args.config, overrides, marks, args.outputs_dir)
        trial, seconds = run["trial_dir"], run["seconds"]
    rows = score(args.config, overrides, trial, args.psnr_stride)
    rows[-1]["seconds"] = seconds
    out = args.out or os.path.join(trial, "curve")
    os.makedirs(out, exist_ok=True)
    title = f"{os.path.basename(args.config)} {' '.join(overrides)}"
    with open(os.path.join(out, "curve.json"), "w") as f:
        json.dump({"config": args.config, "overrides": overrides, "trial": trial, "end_seconds": seconds,
                   "rows": rows}, f, indent=1)
    write_table(rows, os.path.join(out, "curve.md"), title)
    if all(r["seconds"] is not None for r in rows):
        plot(rows, os.path.join(out, "curve.png"), title)
    print(open(os.path.join(out, "curve.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
