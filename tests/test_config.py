import os

import pytest

from tests.conftest import ROOT
from utils.config import ConfigError, load_config

CPU_CONFIG = os.path.join(ROOT, "confs", "neus-dtu-wmask-cpu.yaml")


def test_cpu_config_builds_on_gpu_config_and_resolves():
    config = load_config(CPU_CONFIG, ["dataset.root_dir=/data/scan24"])
    assert config.name == "neus-dtu-scan24"
    assert config.dataset.img_downscale == 4.0  # from the CPU file
    assert config.model.geometry.xyz_encoding.n_levels == 12  # CPU file overrides the base
    assert config.model.geometry.n_neurons == 64  # inherited from the base file
    # gamma = 0.1 ** (1 / (max_steps - decay_start))
    expected = 0.1 ** (1.0 / (config.trainer.max_steps - config.system.scheduler.decay_start))
    assert config.system.scheduler.gamma == pytest.approx(expected)


def test_override_changes_value_and_interpolations_follow():
    config = load_config(CPU_CONFIG, ["trainer.max_steps=1500", "system.scheduler.decay_start=500"])
    assert config.trainer.max_steps == 1500
    assert config.system.scheduler.gamma == pytest.approx(0.1 ** (1.0 / 1000))


def test_misspelt_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(CPU_CONFIG, ["trainer.max_step=10"])
    message = str(err.value)
    assert "trainer.max_step" in message and "max_steps" in message and "val_every" in message


def test_misspelt_nested_encoding_key_is_caught():
    with pytest.raises(ConfigError) as err:
        load_config(CPU_CONFIG, ["model.geometry.xyz_encoding.n_level=4"])
    assert "n_levels" in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(CPU_CONFIG, ["trainer.max_steps=lots"])
    assert "trainer.max_steps" in str(err.value)
