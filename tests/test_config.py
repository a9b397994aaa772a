import os

import pytest

from tests.conftest import ROOT
from systems.config import load_config
from utils.config import ConfigError

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


# --- resolvers and `base:` chaining through files written to tmp_path ----------------------


def write_yaml(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def chained_configs(tmp_path):
    """base.yaml builds on the CPU config and uses every resolver; child.yaml builds on
    base.yaml (a relative `base:`) and overrides one key that the interpolations read."""
    base = write_yaml(
        tmp_path / "base.yaml",
        f"""base: {CPU_CONFIG}
name: run-${{basename:${{dataset.root_dir}}}}
dataset:
  root_dir: /data/scans/scan37/
model:
  render_step_size: ${{div:2.0,128}}
trainer:
  max_steps: ${{add:1000,500}}
  train_num_rays: ${{mul:128,4}}
  log_every: ${{idiv:${{trainer.max_steps}},7}}
system:
  scheduler:
    decay_start: ${{sub:${{trainer.max_steps}},1000}}
    gamma: ${{calc_exp_lr_decay_rate:0.01,${{sub:${{trainer.max_steps}},${{system.scheduler.decay_start}}}}}}
""",
    )
    child = write_yaml(tmp_path / "child.yaml", "base: base.yaml\ntrainer:\n  max_steps: 3000\n")
    return base, child


def test_every_resolver_in_a_base_file(chained_configs):
    """add, sub, mul, div, idiv, basename and calc_exp_lr_decay_rate resolve to hand values."""
    base, _ = chained_configs
    config = load_config(base)
    assert config.name == "run-scan37"  # basename of /data/scans/scan37/ (trailing slash dropped)
    assert config.trainer.max_steps == 1500  # add: 1000 + 500
    assert config.trainer.train_num_rays == 512  # mul: 128 * 4
    assert config.model.render_step_size == 0.015625  # div: 2 / 128
    assert config.trainer.log_every == 214  # idiv: 1500 // 7
    assert config.system.scheduler.decay_start == 500  # sub: 1500 - 1000
    assert config.system.scheduler.gamma == pytest.approx(0.01 ** (1.0 / 1000))  # 0.995405...
    assert config.system.scheduler.gamma == pytest.approx(0.9954054173515269)
    # inherited untouched through two files: the GPU base, then the CPU file
    assert config.model.geometry.n_neurons == 64
    assert config.model.geometry.xyz_encoding.n_levels == 12


def test_child_override_flows_through_interpolations(chained_configs):
    """A child overriding trainer.max_steps changes every value derived from it in its bases."""
    _, child = chained_configs
    config = load_config(child)
    assert config.trainer.max_steps == 3000
    assert config.trainer.log_every == 428  # 3000 // 7
    assert config.system.scheduler.decay_start == 2000  # 3000 - 1000
    assert config.system.scheduler.gamma == pytest.approx(0.01 ** (1.0 / 1000))
    assert config.trainer.train_num_rays == 512  # not derived from max_steps: unchanged
    assert config.name == "run-scan37"


def test_command_line_override_beats_child_file(chained_configs):
    """Overrides apply after the whole chain: the last word on max_steps and its derivatives."""
    _, child = chained_configs
    config = load_config(child, ["trainer.max_steps=1100", "dataset.root_dir=/x/scan105"])
    assert config.trainer.log_every == 157  # 1100 // 7
    assert config.system.scheduler.decay_start == 100
    assert config.name == "run-scan105"


def test_base_cycle_is_reported(tmp_path):
    """Two files naming each other as base raise ConfigError instead of recursing forever."""
    write_yaml(tmp_path / "a.yaml", "base: b.yaml\nseed: 1\n")
    write_yaml(tmp_path / "b.yaml", "base: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_missing_base_file_names_the_path(tmp_path):
    child = write_yaml(tmp_path / "child.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert str(tmp_path / "nowhere.yaml") in str(err.value)


def test_unknown_top_level_section_lists_valid_sections(tmp_path):
    """A misspelt section name ('trainr') fails at load with the valid top-level keys."""
    child = write_yaml(tmp_path / "child.yaml", f"base: {CPU_CONFIG}\ntrainr:\n  max_steps: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    message = str(err.value)
    assert "trainr" in message
    for name in ("name", "seed", "device", "dataset", "model", "system", "trainer", "export"):
        assert name in message


def test_unknown_dataset_name_lists_registered_datasets(tmp_path):
    child = write_yaml(tmp_path / "child.yaml", f"base: {CPU_CONFIG}\ndataset:\n  name: llff\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    message = str(err.value)
    assert "dataset.name" in message and "'llff'" in message and "valid names: blender, colmap, demo, dtu" in message


def test_unknown_encoding_otype_lists_registered_encodings(tmp_path):
    child = write_yaml(
        tmp_path / "child.yaml",
        f"base: {CPU_CONFIG}\nmodel:\n  geometry:\n    xyz_encoding:\n      otype: Hashgrid\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(child)
    message = str(err.value)
    assert "model.geometry.xyz_encoding.otype" in message and "'Hashgrid'" in message
    assert "valid names: Frequency, HashGrid, SphericalHarmonics" in message


def test_cos_anneal_schedule_by_hand():
    """Without knots r = min(1, step / steps) (1 when steps <= 0); with knots, piecewise linear:
    [[0, 0], [100, 0.5], [120, 1]] gives 0.25 at step 50, 0.75 at step 110, 1 after step 120."""
    from models.neus import cos_anneal_ratio

    assert cos_anneal_ratio(50, 200, []) == 0.25
    assert cos_anneal_ratio(500, 200, []) == 1.0
    assert cos_anneal_ratio(0, 0, []) == 1.0
    knots = [[0, 0.0], [100, 0.5], [120, 1.0]]
    got = [cos_anneal_ratio(step, 999, knots) for step in (0, 50, 100, 110, 120, 500)]
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_cos_anneal_knots_are_checked_at_build():
    from models.neus import check_anneal_knots

    check_anneal_knots([[0, 0.0], [10, 1.0]])
    with pytest.raises(ConfigError, match=r"cos_anneal_knots\[1\].*ratio in \[0, 1\]"):
        check_anneal_knots([[0, 0.0], [10, 1.5]])
    with pytest.raises(ConfigError, match="steps must increase"):
        check_anneal_knots([[10, 0.0], [5, 1.0]])


def test_cpu_configs_take_the_cos_anneal_to_0_9_over_the_last_tenth():
    """The DTU CPU configs, masked and not, and the own-photos one: ratio 0.45 at 90% of the run,
    0.9 at the end; with the knots emptied, the half anneal (cos_anneal_steps = 2 max_steps)."""
    from models.neus import cos_anneal_ratio

    masked = load_config(CPU_CONFIG, ["trainer.max_steps=1000"]).model
    assert masked.cos_anneal_knots == [[0.0, 0.0], [900.0, 0.45], [1000.0, 0.9]]
    assert cos_anneal_ratio(950, masked.cos_anneal_steps, masked.cos_anneal_knots) == pytest.approx(0.675)
    assert cos_anneal_ratio(1000, masked.cos_anneal_steps, masked.cos_anneal_knots) == pytest.approx(0.9)
    unmasked = load_config(os.path.join(ROOT, "confs", "neus-dtu-cpu.yaml"), ["trainer.max_steps=1000"]).model
    assert unmasked.cos_anneal_knots == masked.cos_anneal_knots
    custom = load_config(os.path.join(ROOT, "confs", "neus-custom.yaml"), ["trainer.max_steps=1000"]).model
    assert custom.cos_anneal_knots == masked.cos_anneal_knots
    half = load_config(CPU_CONFIG, ["trainer.max_steps=1000", "model.cos_anneal_knots=[]"]).model
    assert cos_anneal_ratio(1000, half.cos_anneal_steps, half.cos_anneal_knots) == 0.5


def test_foreground_radius_of_the_configs():
    """Masked: the cube [-1, 1]^3. DTU without masks: the sphere of radius 2 (the objects reach
    beyond the unit sphere, scan 24's tower to 1.6); own photos: 1.5, either loader (the automatic
    region is centred at the object's front)."""
    radius = {name: load_config(os.path.join(ROOT, "confs", name), []).model.radius
              for name in ("neus-dtu-wmask-cpu.yaml", "neus-dtu-cpu.yaml", "neus-dtu.yaml", "neus-custom.yaml",
                           "neus-colmap.yaml")}
    assert radius == {"neus-dtu-wmask-cpu.yaml": 1.0, "neus-dtu-cpu.yaml": 2.0, "neus-dtu.yaml": 2.0,
                      "neus-custom.yaml": 1.5, "neus-colmap.yaml": 1.5}
