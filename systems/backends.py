"""Which backend every component runs on, and at which precision: chosen once at start-up from
the config and the device, so that an impossible request fails before anything is written and
names its config key, and the run can log and record what it used.

Components with a `backend` key are found by their config dataclass (OmegaConf keeps it on
each validated section): hash grids (`torch | tcnn`) and the occupancy sampler (`torch |
nerfacc`, which also picks the packed rendering ops). A section with `enabled: false` builds
nothing and is skipped.
"""
from typing import Dict, Iterator, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from encoder.hashgrid import HashGrid, choose_backend
from models.occupancy import OccupancyGrid, choose_occupancy_backend
from utils.config import ConfigError

CHOOSERS = {HashGrid.Config: choose_backend, OccupancyGrid.Config: choose_occupancy_backend}
PRECISIONS = ("auto", "fp16-mixed", "fp32")


def choose_precision(requested: str, device: torch.device) -> str:
    """trainer.precision -> fp16-mixed (float16 autocast + grad scaler) or fp32. auto: mixed on
    CUDA, fp32 elsewhere; fp16-mixed on a device without CUDA raises ConfigError."""
    if requested not in PRECISIONS:
        raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got '{requested}'")
    if requested == "auto":
        return "fp16-mixed" if device.type == "cuda" else "fp32"
    if requested == "fp16-mixed" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision: fp16-mixed (float16 autocast with a grad scaler) needs CUDA, but this run's "
            f"device is {device.type}; set trainer.precision: auto or fp32"
        )
    return requested


def _sections(node: DictConfig, path: str = "") -> Iterator[Tuple[str, DictConfig]]:
    """Every mapping in the config with its dotted path, depth first, skipping disabled ones."""
    if node.get("enabled") is False:
        return
    yield path, node
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig):
            yield from _sections(child, f"{path}.{key}" if path else str(key))


def resolve_backends(config: DictConfig, device: torch.device) -> Dict[str, str]:
    """{config key -> what runs}: '<section>.backend' of every component that has one, and
    'trainer.precision'. A request this device cannot serve raises ConfigError naming its key."""
    chosen = {}
    for path, section in _sections(config):
        chooser = CHOOSERS.get(OmegaConf.get_type(section))
        if chooser is None:
            continue
        key = f"{path}.backend"
        try:
            chosen[key] = chooser(section.backend, device)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    chosen["trainer.precision"] = choose_precision(config.trainer.precision, device)
    return chosen


def with_backends(config: DictConfig, chosen: Dict[str, str]) -> DictConfig:
    """A copy of the run's config with every '<section>.backend' set to what resolve_backends
    chose, to build the components from (they take their backend as given and choose nothing).
    The config itself keeps what was asked (`auto`), as parsed.yaml and checkpoints record it."""
    resolved = config.copy()
    for key, backend in chosen.items():
        if key.endswith(".backend"):
            OmegaConf.update(resolved, key, backend, merge=False)
    return resolved
