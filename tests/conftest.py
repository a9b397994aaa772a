import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multiprocess: starts several processes (torch.distributed on gloo); deselect with -m 'not multiprocess'"
    )


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
