"""The networks of a NeuS model: SDF (geometry), colour (texture) and variance."""
import math
from dataclasses import dataclass
from typing import Any, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from encoder import encoding_field, get_encoding


def make_mlp(
    dims: List[int], activation: nn.Module, use_weight_norm: bool, output_activation: Optional[nn.Module] = None
) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        linear = nn.Linear(d_in, d_out)
        layers.append(linear)
        if i < len(dims) - 2:
            layers.append(activation)
    if output_activation is not None:
        layers.append(output_activation)
    if use_weight_norm:
        for layer in layers:
            if isinstance(layer, nn.Linear):
                weight_norm(layer)
    return nn.Sequential(*layers)


def sphere_init_(mlp_layers: List[nn.Linear], n_xyz_inputs: int, radius: float) -> None:
    """Geometric initialisation (Atzmon & Lipman, SAL; as in IDR/NeuS): the network starts as
    sdf(x) ~= |x| - radius. The first layer sees only the xyz inputs (encoding weights zero).
    Call before weight norm is applied."""
    first, last = mlp_layers[0], mlp_layers[-1]
    for layer in mlp_layers[:-1]:
        nn.init.constant_(layer.bias, 0.0)
        nn.init.normal_(layer.weight, 0.0, math.sqrt(2) / math.sqrt(layer.out_features))
    nn.init.constant_(first.weight[:, n_xyz_inputs:], 0.0)
    nn.init.normal_(last.weight, mean=math.sqrt(math.pi) / math.sqrt(last.in_features), std=1e-4)
    nn.init.constant_(last.bias, -radius)


class SDFNetwork(nn.Module):
    """x -> (sdf, feature) via hash grid (+ xyz) and an MLP with Softplus(beta=100);
    normals by autograd (analytic) or central finite differences."""

    @dataclass
    class Config:
        xyz_encoding: Any = encoding_field({"otype": "HashGrid"})
        include_xyz: bool = True
        n_neurons: int = 64
        n_hidden_layers: int = 1
        feature_dim: int = 13
        sphere_init_radius: float = 0.5
        weight_norm: bool = True
        softplus_beta: float = 100.0
        grad_type: Literal["analytic", "finite_difference"] = "analytic"
        finite_difference_eps: float = 1e-3  # in normalised units (the scene lies in the unit sphere)

    def __init__(self, config: "SDFNetwork.Config", radius: float):
        super().__init__()
        self.config = config
        self.radius = radius
        self.encoding = get_encoding(config.xyz_encoding, 3)
        n_xyz = 3 if config.include_xyz else 0
        dims = [n_xyz + self.encoding.n_output_dims] + [config.n_neurons] * config.n_hidden_layers
        dims.append(1 + config.feature_dim)
        self.mlp = make_mlp(dims, nn.Softplus(beta=config.softplus_beta), use_weight_norm=False)
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        sphere_init_(linears, n_xyz, config.sphere_init_radius)
        if config.weight_norm:
            for layer in linears:
                weight_norm(layer)

    def update_step(self, global_step: int) -> None:
        if hasattr(self.encoding, "update_step"):
            self.encoding.update_step(global_step)

    def unit_box(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3] in the normalised frame -> [N, 3], [0, 1] over the grid's box [-radius, radius]^3"""
        return (x / self.radius + 1.0) * 0.5

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [N, 3] normalised frame -> sdf [N], feature [N, feature_dim]"""
        h = self.encoding(self.unit_box(x))  # [N, E]
        if self.config.include_xyz:
            h = torch.cat([x, h], dim=-1)
        # float32 also under float16 autocast: fp16 positions |x| in [0.5, 1) are 4.9e-4 apart, so
        # the SDF would step by most of the NeuS sigmoid's width (1 / inv_s = 6.7e-4 at 1500)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.mlp(h.float())  # [N, 1 + feature_dim]
        return out[:, 0], out[:, 1:]

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0]

    def forward_with_grad(
        self, x: torch.Tensor, create_graph: bool
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, 3] -> sdf [N], feature [N, F], grad [N, 3] (d sdf / d x, unnormalised).

        With create_graph the gradient stays differentiable in the parameters (eikonal loss,
        colour through normals)."""
        if self.config.grad_type == "finite_difference":
            sdf, feature = self.forward(x)
            return sdf, feature, self._finite_difference_grad(x)
        # no autocast for the gradient either: autograd carries it into the backward's matmuls
        with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            x = x.detach().requires_grad_(True)
            sdf, feature = self.forward(x)
            # d(sum sdf)/dx = the per-point gradient (each sdf depends on its own x only). A scalar
            # output, no grad_outputs: autograd's shape check of grad_outputs imports sympy
            # (torch.fx.experimental.symbolic_shapes, 1 s of the first step on a 2-core CPU)
            (grad,) = torch.autograd.grad(sdf.sum(), x, create_graph=create_graph)  # [N, 3]
        if not create_graph:
            sdf, feature = sdf.detach(), feature.detach()
        return sdf, feature, grad

    def _finite_difference_grad(self, x: torch.Tensor) -> torch.Tensor:
        """grad_d = (sdf(x + eps e_d) - sdf(x - eps e_d)) / (2 eps).  x: [N, 3] -> [N, 3]"""
        eps = self.config.finite_difference_eps
        offsets = torch.cat([torch.eye(3, device=x.device), -torch.eye(3, device=x.device)]) * eps  # [6, 3]
        shifted = (x[None, :, :] + offsets[:, None, :]).reshape(-1, 3)  # [6N, 3]
        sdf = self.sdf(shifted).view(6, -1)  # [6, N]
        return ((sdf[:3] - sdf[3:]) / (2 * eps)).T  # [N, 3]


class ColorNetwork(nn.Module):
    """(feature, SH(view direction), normal) -> sigmoid RGB; the feature is the SDF network's,
    and with appearance_grid also the colour's own hash-grid encoding of the point."""

    @dataclass
    class Config:
        dir_encoding: Any = encoding_field({"otype": "SphericalHarmonics", "degree": 4})
        n_neurons: int = 64
        n_hidden_layers: int = 2
        # a hash grid of its own for the colour, beside the geometry's features (off: the
        # colour sees only what the SDF network's features carry)
        appearance_grid: bool = False
        xyz_encoding: Any = encoding_field({"otype": "HashGrid"})

    def __init__(self, config: "ColorNetwork.Config", feature_dim: int):
        super().__init__()
        self.dir_encoding = get_encoding(config.dir_encoding, 3)
        self.encoding = get_encoding(config.xyz_encoding, 3) if config.appearance_grid else None
        if self.encoding is not None:
            feature_dim += self.encoding.n_output_dims
        dims = [feature_dim + self.dir_encoding.n_output_dims + 3]
        dims += [config.n_neurons] * config.n_hidden_layers + [3]
        self.mlp = make_mlp(dims, nn.ReLU(inplace=True), use_weight_norm=True, output_activation=nn.Sigmoid())

    def update_step(self, global_step: int) -> None:
        if self.encoding is not None and hasattr(self.encoding, "update_step"):
            self.encoding.update_step(global_step)

    def point_features(self, x01: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The colour's features of points: x01 [N, 3] in [0, 1] over the grid's box, the SDF
        network's feature [N, F] -> [N, F] or, with the appearance grid, [N, F + E]."""
        if self.encoding is None:
            return feature
        return torch.cat([feature, self.encoding(x01).float()], dim=-1)

    def forward(self, feature: torch.Tensor, dirs: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        """feature [N, F], dirs [N, 3] unit, normal [N, 3] unit -> rgb [N, 3] in (0, 1)"""
        return self.mlp(torch.cat([feature, self.dir_encoding(dirs), normal], dim=-1)).float()  # float32 under autocast


class VarianceNetwork(nn.Module):
    """The learned sharpness of NeuS: inv_s = exp(10 * variance), clamped to [1e-6, max_inv_s].

    With fixed-step marching the rendered surface must stay wider than a few steps: once
    1 / inv_s is much smaller than the step, most samples miss the transition, the gradients
    that move the surface vanish and the geometry degrades. max_inv_s ~ 4 / render_step_size
    keeps it resolvable (the mesh is the zero level set, so its sharpness does not depend on it)."""

    @dataclass
    class Config:
        init_val: float = 0.3
        max_inv_s: float = 1e6

    def __init__(self, config: "VarianceNetwork.Config"):
        super().__init__()
        self.max_inv_s = config.max_inv_s
        self.variance = nn.Parameter(torch.tensor(config.init_val))

    def inv_s(self) -> torch.Tensor:
        return torch.exp(self.variance * 10.0).clamp(1e-6, self.max_inv_s)  # []


def normalize(v: torch.Tensor) -> torch.Tensor:
    return F.normalize(v, dim=-1, eps=1e-12)

