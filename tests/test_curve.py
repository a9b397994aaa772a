"""scripts/curve.py: one training with wall-clock checkpoints, each meshed and scored; and the
pieces it stands on (trainer.checkpoint_at_seconds, silhouette precision / recall)."""
import json
import os
import time

import numpy as np
import trimesh

from tests.conftest import DEMO_CONFIG, ROOT, tiny_overrides
from tests.test_mesh import ring_of_cameras
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


def test_curve_trains_once_and_scores_each_mark(demo_scene, tmp_path, monkeypatch, one_thread):
    """Mark 0 s is due after the first step (the command is older than that), mark 1e6 s never:
    one checkpoint in <trial>/curve/ at step 1, listed in marks.json; the table has that row and
    the end row (step 6), each with silhouette scores, masked PSNR and Chamfer (the demo has a
    ground-truth mesh), and the plot is written. (curve.py's main runs in this process; its
    training is run.py in a subprocess, as always.)"""
    from scripts import curve as curve_script

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the training subprocess
    out = tmp_path / "curve"
    overrides = tiny_overrides(f"dataset.root_dir={demo_scene}", "trainer.test_at_end=false", demo=True)
    assert curve_script.main([os.path.join(ROOT, DEMO_CONFIG), "--marks", "0,1e6", "--outputs_dir", str(tmp_path / "runs"),
                              "--out", str(out), *overrides]) == 0
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
