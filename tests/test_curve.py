"""scripts/curve.py: one training with wall-clock checkpoints, each meshed and scored; and the
pieces it stands on (trainer.checkpoint_at_seconds, silhouette precision / recall)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import trimesh

from process_data.synthetic import make_demo_scene
from tests.conftest import ROOT
from tests.test_mesh import ring_of_cameras
from tests.test_outputs import TINY
from utils.mesh import rasterize_silhouette, silhouette_scores
from utils.misc import process_age


def test_process_age_counts_from_process_start():
    """This process started before the test ran (pytest's imports alone take a second), and
    its age grows with the wall clock."""
    first = process_age()
    time.sleep(0.05)
    assert process_age() - first >= 0.04
    assert first > 0.5


def test_silhouette_precision_and_recall_against_a_half_mask():
    """A sphere's silhouette S against a mask M that is S's left half plus an empty right
    half: IoU = precision = |S & M| / |S| ~ 1/2, recall = 1; against S itself all three are 1;
    against an empty mask IoU = precision = 0 and recall = 1 (empty reference)."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    v, f = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    mat = ring_of_cameras(1, (120, 90))[0]
    sil = rasterize_silhouette(v, f, mat, (120, 90))
    left = sil.copy()
    left[:, 60:] = False
    masks = np.stack([sil, left, np.zeros_like(sil)]).astype(np.float32)
    scores = silhouette_scores(v, f, [mat] * 3, masks)  # [3, (iou, precision, recall)]
    np.testing.assert_allclose(scores[0], [1.0, 1.0, 1.0])
    half = left.sum() / sil.sum()
    assert 0.45 < half < 0.55
    np.testing.assert_allclose(scores[1], [half, half, 1.0])
    np.testing.assert_allclose(scores[2], [0.0, 0.0, 1.0])


def test_curve_trains_once_and_scores_each_mark(tmp_path):
    """Mark 0 s is due after the first step (the command is older than that), mark 1e6 s never:
    one checkpoint in <trial>/curve/ at step 1, listed in marks.json; the table has that row and
    the end row (step 6), each with silhouette scores, masked PSNR and Chamfer (the demo has a
    ground-truth mesh), and the plot is written."""
    scene = str(tmp_path / "scene")
    make_demo_scene(scene, n_views=8, width=80, height=60)
    out = tmp_path / "curve"
    result = subprocess.run(
        [sys.executable, "scripts/curve.py", "confs/neus-demo.yaml", "--marks", "0,1e6", "--outputs_dir",
         str(tmp_path / "runs"), "--out", str(out), f"dataset.root_dir={scene}", *TINY,
         "trainer.val_every=0", "trainer.test_at_end=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    curve = json.load(open(out / "curve.json"))
    rows = curve["rows"]
    assert [r["mark"] for r in rows] == [0.0, "end"] and [r["step"] for r in rows] == [1, 6]
    marks = json.load(open(os.path.join(curve["trial"], "curve", "marks.json")))
    assert [m["step"] for m in marks] == [1] and os.path.isfile(marks[0]["path"])
    assert rows[0]["seconds"] >= 0 and rows[1]["seconds"] > rows[0]["seconds"]
    for row in rows:
        assert 0.0 <= row["iou"] <= min(row["precision"], row["recall"]) <= 1.0
        assert np.isfinite(row["psnr_masked"]) and row["chamfer"] > 0
        assert row["raw_components"] >= row["mesh_components"] >= 0
    assert "| mark (s) |" in open(out / "curve.md").read()
    assert os.path.getsize(out / "curve.png") > 1000
