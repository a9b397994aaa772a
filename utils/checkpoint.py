"""Checkpoints: written atomically, loaded with weights_only (they hold no code), found again
from a trial folder or `last`, and pruned to the newest few."""
import glob
import logging
import os
import re
import tempfile
from typing import Any, Dict, List, Optional

import torch

CHECKPOINT_VERSION = 2  # 2: schedules in the model state, lr_scale and NaN-guard counters
CHECKPOINT_PATTERN = re.compile(r"ckpt_(\d{6,})\.pth$")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and why."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:06d}.pth"


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash
    mid-write leaves the previous checkpoints intact and never a half-written one."""
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
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict) or "version" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this framework (no version field)")
    if state["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['version']}; this code reads version {CHECKPOINT_VERSION}"
        )
    return state


def checkpoints_in(folder: str) -> List[str]:
    """The ckpt_<step>.pth files of a folder, oldest step first."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(folder, "ckpt_*.pth"))
             if (m := CHECKPOINT_PATTERN.search(os.path.basename(p)))]
    return [p for _, p in sorted(found)]


def step_of(path: str) -> int:
    match = CHECKPOINT_PATTERN.search(os.path.basename(path))
    return int(match.group(1)) if match else -1


def newest_loadable(paths: List[str]) -> Optional[str]:
    """The newest of `paths` that loads; each one skipped is logged with its reason."""
    for path in reversed(paths):
        try:
            load_checkpoint(path)
            return path
        except CheckpointError as e:
            log.warning("skipping %s", e)
    return None


def resolve_resume(resume: str, runs_dir: str) -> str:
    """--resume argument -> a checkpoint file. It may be a checkpoint file, a trial folder (or
    its ckpt/ folder), whose newest loadable checkpoint is taken, or `last`: the newest trial
    under runs_dir (<outputs_dir>/<name>) that has a loadable checkpoint."""
    if resume == "last":
        trials = sorted(glob.glob(os.path.join(runs_dir, "*", "ckpt")), key=os.path.getmtime)
        for ckpt_dir in reversed(trials):
            path = newest_loadable(checkpoints_in(ckpt_dir))
            if path is not None:
                return path
        raise CheckpointError(f"--resume last: no loadable checkpoint under {runs_dir}/*/ckpt/")
    if os.path.isdir(resume):
        ckpt_dir = os.path.join(resume, "ckpt") if os.path.isdir(os.path.join(resume, "ckpt")) else resume
        paths = checkpoints_in(ckpt_dir)
        if not paths:
            raise CheckpointError(f"--resume {resume}: no ckpt_<step>.pth files in {ckpt_dir}")
        path = newest_loadable(paths)
        if path is None:
            raise CheckpointError(f"--resume {resume}: none of the {len(paths)} checkpoints in {ckpt_dir} loads")
        return path
    if not os.path.exists(resume):
        raise CheckpointError(f"--resume {resume}: no such checkpoint file or trial folder")
    load_checkpoint(resume)
    return resume


def prune_checkpoints(folder: str, keep_last: int, keep_step: int) -> List[str]:
    """Delete all but the newest `keep_last` checkpoints (0: keep all); the one at `keep_step`
    (the final step) always stays. -> the removed paths"""
    if keep_last <= 0:
        return []
    paths = checkpoints_in(folder)
    removed = [p for p in paths[:-keep_last] if step_of(p) != keep_step]
    for path in removed:
        os.remove(path)
    return removed
