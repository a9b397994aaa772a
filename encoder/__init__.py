"""Input encodings: frequency (NeRF), spherical harmonics, multiresolution hash grid.

`get_encoding(config, in_channels)` builds the encoding its `otype` names; its config has
already been validated by `parse_encoding_config` when the run's config was loaded.
"""
from typing import Any

from omegaconf import DictConfig
from torch import nn

from encoder import frequency, hashgrid, spherical  # noqa: F401  (they register themselves)
from encoder.registry import ENCODINGS
from utils.config import ConfigError, component_field


def parse_encoding_config(raw: Any, path: str) -> DictConfig:
    if raw is None or "otype" not in raw:
        raise ConfigError(f"encoding '{path}' needs an 'otype'; valid: {', '.join(ENCODINGS.names())}")
    try:
        cls = ENCODINGS.get(raw["otype"])
    except KeyError as e:
        raise ConfigError(f"{path}.otype: {e.args[0]}") from None
    return cls.parse_config(raw, path)


def encoding_field(default: dict):
    """A config field holding an encoding's config, validated by the class its `otype` names."""
    return component_field(default, parse_encoding_config)


def get_encoding(config: DictConfig, in_channels: int = 3) -> nn.Module:
    """The encoding `config.otype` names, on the backend its config holds (resolved at start-up)."""
    return ENCODINGS.get(config.otype)(config, in_channels)
