"""The multiresolution hash encoding (Instant-NGP) as a module: HashGrid holds the [T, F] table,
parameters uniform in [-1e-4, 1e-4], and runs it on one of three backends; the maths (layout,
lookups, kernels, autograd) is in encoder/hashgrid_ops.py.

`backend: torch` is the plain-PyTorch reference (works everywhere; gathers are done
level-major with one `index_select` on flat indices, which is what makes it fast on CPU);
`backend: tcnn` wraps `tinycudann.Encoding` (CUDA only; its flat parameters are this table
flattened row-major, see `tcnn_params_from_table`; checkpoints hold the [T, F] table on both
backends, so they move between them); `backend: cpp` runs fused C++ CPU kernels
(encoder/csrc/hashgrid_cpu.cpp, built once per machine by encoder/hashgrid_cpp.py) that recompute
each point's corners instead of materialising them, with the same autograd graph as torch.
`auto` takes tcnn on CUDA when it imports, cpp on CPU when it builds, else torch. On top
of each sits the progressive band mask (Neuralangelo / instant-nsr-pl): only the first `current_level` levels are active; the rest output zeros.
"""
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from encoder.hashgrid_ops import GridLevels, hash_grid_encode, make_cpp_kernels, make_kernels
from encoder.registry import ENCODINGS
from utils.config import ConfigError, Configurable
from utils.misc import choose_cuda_backend

TCNN_INSTALL = "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"


def tcnn_import_error() -> Optional[str]:
    """None when `import tinycudann` works, else why not (one line)."""
    try:
        import tinycudann  # noqa: F401
    except Exception as e:  # on a CPU build of torch it raises EnvironmentError, not ImportError
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
    return None


def cpp_build_error() -> Optional[str]:
    """None when the C++ kernels build or load here (encoder/hashgrid_cpp.py), else why not."""
    from encoder import hashgrid_cpp

    return hashgrid_cpp.build_error()


CPP_BUILD = "python -m encoder.hashgrid_cpp"


def choose_backend(requested: str, device: torch.device) -> str:
    """auto | torch | tcnn | cpp -> the backend that runs. auto: tcnn on CUDA when tinycudann
    imports, cpp on a CPU device when its C++ kernels build (or are built), else torch. An
    explicit tcnn or cpp that cannot run raises ConfigError saying why."""
    if requested == "cpp":
        if device.type != "cpu":
            raise ConfigError(
                f"backend 'cpp' runs C++ CPU kernels, but this run's device is {device.type}; "
                "set backend: auto (tcnn where it imports) or torch"
            )
        reason = cpp_build_error()
        if reason is not None:
            raise ConfigError(
                f"backend 'cpp' needs the hash grid's C++ kernels, which do not build here ({reason}); build them "
                f"with `{CPP_BUILD}` (needs g++ and ninja), or set backend: torch"
            )
        return "cpp"
    if requested == "auto" and device.type == "cpu" and cpp_build_error() is None:
        return "cpp"
    if requested not in ("auto", "torch", "tcnn"):
        raise ConfigError(f"hash grid backend must be auto, torch, tcnn or cpp, got '{requested}'")
    return choose_cuda_backend(
        requested, device, "hash grid", "tcnn", tcnn_import_error,
        f"backend 'tcnn' runs tiny-cuda-nn's CUDA kernels, but this run's device is {device.type}; "
        f"on a CUDA machine install tinycudann with `{TCNN_INSTALL}` (a CUDA toolkit "
        "matching torch's CUDA version), or set backend: torch",
        lambda error: f"backend 'tcnn' needs the tinycudann package, which does not import here ({error}); install it "
        f"with `{TCNN_INSTALL}` (a CUDA toolkit matching torch's CUDA version), or set backend: torch",
    )


def resolved_backend(backend: str) -> str:
    """The backend a built grid runs: what start-up resolved (torch | tcnn | cpp); `auto` left unresolved
    (a grid built outside a run) is the torch reference. Nothing is checked or chosen here."""
    return "torch" if backend == "auto" else backend


def tcnn_params_from_table(table: torch.Tensor, n_params: int) -> torch.Tensor:
    """The torch backend's table as tiny-cuda-nn's flat HashGrid parameters.

    tcnn stores level after level, each level's `size_l` entries entry-major ([entry][feature]),
    with the same per-level sizes and order as GridLevels; so row r of the [T, F] table (level
    offsets included) is params[r F : (r + 1) F]: a row-major flatten.  table: [T, F] -> [T * F]
    """
    if table.numel() != n_params:
        raise ValueError(
            f"tiny-cuda-nn's hash grid holds {n_params} parameters, the torch layout {table.numel()} "
            f"({table.shape[0]} rows x {table.shape[1]} features): this tinycudann version lays levels "
            "out differently"
        )
    return table.reshape(-1)


TCNN_PARAMS = "tcnn_encoding.params"


def _tcnn_params_as_table(module: "HashGrid", state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook (tcnn backend): save tcnn's flat parameters as the torch backend's
    [T, F] `table`, so a checkpoint does not depend on the backend that wrote it."""
    state_dict[prefix + "table"] = state_dict.pop(prefix + TCNN_PARAMS).view(-1, module.n_features)


def _table_as_tcnn_params(module: "HashGrid", state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook (tcnn backend): a saved [T, F] `table` (either backend's) into
    tcnn's flat parameters (`tcnn_params_from_table`'s row-major layout)."""
    if prefix + "table" in state_dict:
        table = state_dict.pop(prefix + "table")
        n_params = module.tcnn_encoding.params.numel()
        state_dict[prefix + TCNN_PARAMS] = tcnn_params_from_table(table, n_params) if table.numel() == n_params else table


@ENCODINGS.register("HashGrid")
class HashGrid(Configurable, nn.Module):
    @dataclass
    class Config:
        otype: str = "HashGrid"
        n_levels: int = 16
        n_features_per_level: int = 2
        log2_hashmap_size: int = 19
        base_resolution: int = 16
        per_level_scale: float = 1.447269237440378
        backend: Literal["auto", "torch", "tcnn", "cpp"] = "auto"  # tcnn: CUDA; cpp: C++ CPU kernels
        compile: bool = False  # torch backend only (cpp ignores it): run its kernels through torch.compile
        # progressive band mask: start_level active levels, one more every update_steps after start_step
        start_level: int = 4
        start_step: int = 0
        update_steps: int = 1000

    def __init__(self, config: "HashGrid.Config", in_channels: int = 3):
        super().__init__()
        if in_channels != 3:
            raise ValueError(f"HashGrid encodes 3-d points, got {in_channels} channels")
        self.config = config
        self.n_levels = config.n_levels
        self.n_features = config.n_features_per_level
        self.n_output_dims = self.n_levels * self.n_features
        # chosen once at start-up (systems/backends.py resolves `auto` for the device and builds
        # the model from the resolved config); a grid built directly with `auto` runs torch
        self.backend = resolved_backend(config.backend)
        self.levels = GridLevels.build(
            config.n_levels, config.base_resolution, config.per_level_scale, config.log2_hashmap_size
        )
        self.register_buffer("current_level", torch.tensor(min(config.start_level, config.n_levels)))
        n_rows = self.levels.offsets[-1] + self.levels.sizes[-1]
        # drawn from torch's RNG for both backends, so a seed gives the same start on either
        table = torch.empty(n_rows, self.n_features).uniform_(-1e-4, 1e-4)  # [T, F]
        if self.backend == "tcnn":
            import tinycudann as tcnn

            self.tcnn_encoding = tcnn.Encoding(
                3,
                {
                    "otype": "HashGrid",
                    "n_levels": config.n_levels,
                    "n_features_per_level": config.n_features_per_level,
                    "log2_hashmap_size": config.log2_hashmap_size,
                    "base_resolution": config.base_resolution,
                    "per_level_scale": config.per_level_scale,
                    "interpolation": "Linear",
                },
                dtype=torch.float32,  # float32 table and features: the SDF needs them precise
            )
            with torch.no_grad():
                self.tcnn_encoding.params.copy_(tcnn_params_from_table(table, self.tcnn_encoding.params.numel()))
            # checkpoints hold `table` [T, F] on both backends: a run trained with tcnn on a GPU
            # tests, meshes and resumes with the torch backend (e.g. on a CPU), and back
            self.register_state_dict_post_hook(_tcnn_params_as_table)
            self.register_load_state_dict_pre_hook(_table_as_tcnn_params)
        else:
            self.table = nn.Parameter(table)
            if self.backend == "cpp":
                self.kernels = make_cpp_kernels(self.levels)  # `compile` is the torch backend's
            else:
                self.kernels = make_kernels(self.levels, config.compile)

    def update_step(self, global_step: int) -> None:
        c = self.config
        level = c.start_level + max(global_step - c.start_step, 0) // c.update_steps
        self.current_level.fill_(min(level, self.n_levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3] in [0, 1] -> [N, n_levels * n_features]; inactive levels are zero.

        Every level is evaluated (as tiny-cuda-nn does) and the band mask zeroes the
        inactive ones, so the compiled kernels see one fixed set of levels."""
        if self.backend == "tcnn":
            feats = self.tcnn_encoding(x).float()  # [N, L * F]
        else:
            feats = hash_grid_encode(x, self.table, self.kernels)  # [N, L * F]
        level = torch.arange(self.n_levels, device=x.device)
        mask = (level < self.current_level).to(feats.dtype).repeat_interleave(self.n_features)  # [L * F]
        return feats * mask
