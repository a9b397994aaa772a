"""Config loading: YAML files + CLI overrides -> one resolved, validated OmegaConf tree.

A config file may build on another with a top-level `base: other.yaml` (a path relative to
the file), so a CPU-sized variant only lists what it changes. A section that names another
component than the base's (`dataset: {name: blender}` over a `dtu` base) replaces the base's
section instead of merging into it, since the two components have different keys. Command-line `key=value`
arguments are OmegaConf dot-list overrides applied last.

Every section is validated against the dataclass `Config` of the component it configures
(looked up in that family's registry), so a misspelt key or a value of the wrong type fails
at load with the valid keys listed, instead of deep inside a model twenty minutes later.
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Type

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


def _register_resolvers() -> None:
    resolvers = {
        "calc_exp_lr_decay_rate": lambda factor, n: factor ** (1.0 / n),
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
        "idiv": lambda a, b: a // b,
        "basename": lambda p: os.path.basename(os.path.normpath(str(p))),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_resolver(name, fn)


_register_resolvers()


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


def valid_keys(schema: Type) -> List[str]:
    return [f.name for f in dataclasses.fields(schema)]


def parse_structured(schema: Type, raw: Any, path: str) -> DictConfig:
    """Merge `raw` onto the dataclass `schema`; unknown keys and bad types raise ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, (dict, DictConfig)):
        raise ConfigError(f"config section '{path}' must be a mapping, got {raw!r}")
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), raw)
    except ConfigKeyError as e:
        key = f"{path}.{e.full_key}" if path else str(e.full_key)
        sub = _schema_at(schema, str(e.full_key).split(".")[:-1])
        raise ConfigError(
            f"unknown config key '{key}'; valid keys here: {', '.join(valid_keys(sub))}"
        ) from None
    except ValidationError as e:
        key = f"{path}.{e.full_key}" if path else str(e.full_key)
        raise ConfigError(f"bad value for config key '{key}': {e.msg}") from None


def _schema_at(schema: Type, keys: Sequence[str]) -> Type:
    """The dataclass that holds the last key of a dotted path (for error messages)."""
    for key in keys:
        types = {f.name: f.type for f in dataclasses.fields(schema)}
        sub = types.get(key)
        if not dataclasses.is_dataclass(sub):
            break
        schema = sub
    return schema


def load_yaml_chain(path: str, _seen: tuple = ()) -> DictConfig:
    """Load `path`, first merging the file its `base:` key names (recursively)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if path in _seen:
        raise ConfigError(f"config files include each other in a cycle: {' -> '.join(_seen + (path,))}")
    try:
        conf = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    base = conf.pop("base", None)
    if base is None:
        return conf
    base_conf = load_yaml_chain(os.path.join(os.path.dirname(path), str(base)), _seen + (path,))
    for key in list(conf.keys()):
        if _names_another_component(conf.get(key), base_conf.get(key)):
            base_conf.pop(key)  # another component has other keys: its section replaces the base's
    return OmegaConf.merge(base_conf, conf)


def _names_another_component(section: Any, base_section: Any) -> bool:
    """Whether a file's section names a different component (dataset.name: blender over dtu)."""
    return (
        isinstance(section, DictConfig) and isinstance(base_section, DictConfig)
        and "name" in section and "name" in base_section and section.name != base_section.name
    )


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise ConfigError(
            f"cannot read argument(s) {' '.join(bad)}: overrides are written key=value "
            "(for example trainer.max_steps=1000)"
        )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read overrides {list(overrides)}: {e}") from None


def validate(raw: DictConfig) -> DictConfig:
    """Check every section against its component's dataclass and resolve interpolations."""
    # Imported here: the component packages import utils, not the other way round.
    from models import MODELS
    from process_data import DATASETS
    from systems import SYSTEMS, ExportConfig, TrainerConfig
    from systems.viewer import ViewerConfig

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


def to_primitive(conf: DictConfig) -> dict:
    return OmegaConf.to_container(conf, resolve=True)


class Configurable:
    """A component whose constructor takes a validated `Config` dataclass section."""

    Config: Type

    @classmethod
    def parse_config(cls, raw: Any, path: str) -> DictConfig:
        return parse_structured(cls.Config, raw, path)
