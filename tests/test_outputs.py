"""The outputs a user looks at: --train ending with the test stage, --test and --mesh on a
checkpoint, on a tiny demo scene (generated here, so no external data is needed). The training
is conftest's demo_run (a subprocess, as a user runs it); --test and --mesh run run.py's main in
this process, on a copy of it."""
import glob
import json
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import trimesh

import run
from tests.conftest import DEMO_CONFIG, ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def main(demo_run, *args) -> int:
    """run.py's main in this process on demo_run's config (its textured export left out)."""
    return run.main(["--config", os.path.join(ROOT, DEMO_CONFIG), *args, *demo_run.overrides, "export.texture=false"])


def test_train_ends_with_metrics_video_and_mesh(demo_run):
    save = os.path.join(demo_run.trial, "save")
    assert demo_run.steps == 6
    assert sorted(os.listdir(os.path.join(save, "it000003-val"))) == ["000000.png"]
    test_dir = os.path.join(save, "it000006-test")
    assert {"000000.png", "000004.png", "metrics.json"} <= set(os.listdir(test_dir))
    n_frames = int(dict(o.split("=", 1) for o in demo_run.overrides)["trainer.n_test_traj_steps"])
    assert n_frames >= 2 and len(glob.glob(os.path.join(test_dir, "traj-*.png"))) == n_frames
    metrics = json.load(open(os.path.join(test_dir, "metrics.json")))
    assert metrics["step"] == 6 and sorted(metrics["views"]) == ["000000", "000004"]
    for key in ("psnr", "ssim", "psnr_masked", "ssim_masked"):
        assert np.isfinite(metrics["mean"][key])
    # the scene has a ground-truth mesh: Chamfer / F-score are reported in world units
    assert metrics["mesh"]["chamfer"] > 0 and 0 <= metrics["mesh"]["fscore"] <= 1
    settings = dict(o.split("=", 1) for o in demo_run.overrides)
    assert metrics["mesh"]["n_points"] == int(settings["export.metrics_points"])  # samples per mesh
    video = imageio.mimread(os.path.join(save, "it000006-test.mp4"), memtest=False)
    height, width = imageio.imread(os.path.join(test_dir, "000000.png")).shape[:2]
    assert len(video) == n_frames and video[0].shape[1] == 2 * video[0].shape[0] * width // height  # RGB | normals
    for fmt in ("ply", "obj"):
        assert os.path.isfile(os.path.join(save, f"it000006-mc32.{fmt}"))


def test_mesh_is_in_the_world_frame_with_colours(demo_run):
    """The demo's world frame is the normalised one scaled by 80 around (12, -7, 30): every
    vertex lies within 80 world units of that centre (the unit sphere), and is coloured."""
    mesh = trimesh.load(os.path.join(demo_run.trial, "save", "it000006-mc32.ply"), process=False)
    assert len(mesh.faces) > 0
    assert np.linalg.norm(mesh.vertices - [12.0, -7.0, 30.0], axis=1).max() < 80.0 * np.sqrt(3)
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)


def test_mesh_and_test_modes_on_a_checkpoint(demo_run, tmp_path):
    """--mesh and --test with --resume write into the checkpoint's own trial folder."""
    trial = demo_run.copy(str(tmp_path / "runs"))
    ckpt = os.path.join(trial, "ckpt", "ckpt_000006.pth")
    os.remove(os.path.join(trial, "save", "it000006-mc32.ply"))
    assert main(demo_run, "--mesh", "--resume", ckpt) == 0
    assert os.path.isfile(os.path.join(trial, "save", "it000006-mc32.ply"))
    os.remove(os.path.join(trial, "save", "it000006-test", "metrics.json"))
    assert main(demo_run, "--test", "--resume", ckpt) == 0
    assert os.path.isfile(os.path.join(trial, "save", "it000006-test", "metrics.json"))


def test_mesh_without_resume_takes_the_last_run(demo_run, tmp_path):
    """--mesh (or --test) without --resume uses the newest trial of the config's name."""
    trial = demo_run.copy(str(tmp_path / "runs"))
    os.remove(os.path.join(trial, "save", "it000006-mc32.ply"))
    outputs = os.path.dirname(os.path.dirname(trial))
    assert main(demo_run, "--mesh", "--outputs_dir", outputs) == 0
    assert os.path.isfile(os.path.join(trial, "save", "it000006-mc32.ply"))
