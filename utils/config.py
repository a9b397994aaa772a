"""Config loading: YAML files + CLI overrides -> one resolved, validated OmegaConf tree.

A config file may build on another with a top-level `base: other.yaml` (a path relative to
the file), so a CPU-sized variant only lists what it changes. A section that names another
component than the base's (`dataset: {name: blender}` over a `dtu` base) replaces the base's
section instead of merging into it, since the two components have different keys. Command-line `key=value`
arguments are OmegaConf dot-list overrides applied last.

Every section is validated against the dataclass `Config` of the component it configures
(looked up in that family's registry), so a misspelt key or a value of the wrong type fails
at load with the valid keys listed, instead of deep inside a model twenty minutes later.
This module is the generic machinery and imports nothing of the project; the run's config
(which registry validates which section) is assembled in systems/config.py.
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Sequence, Type

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

# String choices shared by several components. OmegaConf checks a Literal field at load and
# names the valid values, so a typo stops the run before anything is built.
BackgroundColor = Literal["random", "white", "black"]
Precision = Literal["auto", "fp16-mixed", "fp32"]
MeshFormat = Literal["ply", "obj", "stl"]
# how a textured mesh is coloured (systems/texture.py): the training photos that see each point,
# the colour network along those photos' view directions, or the network seen head-on
TextureColour = Literal["photos", "network_views", "head_on"]


def valid_keys(schema: Type) -> List[str]:
    return [f.name for f in dataclasses.fields(schema)]


def parse_structured(schema: Type, raw: Any, path: str) -> DictConfig:
    """Merge `raw` onto the dataclass `schema`; unknown keys and bad types raise ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, (dict, DictConfig)):
        raise ConfigError(f"config section '{path}' must be a mapping, got {raw!r}")
    try:
        return parse_nested_components(schema, OmegaConf.merge(OmegaConf.structured(schema), raw), path)
    except ConfigKeyError as e:
        key = f"{path}.{e.full_key}" if path else str(e.full_key)
        sub = _schema_at(schema, str(e.full_key).split(".")[:-1])
        raise ConfigError(
            f"unknown config key '{key}'; valid keys here: {', '.join(valid_keys(sub))}"
        ) from None
    except ValidationError as e:
        key = f"{path}.{e.full_key}" if path else str(e.full_key)
        reason = str(e.msg).strip().splitlines()[0]  # OmegaConf appends full_key / object_type lines
        raise ConfigError(f"bad value for config key '{key}': {reason}") from None


def component_field(default: Dict[str, Any], parse: Callable[[Any, str], DictConfig]):
    """A config field holding another component's config, chosen by a key inside it (an
    encoding's `otype`): typed `Any` here, then parsed into that component's own dataclass by
    `parse(raw, path)` wherever it appears, without a list of paths."""
    return dataclasses.field(default_factory=lambda: dict(default), metadata={"parse": parse})


def parse_nested_components(schema: Type, node: DictConfig, path: str) -> DictConfig:
    """Replace every component_field of `schema` (at any depth) in `node` by its parsed config."""
    for f in dataclasses.fields(schema):
        key = f"{path}.{f.name}" if path else f.name
        if "parse" in f.metadata:
            node[f.name] = f.metadata["parse"](node[f.name], key)
        elif dataclasses.is_dataclass(f.type) and isinstance(node.get(f.name), DictConfig):
            parse_nested_components(f.type, node[f.name], key)
    return node


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


def to_primitive(conf: DictConfig) -> dict:
    return OmegaConf.to_container(conf, resolve=True)


def __getattr__(name: str):
    """load_config, validate and RunConfig moved to systems/config.py (the run's sections are
    the components' configs, and utils/ imports none of them); old imports still work."""
    if name in ("load_config", "validate", "RunConfig"):
        import importlib

        return getattr(importlib.import_module("systems.config"), name)
    raise AttributeError(f"module 'utils.config' has no attribute '{name}'")


class Configurable:
    """A component whose constructor takes a validated `Config` dataclass section."""

    Config: Type

    @classmethod
    def parse_config(cls, raw: Any, path: str) -> DictConfig:
        return parse_structured(cls.Config, raw, path)
