"""The run's config: YAML files + CLI overrides -> one resolved config whose every section
is validated by the component it names (dataset, model and system by their registries,
trainer and export by their dataclasses). The generic machinery is utils/config.py."""
from dataclasses import dataclass
from typing import Any, Dict, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models import MODELS
from process_data import DATASETS
from systems.export import ExportConfig
from systems.registry import SYSTEMS
from systems.trainer import TrainerConfig
from systems.viewer import ViewerConfig
from utils.config import ConfigError, load_yaml_chain, parse_overrides, parse_structured


@dataclass
class RunConfig:
    """Top-level keys. Sections are validated by the component each one names."""

    name: str = "${model.name}-${dataset.name}-${basename:${dataset.root_dir}}"
    tag: str = ""
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dataset: Any = None
    model: Any = None
    system: Any = None
    trainer: Any = None
    export: Any = None
    viewer: Any = None


def validate(raw: DictConfig) -> DictConfig:
    """Check every section against its component's dataclass and resolve interpolations."""
    # the named sections first: an unknown name is the error to report, not what follows from it
    named = {
        "dataset": _parse_named(DATASETS, raw.get("dataset"), "dataset"),
        "model": _parse_named(MODELS, raw.get("model"), "model"),
        "system": _parse_named(SYSTEMS, raw.get("system"), "system"),
    }
    top = parse_structured(RunConfig, raw, "")
    sections: Dict[str, Any] = {k: top[k] for k in ("name", "tag", "seed", "device")}
    sections.update(named)
    sections["trainer"] = parse_structured(TrainerConfig, raw.get("trainer"), "trainer")
    sections["export"] = parse_structured(ExportConfig, raw.get("export"), "export")
    sections["viewer"] = parse_structured(ViewerConfig, raw.get("viewer"), "viewer")
    conf = OmegaConf.create(sections)
    try:
        OmegaConf.resolve(conf)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve config: {e}") from None
    OmegaConf.set_struct(conf, True)
    return conf


def _parse_named(registry, raw: Any, path: str) -> DictConfig:
    if raw is None or "name" not in raw:
        raise ConfigError(f"config section '{path}' needs a 'name'; valid names: {', '.join(registry.names())}")
    try:
        cls = registry.get(raw["name"])
    except KeyError as e:
        raise ConfigError(f"{path}.name: {e.args[0]}") from None
    return cls.parse_config(raw, path)


def load_config(config_file: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved, validated config of `config_file` with `overrides` applied."""
    raw = OmegaConf.merge(load_yaml_chain(config_file), parse_overrides(overrides))
    return validate(raw)
