import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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
