"""Checkpoints move between the torch and tcnn hash-grid backends: a run trained with tcnn on a
GPU tests, meshes and resumes with the torch backend (a CPU machine), and back. The same holds
for the C++ CPU backend (cpp), tested at the end where its kernels build.

tinycudann needs CUDA, so here `FakeEncoding` stands in for `tinycudann.Encoding`: its interface
(a flat float32 `params` Parameter of tcnn's size, `n_output_dims`, a forward in the requested
dtype) computed by the torch reference on tcnn's flat layout. That runs HashGrid's tcnn branch
(the config it passes, the parameter copy, the band mask, the state-dict hooks) and the
system's checkpoints on any machine; the real tcnn is compared with torch in
test_cuda_backends.py where CUDA is.
"""
import dataclasses
import sys
import types

import pytest
import torch
from torch import nn

import encoder.hashgrid
import systems.backends
from encoder.hashgrid import HashGrid, cpp_build_error
from encoder.hashgrid_ops import GridLevels, hash_grid_encode, make_kernels
from tests.test_reliability import build_system
from utils.checkpoint import load_checkpoint


class FakeEncoding(nn.Module):
    """tinycudann.Encoding(n_input_dims, encoding_config, dtype) for HashGrid configs, on CPU."""

    def __init__(self, n_input_dims: int, encoding_config: dict, dtype: torch.dtype = torch.float16):
        super().__init__()
        c = encoding_config
        levels = GridLevels.build(c["n_levels"], c["base_resolution"], c["per_level_scale"], c["log2_hashmap_size"])
        self.n_features = c["n_features_per_level"]
        self.n_output_dims = c["n_levels"] * self.n_features
        self.encoding_config, self.dtype = dict(c), dtype
        # tcnn draws its own start values; HashGrid must overwrite them with its table
        self.params = nn.Parameter(torch.full(((levels.offsets[-1] + levels.sizes[-1]) * self.n_features,), 7.0))
        self.kernels = make_kernels(levels, compile=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hash_grid_encode(x, self.params.view(-1, self.n_features), self.kernels).to(self.dtype)


@pytest.fixture
def fake_tcnn(monkeypatch):
    """`import tinycudann` gives the fake, and an explicit `backend: tcnn` is granted on CPU (by the
    one start-up choice; the grids take the backend they are given)."""
    monkeypatch.setitem(sys.modules, "tinycudann", types.SimpleNamespace(Encoding=FakeEncoding))
    real_choice = encoder.hashgrid.choose_backend

    def choose(requested: str, device: torch.device) -> str:
        return "tcnn" if requested == "tcnn" else real_choice(requested, device)

    monkeypatch.setitem(systems.backends.CHOOSERS, HashGrid.Config, choose)


SIZES = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=9, base_resolution=3, per_level_scale=2.0)


def grid_pair(start_level: int = 4):
    """A torch and a tcnn grid drawn from the same seed (so with the same table)."""
    config = HashGrid.Config(backend="torch", start_level=start_level, **SIZES)
    torch.manual_seed(0)
    torch_grid = HashGrid(config, 3)
    torch.manual_seed(0)
    tcnn_grid = HashGrid(dataclasses.replace(config, backend="tcnn"), 3)
    return torch_grid, tcnn_grid


def test_the_tcnn_branch_passes_the_config_copies_the_table_and_masks_levels(fake_tcnn):
    torch_grid, tcnn_grid = grid_pair(start_level=2)
    fake = tcnn_grid.tcnn_encoding
    assert tcnn_grid.backend == "tcnn" and not hasattr(tcnn_grid, "table")
    assert fake.encoding_config == {"otype": "HashGrid", "interpolation": "Linear", **SIZES}
    assert fake.dtype == torch.float32  # the SDF's features stay float32
    torch.testing.assert_close(fake.params.detach().view(-1, 2), torch_grid.table.detach(), rtol=0, atol=0)
    x = torch.rand(50, 3)
    out = tcnn_grid(x)  # [50, 8]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch_grid(x), rtol=0, atol=0)
    assert out[:, 4:].abs().max() == 0 and out[:, :4].abs().max() > 0  # levels 2 and 3 not yet active


def test_both_backends_save_the_same_state_and_load_each_other(fake_tcnn):
    torch_grid, tcnn_grid = grid_pair()
    torch_state, tcnn_state = torch_grid.state_dict(), tcnn_grid.state_dict()
    assert sorted(tcnn_state) == sorted(torch_state) == ["current_level", "table"]
    for key in torch_state:
        torch.testing.assert_close(tcnn_state[key], torch_state[key], rtol=0, atol=0)

    x = torch.rand(50, 3)
    with torch.no_grad():
        tcnn_grid.tcnn_encoding.params.mul_(3.0).add_(1e-3)
    torch_grid.load_state_dict(tcnn_grid.state_dict())  # strict: no missing or unexpected key
    torch.testing.assert_close(torch_grid(x), tcnn_grid(x), rtol=0, atol=0)
    with torch.no_grad():
        torch_grid.table.mul_(-2.0)
    tcnn_grid.load_state_dict(torch_grid.state_dict())
    torch.testing.assert_close(tcnn_grid(x), torch_grid(x), rtol=0, atol=0)
    assert tcnn_grid(x).abs().max() > 1e-3


def test_a_table_of_another_size_is_refused_by_the_tcnn_grid(fake_tcnn):
    _, tcnn_grid = grid_pair()
    state = tcnn_grid.state_dict()
    state["table"] = torch.zeros(state["table"].shape[0] + 8, 2)
    with pytest.raises(RuntimeError, match="size mismatch for tcnn_encoding.params"):
        tcnn_grid.load_state_dict(state)


TCNN = "model.geometry.xyz_encoding.backend=tcnn"
TORCH = "model.geometry.xyz_encoding.backend=torch"


def trained_checkpoint(scene, trial_dir, backend_override: str, n_steps: int = 3) -> str:
    system = build_system(scene, trial_dir, backend_override)
    for _ in range(n_steps):
        assert not system.step().skipped
    return system.save()


def one_step_from(scene, trial_dir, backend_override: str, checkpoint: str):
    """The system of `backend_override` resumed from `checkpoint`, after one more training step."""
    system = build_system(scene, trial_dir, backend_override)
    system.load(checkpoint)
    assert not system.step().skipped
    return system


@pytest.mark.parametrize("trained_with, resumed_with", [(TCNN, TORCH), (TORCH, TCNN)])
def test_a_checkpoint_resumes_under_the_other_backend_as_under_its_own(
    fake_tcnn, scene, tmp_path, trained_with, resumed_with
):
    """One step from a checkpoint gives the same parameters under either backend: the table and
    its Adam moments (flat under tcnn, [T, F] under torch) land on the right entries."""
    checkpoint = trained_checkpoint(scene, tmp_path / "trained", trained_with)
    assert list(load_checkpoint(checkpoint)["model"]).count("geometry.encoding.table") == 1
    same = one_step_from(scene, tmp_path / "same", trained_with, checkpoint)
    other = one_step_from(scene, tmp_path / "other", resumed_with, checkpoint)
    assert same.model.geometry.encoding.backend != other.model.geometry.encoding.backend
    same_state, other_state = same.model.state_dict(), other.model.state_dict()
    assert same_state.keys() == other_state.keys()
    for key in same_state:
        torch.testing.assert_close(other_state[key], same_state[key], rtol=1e-5, atol=1e-7, msg=key)
    moved = same_state["geometry.encoding.table"] - load_checkpoint(checkpoint)["model"]["geometry.encoding.table"]
    assert moved.abs().max() > 0
    for group_same, group_other in zip(same.optimizer.param_groups, other.optimizer.param_groups):
        for p, q in zip(group_same["params"], group_other["params"]):
            for key in ("exp_avg", "exp_avg_sq"):
                moment, other_moment = same.optimizer.state[p][key], other.optimizer.state[q][key]
                torch.testing.assert_close(other_moment.reshape(moment.shape), moment, rtol=1e-5, atol=1e-12)
                assert other_moment.shape == q.shape


def test_a_tcnn_checkpoint_meshes_with_the_torch_backend(fake_tcnn, scene, tmp_path):
    checkpoint = trained_checkpoint(scene, tmp_path / "trained", TCNN)
    tcnn_system = build_system(scene, tmp_path / "a", TCNN)
    tcnn_system.load(checkpoint)
    torch_system = build_system(scene, tmp_path / "b", TORCH)
    torch_system.load(checkpoint)
    x = torch.rand(200, 3) * 2.0 - 1.0  # [200, 3] in the unit cube around the object
    with torch.no_grad():
        torch.testing.assert_close(torch_system.model.mesh_sdf(x), tcnn_system.model.mesh_sdf(x), rtol=0, atol=0)
    paths = torch_system.export_mesh()
    assert paths and all(p.startswith(str(tmp_path / "b")) for p in paths)


CPP = "model.geometry.xyz_encoding.backend=cpp"
CPP_ERROR = cpp_build_error()
needs_cpp = pytest.mark.skipif(CPP_ERROR is not None, reason=f"C++ kernels do not build here: {CPP_ERROR}")


@needs_cpp
@pytest.mark.parametrize("trained_with, resumed_with", [(CPP, TORCH), (TORCH, CPP)])
def test_a_checkpoint_resumes_across_the_cpp_and_torch_backends(scene, tmp_path, trained_with, resumed_with):
    """A cpp checkpoint resumes under torch and back: the same keys and shapes (the [T, F] table and
    its Adam moments), and one more step lands where the checkpoint's own backend lands, up to
    float32 summation order (the two backends add the same terms in different orders)."""
    checkpoint = trained_checkpoint(scene, tmp_path / "trained", trained_with)
    same = one_step_from(scene, tmp_path / "same", trained_with, checkpoint)
    other = one_step_from(scene, tmp_path / "other", resumed_with, checkpoint)
    assert {same.model.geometry.encoding.backend, other.model.geometry.encoding.backend} == {"cpp", "torch"}
    same_state, other_state = same.model.state_dict(), other.model.state_dict()
    assert same_state.keys() == other_state.keys()
    for key in same_state:
        torch.testing.assert_close(other_state[key], same_state[key], rtol=1e-4, atol=1e-5, msg=key)
    for group_same, group_other in zip(same.optimizer.param_groups, other.optimizer.param_groups):
        for p, q in zip(group_same["params"], group_other["params"]):
            assert p.shape == q.shape
            for key in ("exp_avg", "exp_avg_sq"):
                assert same.optimizer.state[p][key].shape == other.optimizer.state[q][key].shape


@needs_cpp
def test_a_cpp_checkpoint_meshes_with_the_torch_backend(scene, tmp_path):
    checkpoint = trained_checkpoint(scene, tmp_path / "trained", CPP)
    cpp_system = build_system(scene, tmp_path / "a", CPP)
    cpp_system.load(checkpoint)
    torch_system = build_system(scene, tmp_path / "b", TORCH)
    torch_system.load(checkpoint)
    assert cpp_system.model.geometry.encoding.backend == "cpp"
    x = torch.rand(200, 3) * 2.0 - 1.0  # [200, 3] in the unit cube around the object
    with torch.no_grad():
        torch.testing.assert_close(torch_system.model.mesh_sdf(x), cpp_system.model.mesh_sdf(x), rtol=1e-5, atol=1e-6)
    paths = torch_system.export_mesh()
    assert paths and all(p.startswith(str(tmp_path / "b")) for p in paths)
