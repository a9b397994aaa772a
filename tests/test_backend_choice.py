"""Which backends run, chosen once at start-up: auto is the C++ hash grid (or torch where it does
not build) and the torch sampler on CPU (logged once and recorded),
the built components run what was recorded, CUDA-only requests are refused on CPU naming the
key and the fix, and on a CUDA device (availability checks faked) the choice follows what is
installed."""
import os

import pytest
import torch
import yaml

import encoder.hashgrid
import models.occupancy
from encoder.hashgrid import CPP_BUILD, TCNN_INSTALL, choose_backend, cpp_build_error
from models.occupancy import choose_occupancy_backend, nerfacc_cuda_error
from models.rendering import NERFACC_OPS, TORCH_OPS
from systems.backends import choose_precision
from tests.test_cuda_backends import CUDA
from tests.test_reliability import TINY, assert_refused_at_start_up, build_system, run_main
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError

def trial_dir(outputs) -> str:
    (path,) = [d for d, _, files in os.walk(outputs) if "train.log" in files]
    return path


def test_auto_on_cpu_is_logged_once_and_recorded(scene, tmp_path, capsys):
    outputs = tmp_path / "outputs"
    code, err = run_main(capsys, "--train", "--outputs_dir", str(outputs), f"dataset.root_dir={scene}", *TINY,
                         "trainer.max_steps=2")
    assert code == 0, err[-3000:]
    grid = "cpp" if cpp_build_error() is None else "torch"
    expected = {"model.geometry.xyz_encoding.backend": grid, "model.texture.xyz_encoding.backend": grid,
                "model.sampler.backend": "torch", "trainer.precision": "fp32"}
    trial = trial_dir(outputs)
    with open(os.path.join(trial, "config", "backends.yaml")) as f:
        assert yaml.safe_load(f) == expected
    line = (f"backends: model.geometry.xyz_encoding.backend={grid}, model.texture.xyz_encoding.backend={grid}, "
            "model.sampler.backend=torch, trainer.precision=fp32")
    assert [ln for ln in err.splitlines() if "backends:" in ln] == [ln for ln in err.splitlines() if line in ln]
    assert len([ln for ln in err.splitlines() if "backends:" in ln]) == 1
    with open(os.path.join(trial, "train.log")) as f:
        assert line in f.read()
    state = load_checkpoint(os.path.join(trial, "ckpt", "ckpt_000002.pth"))  # weights_only
    assert state["backends"] == expected and state["grad_scaler"] == {}


def test_built_components_run_what_was_recorded(scene, tmp_path):
    system = build_system(scene, tmp_path, "model.background.enabled=true")
    model = system.model
    assert system.backends["model.background.xyz_encoding.backend"] == model.background.encoding.backend
    assert system.backends["model.geometry.xyz_encoding.backend"] == model.geometry.encoding.backend
    assert system.backends["model.texture.xyz_encoding.backend"] == model.texture.encoding.backend
    assert system.backends["model.sampler.backend"] == model.occupancy.backend
    assert model.packed is (NERFACC_OPS if model.occupancy.backend == "nerfacc" else TORCH_OPS)
    assert system.mixed_precision == (system.backends["trainer.precision"] == "fp16-mixed")


REFUSED = {
    # overrides: what the one-line message must say
    "tcnn": (["model.geometry.xyz_encoding.backend=tcnn"],
             ["config error:", "model.geometry.xyz_encoding.backend", "'tcnn'", "device is cpu", TCNN_INSTALL,
              "or set backend: torch"]),
    "background_tcnn": (["model.background.enabled=true", "model.background.xyz_encoding.backend=tcnn"],
                        ["config error:", "model.background.xyz_encoding.backend", "'tcnn'", TCNN_INSTALL,
                         "or set backend: torch"]),
    "nerfacc": (["model.sampler.backend=nerfacc"],
                ["config error:", "model.sampler.backend", "'nerfacc'", "device is cpu", "set backend: torch"]),
    "fp16": (["trainer.precision=fp16-mixed"], ["config error:", "trainer.precision", "needs CUDA", "auto or fp32"]),
    "cuda_device": (["device=cuda"], ["config error:", "CUDA is not available", "device=auto or cpu"]),
    "typo": (["model.sampler.backend=nerfac"], ["config error:", "model.sampler.backend", "['auto', 'torch', 'nerfacc']"]),
    "bad_precision": (["trainer.precision=half"], ["config error:", "trainer.precision", "['auto', 'fp16-mixed', 'fp32']"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_cuda_only_requests_are_refused_at_start_up_on_cpu(case, scene, tmp_path, capsys):
    """TINY runs on device=cpu, so these are refused on any machine (device=cuda only without CUDA)."""
    if case == "cuda_device" and CUDA:
        pytest.skip("CUDA is available here: device=cuda is a valid request")
    overrides, expected = REFUSED[case]
    outputs = tmp_path / "outputs"
    code, err = run_main(capsys, "--train", "--outputs_dir", str(outputs), f"dataset.root_dir={scene}", *TINY,
                         *overrides)
    assert_refused_at_start_up(code, err, expected, outputs)


def test_choices_on_a_cuda_device_follow_what_is_installed(monkeypatch):
    """The choosers' logic for a CUDA device, with the availability checks faked (nothing touches
    CUDA): auto takes a CUDA backend only when it can run, explicit requests say what is missing."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(encoder.hashgrid, "tcnn_import_error", lambda: "ImportError: No module named 'tinycudann'")
    assert choose_backend("auto", cuda) == "torch"
    with pytest.raises(ConfigError) as error:
        choose_backend("tcnn", cuda)
    for part in ("No module named 'tinycudann'", TCNN_INSTALL, "CUDA toolkit", "or set backend: torch"):
        assert part in str(error.value)
    monkeypatch.setattr(encoder.hashgrid, "tcnn_import_error", lambda: None)
    assert choose_backend("auto", cuda) == choose_backend("tcnn", cuda) == "tcnn"
    assert choose_backend("torch", cuda) == "torch"

    monkeypatch.setattr(models.occupancy, "nerfacc_cuda_error", lambda: "no CUDA toolkit (nvcc)")
    assert choose_occupancy_backend("auto", cuda) == "torch"
    with pytest.raises(ConfigError, match="no CUDA toolkit.*or set backend: torch"):
        choose_occupancy_backend("nerfacc", cuda)
    monkeypatch.setattr(models.occupancy, "nerfacc_cuda_error", lambda: None)
    assert choose_occupancy_backend("auto", cuda) == choose_occupancy_backend("nerfacc", cuda) == "nerfacc"

    assert choose_precision("auto", cuda) == choose_precision("fp16-mixed", cuda) == "fp16-mixed"
    assert choose_precision("auto", torch.device("cpu")) == choose_precision("fp32", cuda) == "fp32"


def test_the_cpp_hash_grid_runs_on_cpu_where_it_builds(monkeypatch):
    """auto takes cpp on a CPU device when the C++ kernels build, torch when they do not (faked);
    an explicit cpp on CUDA, or where it cannot build, is refused saying why; auto on CUDA never
    takes cpp."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(encoder.hashgrid, "cpp_build_error", lambda: None)
    assert choose_backend("auto", cpu) == choose_backend("cpp", cpu) == "cpp"
    assert choose_backend("torch", cpu) == "torch"
    monkeypatch.setattr(encoder.hashgrid, "tcnn_import_error", lambda: "ImportError: No module named 'tinycudann'")
    assert choose_backend("auto", cuda) == "torch"
    with pytest.raises(ConfigError, match="'cpp' runs C\\+\\+ CPU kernels, but this run's device is cuda"):
        choose_backend("cpp", cuda)
    monkeypatch.setattr(encoder.hashgrid, "cpp_build_error", lambda: "RuntimeError: Ninja is required")
    assert choose_backend("auto", cpu) == "torch"
    with pytest.raises(ConfigError) as error:
        choose_backend("cpp", cpu)
    for part in ("'cpp'", "Ninja is required", CPP_BUILD, "or set backend: torch"):
        assert part in str(error.value)


def test_an_unbuildable_cpp_request_is_refused_at_start_up(monkeypatch, scene, tmp_path, capsys):
    monkeypatch.setattr(encoder.hashgrid, "cpp_build_error", lambda: "RuntimeError: no compiler")
    outputs = tmp_path / "outputs"
    code, err = run_main(capsys, "--train", "--outputs_dir", str(outputs), f"dataset.root_dir={scene}", *TINY,
                         "model.geometry.xyz_encoding.backend=cpp")
    assert_refused_at_start_up(code, err, ["config error:", "model.geometry.xyz_encoding.backend", "'cpp'",
                                           "no compiler", CPP_BUILD, "or set backend: torch"], outputs)


def test_nerfacc_availability_names_what_is_missing(monkeypatch):
    """No prebuilt extension: building needs nvcc, ninja and nvcc of torch's CUDA major version."""
    monkeypatch.setattr(models.occupancy.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(models.occupancy.shutil, "which", lambda name: None)
    assert "no CUDA toolkit (nvcc)" in nerfacc_cuda_error()
    monkeypatch.setattr(models.occupancy.shutil, "which", lambda name: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(models.occupancy, "is_ninja_available", lambda: False)
    assert "ninja, which is not installed: pip install ninja" in nerfacc_cuda_error()
    monkeypatch.setattr(models.occupancy, "is_ninja_available", lambda: True)
    monkeypatch.setattr(models.occupancy, "nvcc_cuda_version", lambda: "12.4")
    monkeypatch.setattr(models.occupancy.torch.version, "cuda", "13.0")
    assert "(nvcc 12.4) does not match torch's CUDA 13.0" in nerfacc_cuda_error()
    monkeypatch.setattr(models.occupancy, "nvcc_cuda_version", lambda: "13.1")
    assert nerfacc_cuda_error() is None
