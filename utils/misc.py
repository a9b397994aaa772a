"""Seeds, RNG state (for exact resume), device choice and out-of-memory-safe chunking."""
import logging
import os
import random
import time
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import numpy as np
import torch

from utils.config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


_IMPORTED_AT = time.monotonic()


def process_age() -> float:
    """Seconds since this process started: the wall clock of the command, interpreter start-up
    and imports included (Linux's /proc; elsewhere, since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


def seed_everything(seed: int) -> None:
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def get_rng_state() -> Dict[str, object]:
    """All RNG states as tensors and plain values, so a checkpoint loads with weights_only."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((3, tuple(python[:-1]), python[-1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{requested}' asked for but CUDA is not available; use device=auto or cpu")
    return device


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator failing."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def map_in_chunks(fn: Callable[[int, int], T], n: int, chunk: int, what: str) -> Tuple[List[T], int]:
    """fn(start, stop) over [0, n) in ranges of `chunk`. Out of memory halves the chunk and
    retries the same range (down to 1), so evaluation survives a too-large chunk setting.
    -> the results in order, and the chunk size that worked (for the next call)"""
    results, start = [], 0
    while start < n:
        stop = min(start + chunk, n)
        try:
            results.append(fn(start, stop))
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_out_of_memory(e) or chunk == 1:
                raise
            chunk = max(chunk // 2, 1)
            log.warning("out of memory %s: retrying in chunks of %d", what, chunk)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop
    return results, chunk


def choose_cuda_backend(
    requested: str,
    device: torch.device,
    component: str,
    cuda_backend: str,
    why_unavailable: Callable[[], Optional[str]],
    not_cuda_message: str,
    unavailable_message: Callable[[str], str],
) -> str:
    """auto | torch | cuda_backend -> what runs. The CUDA backend runs only on a CUDA device where
    why_unavailable() is None; auto then falls back to torch, while an explicit request that
    cannot run raises ConfigError with not_cuda_message (not a CUDA device) or
    unavailable_message(reason)."""
    if requested == "torch":
        return "torch"
    if requested not in ("auto", cuda_backend):
        raise ConfigError(f"{component} backend must be auto, torch or {cuda_backend}, got '{requested}'")
    reason = None if device.type == "cuda" else "no CUDA"
    if reason is None:
        reason = why_unavailable()
    if reason is None:
        return cuda_backend
    if requested == "auto":
        return "torch"
    raise ConfigError(not_cuda_message if device.type != "cuda" else unavailable_message(reason))
