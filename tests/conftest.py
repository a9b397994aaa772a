import glob
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import List

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multiprocess: starts several processes (torch.distributed on gloo); deselect with -m 'not multiprocess'"
    )


# --- the suite's one tiny training config ------------------------------------------------------
TINY = {  # a small model, compile off (compiling takes longer than these runs), nothing on a cadence
    "device": "cpu",
    "model.geometry.xyz_encoding.n_levels": "6",
    "model.geometry.xyz_encoding.log2_hashmap_size": "12",
    "model.geometry.xyz_encoding.compile": "false",
    "model.texture.xyz_encoding.n_levels": "6",  # the CPU configs' appearance grid, as small
    "model.texture.xyz_encoding.log2_hashmap_size": "12",
    "model.texture.xyz_encoding.compile": "false",
    "model.sampler.resolution": "32",
    # the CPU configs' cos-anneal knots follow trainer.max_steps, which the resume tests change:
    # the plain linear anneal (tests/test_config.py checks the knots)
    "model.cos_anneal_knots": "[]",
    "trainer.train_num_rays": "128",
    "trainer.val_every": "0",
    "trainer.ckpt_every": "0",
    "trainer.n_test_traj_steps": "2",
    "export.mesh_resolution": "32",
    # Chamfer / F-score of a barely trained mesh on 200000 points each took minutes (its
    # samples are nearly equidistant from the truth's: the k-d tree searches almost all)
    "export.metrics_points": "5000",
}
TINY_DEMO = {  # the demo scene made small, and a 6-step run
    "dataset.n_views": "8",
    "dataset.width": "80",
    "dataset.height": "60",
    "dataset.holdout_every": "4",  # views 0 and 4 held out
    "trainer.max_steps": "6",
    "trainer.log_every": "3",
}


def tiny_overrides(*overrides: str, demo: bool = False) -> List[str]:
    """The suite's tiny training config as key=value overrides: TINY (any config), plus
    TINY_DEMO with demo=True (confs/neus-demo.yaml: its scene and run length), then
    `overrides`, each replacing the key it names or adding it. A key every tiny training
    needs goes into TINY here, once."""
    keys = {**TINY, **(TINY_DEMO if demo else {})}
    for override in overrides:
        key, value = override.split("=", 1)
        keys[key] = value
    return [f"{key}={value}" for key, value in keys.items()]


DTU_SCAN24 = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "dtu_scan24"))


@pytest.fixture
def dtu_root():
    if not os.path.isdir(DTU_SCAN24):
        pytest.skip(f"DTU scan 24 not found at {DTU_SCAN24} (the shared test data sits beside the repository)")
    return DTU_SCAN24


def require_dtu() -> str:
    if not os.path.isdir(DTU_SCAN24):
        pytest.skip(f"DTU scan 24 not found at {DTU_SCAN24} (the shared test data sits beside the repository)")
    return DTU_SCAN24


@pytest.fixture(scope="session")
def dtu_views_x8():
    """Scan 24 loaded once per session at img_downscale 8 (200x150) with masks; treat as read-only."""
    from process_data.dtu import load_neus_scene

    return load_neus_scene(require_dtu(), "cameras_sphere.npz", 8, use_masks=True)


@pytest.fixture(scope="module")
def one_thread():
    """Train on one intra-op thread: with 2 threads on 2 shared cores, any other busy process
    makes OpenMP's spinning threads ~40x slower (1.6 s instead of 0.04 s per step)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="module")
def scene_template(tmp_path_factory):
    """A 4-view 40x30 NeuS-format scene (image/, mask/, cameras_sphere.npz)."""
    from process_data.synthetic import make_demo_scene

    return make_demo_scene(str(tmp_path_factory.mktemp("template") / "scene"), n_views=4, width=40, height=30)


@pytest.fixture
def scene(scene_template, tmp_path):
    """A private copy of the template, to break as each test needs."""
    return shutil.copytree(scene_template, str(tmp_path / "scene"))


@pytest.fixture
def cached_scene(dtu_root, dtu_views_x8, monkeypatch):
    """Systems built in a test read the session's already-loaded 200x150 scene."""
    import process_data.dtu

    load = process_data.dtu.load_neus_scene

    def cached(root_dir, cameras_file, img_downscale, use_masks):
        if (root_dir, cameras_file, img_downscale, use_masks) == (dtu_root, "cameras_sphere.npz", 8, True):
            return dtu_views_x8
        return load(root_dir, cameras_file, img_downscale, use_masks)

    monkeypatch.setattr(process_data.dtu, "load_neus_scene", cached)
    return dtu_root


# --- run.py as a user runs it ----------------------------------------------------------------
DEMO_CONFIG = "confs/neus-demo.yaml"


def run_py(*args: str, config: str = DEMO_CONFIG) -> subprocess.CompletedProcess:
    """python run.py --config CONFIG ARGS... to its end, on one intra-op thread."""
    return subprocess.run([sys.executable, "run.py", "--config", config, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _read_lines(stream, lines: "queue.Queue[str]"):
    for line in iter(stream.readline, ""):
        lines.put(line)


def start_run_py(args, config: str = DEMO_CONFIG):
    """run.py with args in the background -> the process and a queue of its output lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "run.py", "--config", config, *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    return process, lines


def wait_for_line(process, lines, log, prefix: str, timeout: float = 300) -> str:
    """Collect the output into log until a line starts with prefix (or logs it) -> that line."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert process.poll() is None, "".join(log)[-3000:]
            continue
        log.append(line)
        if line.startswith(prefix) or f"INFO {prefix}" in line:
            return line
    raise AssertionError(f"no line starting with {prefix!r}:\n" + "".join(log)[-3000:])


def stop_run_py(process, lines, log) -> str:
    """Ctrl-C, then the whole output."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    time.sleep(0.2)
    while not lines.empty():
        log.append(lines.get())
    return "".join(log)


# --- one tiny trained run of the demo scene, shared by the modules that look at a finished run --
class DemoRun:
    """What demo_run trained: the scene, the trial folder, run.py's whole output, and the
    overrides it ran with (pass them again to --test / --mesh / --view on its checkpoint)."""

    def __init__(self, scene: str, trial: str, output: str, overrides: List[str]):
        self.scene, self.trial, self.output, self.overrides = scene, trial, output, overrides
        self.steps = int(dict(o.split("=", 1) for o in overrides)["trainer.max_steps"])

    def copy(self, destination: str) -> str:
        """A private copy of the run's outputs folder, to change -> the trial folder in it."""
        runs = os.path.dirname(os.path.dirname(self.trial))
        shutil.copytree(runs, destination)
        return os.path.join(destination, os.path.relpath(self.trial, runs))


@pytest.fixture(scope="session")
def demo_scene(tmp_path_factory) -> str:
    """The demo scene at tiny_overrides(demo=True)'s size (with its ground-truth mesh); read-only."""
    from process_data.synthetic import make_demo_scene

    keys = dict(o.split("=", 1) for o in tiny_overrides(demo=True))
    scene = str(tmp_path_factory.mktemp("demo") / "scene")
    return make_demo_scene(scene, n_views=int(keys["dataset.n_views"]), width=int(keys["dataset.width"]),
                           height=int(keys["dataset.height"]))


@pytest.fixture(scope="session")
def demo_run(demo_scene, tmp_path_factory) -> DemoRun:
    """ONE tiny `run.py --train` of the demo scene for every module that looks at a finished
    run (test_outputs, test_viewer): validation every 3 steps, the test stage at the end (held-out
    metrics, orbit video, mesh as .ply and .obj, textured export), and the live viewer on
    (refreshed every 3 steps), which keeps serving after training until Ctrl-C. Read-only:
    DemoRun.copy() gives a copy to change."""
    overrides = tiny_overrides(
        f"dataset.root_dir={demo_scene}", "trainer.val_every=3", "export.formats=[ply,obj]",
        "export.texture=true", "export.texture_size=256", "export.texture_faces=1000", demo=True,
    )
    runs = tmp_path_factory.mktemp("demo_run") / "runs"
    process, lines = start_run_py(["--train", "--outputs_dir", str(runs), *overrides, "viewer.enabled=true",
                                   "viewer.port=0", "viewer.refresh_every=3", "viewer.mesh_resolution=32"])
    log = []
    try:
        wait_for_line(process, lines, log, "viewer: serving", timeout=1500)
    finally:
        output = stop_run_py(process, lines, log)
    assert process.returncode == 0, output[-3000:]
    (trial,) = glob.glob(str(runs / "neus-demo-scene" / "*"))
    return DemoRun(demo_scene, trial, output, overrides)
