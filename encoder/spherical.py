"""Real spherical harmonics of unit directions, as tiny-cuda-nn's SphericalHarmonics."""
from dataclasses import dataclass

import torch
from torch import nn

from encoder.registry import ENCODINGS
from utils.config import Configurable


def spherical_harmonics(dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Real SH basis Y_lm(d) for l < degree, in tiny-cuda-nn's order and signs.

    Orthonormal on the sphere: (1/4pi) * integral of Y_i Y_j over directions = delta_ij / (4pi).
    dirs: [..., 3] unit vectors -> [..., degree**2]
    """
    if not 1 <= degree <= 4:
        raise ValueError(f"spherical harmonics degree must be 1..4, got {degree}")
    x, y, z = dirs.unbind(-1)  # each [...]
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree > 1:
        out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree > 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.94617469575755997 * zz - 0.31539156525251999,
            -1.0925484305920792 * x * z,
            0.54627421529603959 * (xx - yy),
        ]
    if degree > 3:
        out += [
            0.59004358992664352 * y * (yy - 3.0 * xx),
            2.8906114426405538 * x * y * z,
            0.45704579946446572 * y * (1.0 - 5.0 * zz),
            0.3731763325901154 * z * (5.0 * zz - 3.0),
            0.45704579946446572 * x * (1.0 - 5.0 * zz),
            1.4453057213202769 * z * (xx - yy),
            0.59004358992664352 * x * (3.0 * yy - xx),
        ]
    return torch.stack(out, dim=-1)  # [..., degree**2]


@ENCODINGS.register("SphericalHarmonics")
class SphericalHarmonics(Configurable, nn.Module):
    @dataclass
    class Config:
        otype: str = "SphericalHarmonics"
        degree: int = 4

    def __init__(self, config: "SphericalHarmonics.Config", in_channels: int = 3):
        super().__init__()
        if in_channels != 3:
            raise ValueError(f"SphericalHarmonics encodes 3-d directions, got {in_channels} channels")
        self.degree = config.degree
        self.n_output_dims = config.degree**2

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        return spherical_harmonics(dirs, self.degree)  # [N, degree**2]
