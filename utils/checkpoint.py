"""Checkpoints: written atomically, loaded with weights_only (they hold no code)."""
import os
import tempfile
from typing import Any, Dict

import torch

CHECKPOINT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:06d}.pth"


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": CHECKPOINT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise RuntimeError(f"checkpoint {path} is not a version-{CHECKPOINT_VERSION} checkpoint of this framework")
    return state
