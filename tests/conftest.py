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
