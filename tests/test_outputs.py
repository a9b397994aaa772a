"""The outputs a user looks at: --train ending with the test stage, --test and --mesh on a
checkpoint, on a tiny demo scene (generated here, so no external data is needed)."""
import glob
import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import trimesh

from process_data.synthetic import make_demo_scene
from tests.conftest import ROOT

TINY = [
    "device=cpu",
    "dataset.n_views=8",
    "dataset.width=80",
    "dataset.height=60",
    "dataset.holdout_every=4",  # views 0 and 4 held out
    "model.geometry.xyz_encoding.n_levels=6",
    "model.geometry.xyz_encoding.log2_hashmap_size=12",
    "model.geometry.xyz_encoding.compile=false",
    "model.sampler.resolution=32",
    "trainer.max_steps=6",
    "trainer.log_every=3",
    "trainer.val_every=3",
    "trainer.ckpt_every=0",
    "trainer.train_num_rays=128",
    "trainer.n_test_traj_steps=4",
    "export.mesh_resolution=32",
    "export.formats=[ply,obj]",
]


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "run.py", "--config", "confs/neus-demo.yaml", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny training run that ends with the test stage."""
    base = tmp_path_factory.mktemp("outputs")
    scene = str(base / "scene")
    make_demo_scene(scene, n_views=8, width=80, height=60)
    result = run("--train", "--outputs_dir", str(base / "runs"), f"dataset.root_dir={scene}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    (trial,) = glob.glob(str(base / "runs" / "neus-demo-scene" / "*"))
    return scene, trial


def test_train_ends_with_metrics_video_and_mesh(tiny_run):
    _, trial = tiny_run
    save = os.path.join(trial, "save")
    assert sorted(os.listdir(os.path.join(save, "it000003-val"))) == ["000000.png"]
    test_dir = os.path.join(save, "it000006-test")
    assert {"000000.png", "000004.png", "metrics.json"} <= set(os.listdir(test_dir))
    assert len(glob.glob(os.path.join(test_dir, "traj-*.png"))) == 4
    metrics = json.load(open(os.path.join(test_dir, "metrics.json")))
    assert metrics["step"] == 6 and sorted(metrics["views"]) == ["000000", "000004"]
    for key in ("psnr", "ssim", "psnr_masked", "ssim_masked"):
        assert np.isfinite(metrics["mean"][key])
    # the scene has a ground-truth mesh: Chamfer / F-score are reported in world units
    assert metrics["mesh"]["chamfer"] > 0 and 0 <= metrics["mesh"]["fscore"] <= 1
    video = imageio.mimread(os.path.join(save, "it000006-test.mp4"), memtest=False)
    assert len(video) == 4 and video[0].shape[1] == 2 * video[0].shape[0] * 80 // 60  # RGB | normals
    for fmt in ("ply", "obj"):
        assert os.path.isfile(os.path.join(save, f"it000006-mc32.{fmt}"))


def test_mesh_is_in_the_world_frame_with_colours(tiny_run):
    """The demo's world frame is the normalised one scaled by 80 around (12, -7, 30): every
    vertex lies within 80 world units of that centre (the unit sphere), and is coloured."""
    _, trial = tiny_run
    mesh = trimesh.load(os.path.join(trial, "save", "it000006-mc32.ply"), process=False)
    assert len(mesh.faces) > 0
    assert np.linalg.norm(mesh.vertices - [12.0, -7.0, 30.0], axis=1).max() < 80.0 * np.sqrt(3)
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)


def test_mesh_and_test_modes_on_a_checkpoint(tiny_run):
    """--mesh and --test with --resume write into the checkpoint's own trial folder."""
    scene, trial = tiny_run
    ckpt = os.path.join(trial, "ckpt", "ckpt_000006.pth")
    os.remove(os.path.join(trial, "save", "it000006-mc32.ply"))
    result = run("--mesh", "--resume", ckpt, f"dataset.root_dir={scene}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(os.path.join(trial, "save", "it000006-mc32.ply"))
    os.remove(os.path.join(trial, "save", "it000006-test", "metrics.json"))
    result = run("--test", "--resume", ckpt, f"dataset.root_dir={scene}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(os.path.join(trial, "save", "it000006-test", "metrics.json"))


def test_mesh_without_resume_takes_the_last_run(tiny_run):
    """--mesh (or --test) without --resume uses the newest trial of the config's name."""
    scene, trial = tiny_run
    os.remove(os.path.join(trial, "save", "it000006-mc32.ply"))
    outputs = os.path.dirname(os.path.dirname(trial))
    result = run("--mesh", "--outputs_dir", outputs, f"dataset.root_dir={scene}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(os.path.join(trial, "save", "it000006-mc32.ply"))
