"""NeRF positional (frequency) encoding."""
from dataclasses import dataclass

import torch
from torch import nn

from encoder.registry import ENCODINGS
from utils.config import Configurable


def frequency_encoding(x: torch.Tensor, n_frequencies: int, include_input: bool) -> torch.Tensor:
    """gamma(x) = [x, sin(2^k pi x), cos(2^k pi x) for k < n_frequencies], frequency-major.

    x: [N, C] -> [N, C * (2 * n_frequencies + include_input)]
    """
    freqs = (2.0 ** torch.arange(n_frequencies, dtype=x.dtype, device=x.device)) * torch.pi  # [K]
    angles = x[:, None, :] * freqs[None, :, None]  # [N, K, C]
    enc = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(1)  # [N, K * 2C]
    return torch.cat([x, enc], dim=-1) if include_input else enc


@ENCODINGS.register("Frequency")
class Frequency(Configurable, nn.Module):
    @dataclass
    class Config:
        otype: str = "Frequency"
        n_frequencies: int = 6
        include_input: bool = True

    def __init__(self, config: "Frequency.Config", in_channels: int = 3):
        super().__init__()
        self.n_frequencies = config.n_frequencies
        self.include_input = config.include_input
        self.n_output_dims = in_channels * (2 * config.n_frequencies + int(config.include_input))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frequency_encoding(x, self.n_frequencies, self.include_input)
