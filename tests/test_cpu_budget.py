"""The up-front warning for a GPU-sized config trained on a CPU."""
import os

from systems.cpu_budget import cpu_sized_variant, estimated_cpu_seconds, gpu_config_on_cpu_warning
from utils.config import load_config

CONFS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "confs")


def test_estimate_is_proportional_to_samples_steps_and_levels():
    config = load_config(os.path.join(CONFS, "neus-dtu-wmask-cpu.yaml"))
    # 2500 steps x 16384 samples x 0.254 s / 16384 samples (12 levels, 2 threads) = 635 s
    assert abs(estimated_cpu_seconds(config, threads=2) - 635.0) < 1e-6
    assert abs(estimated_cpu_seconds(config, threads=4) - 317.5) < 1e-6  # 635 x 2 / 4 threads


def test_gpu_config_on_cpu_warns_with_time_and_cpu_variant():
    path = os.path.join(CONFS, "neus-dtu.yaml")
    config = load_config(path)
    # 20000 steps x 262144 samples x 16/12 levels: 20000 x 16 x 0.254 x 4/3 s = 30.1 h
    warning = gpu_config_on_cpu_warning(config, path, "cpu", threads=2)
    assert warning is not None and "\n" not in warning
    assert "30.1 h" in warning
    assert warning.endswith("Going ahead as asked (Ctrl-C stops with a checkpoint).")
    assert os.path.join(CONFS, "neus-dtu-cpu.yaml") in warning


def test_no_warning_for_cpu_config_or_on_cuda():
    cpu_path = os.path.join(CONFS, "neus-dtu-wmask-cpu.yaml")
    assert gpu_config_on_cpu_warning(load_config(cpu_path), cpu_path, "cpu", threads=2) is None
    gpu_path = os.path.join(CONFS, "neus-dtu-wmask.yaml")
    assert gpu_config_on_cpu_warning(load_config(gpu_path), gpu_path, "cuda", threads=2) is None


def test_cpu_variant_lookup():
    assert cpu_sized_variant(os.path.join(CONFS, "neus-dtu-wmask.yaml")) == os.path.join(CONFS, "neus-dtu-wmask-cpu.yaml")
    assert cpu_sized_variant(os.path.join(CONFS, "neus-dtu-wmask-cpu.yaml")) is None
    assert cpu_sized_variant(os.path.join(CONFS, "neus-blender.yaml")) is None
