"""The demo scene's object: a smooth union of four primitives as a signed distance function
(normalised frame, z up), its procedural albedo, and its shading by sphere tracing (Lambertian,
one directional light plus ambient, white background). process_data/synthetic.py describes
the object in full and puts cameras around it to write the scene's files."""
import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

BOUND_RADIUS = 0.8  # the object lies inside this sphere (normalised frame); rays start on it
BACKGROUND = 1.0  # white
# geometry (normalised frame, z up)
BASE_CENTER, BASE_HALF, BASE_ROUND = (0.0, 0.0, -0.33), (0.50, 0.38, 0.10), 0.06
SPHERE_CENTER, SPHERE_RADIUS = (-0.22, 0.06, 0.03), 0.27
TORUS_CENTER, TORUS_R, TORUS_r, TORUS_TURN_DEG = (0.27, -0.10, -0.02), 0.19, 0.065, 35.0
CAPSULE_A, CAPSULE_B, CAPSULE_RADIUS = (0.36, 0.24, -0.23), (0.22, 0.26, 0.38), 0.075
SMOOTH_K = 0.04
# shading
LIGHT_DIR = np.array([0.45, -0.35, 1.0]) / np.linalg.norm([0.45, -0.35, 1.0])
AMBIENT, DIFFUSE = 0.35, 0.65
PART_COLORS = ((0.82, 0.60, 0.38), (0.30, 0.50, 0.88), (0.88, 0.34, 0.28), (0.36, 0.76, 0.42))


# ----------------------------------------------------------------------------- geometry


def float_tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


_C = {
    "base_c": float_tensor(BASE_CENTER),
    "base_b": float_tensor(BASE_HALF) - BASE_ROUND,
    "sph_c": float_tensor(SPHERE_CENTER),
    "tor_c": float_tensor(TORUS_CENTER),
    "cap_a": float_tensor(CAPSULE_A),
    "cap_ba": float_tensor(CAPSULE_B) - float_tensor(CAPSULE_A),
}
_TURN = math.radians(TORUS_TURN_DEG)
_COS, _SIN = math.cos(_TURN), math.sin(_TURN)


def _smin(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    """Polynomial smooth minimum (a lower bound of min within k of the seam)."""
    h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def sdf_parts(p: torch.Tensor) -> torch.Tensor:
    """Signed distances of the four primitives: p [n, 3] normalised frame -> [n, 4]
    (base, sphere, torus, capsule), negative inside."""
    # rounded box
    q = (p - _C["base_c"]).abs() - _C["base_b"]
    base = q.clamp(min=0.0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0.0) - BASE_ROUND
    # sphere
    sphere = (p - _C["sph_c"]).norm(dim=-1) - SPHERE_RADIUS
    # torus: ring in the local x-z plane (upright), turned about z
    d = p - _C["tor_c"]
    lx = _COS * d[:, 0] + _SIN * d[:, 1]
    ly = -_SIN * d[:, 0] + _COS * d[:, 1]
    ring = torch.sqrt(lx * lx + d[:, 2] * d[:, 2]) - TORUS_R
    torus = torch.sqrt(ring * ring + ly * ly) - TORUS_r
    # capsule
    pa = p - _C["cap_a"]
    ba = _C["cap_ba"]
    h = ((pa @ ba) / (ba @ ba)).clamp(0.0, 1.0)
    capsule = (pa - h[:, None] * ba).norm(dim=-1) - CAPSULE_RADIUS
    return torch.stack([base, sphere, torus, capsule], dim=-1)


def scene_sdf(p: torch.Tensor) -> torch.Tensor:
    """Signed distance of the object: p [n, 3] normalised frame -> [n] (negative inside)."""
    parts = sdf_parts(p)
    d = _smin(parts[:, 0], parts[:, 1], SMOOTH_K)
    d = _smin(d, parts[:, 2], SMOOTH_K)
    return _smin(d, parts[:, 3], SMOOTH_K)


def sdf_normals(p: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """Unit outward normals by central differences of scene_sdf: p [n, 3] -> [n, 3]."""
    offsets = torch.eye(3, dtype=p.dtype) * eps  # [3, 3]
    probe = torch.cat([p[:, None] + offsets, p[:, None] - offsets], dim=1)  # [n, 6, 3]
    values = scene_sdf(probe.reshape(-1, 3)).view(-1, 6)
    grad = values[:, :3] - values[:, 3:]
    return grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# ----------------------------------------------------------------------------- texture


class Albedo:
    """Procedural albedo with texture at several scales; `seed` draws the value-noise lattice
    and the phases of the colour drift."""

    def __init__(self, seed: int, detail: float = 0.0):
        self.detail = detail
        g = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(256, generator=g)  # [256] int64
        self.values = torch.rand(256, generator=g)  # [256]
        self.phase = torch.rand(3, generator=g) * 2 * math.pi  # [3]
        self.drift = F.normalize(torch.randn(3, 3, generator=g), dim=-1)  # [3 channels, 3]
        self.colors = float_tensor(PART_COLORS)  # [4, 3]

    def _lattice(self, i: torch.Tensor) -> torch.Tensor:
        """Pseudo-random value in [0, 1) per integer lattice point: i [n, 3] int64 -> [n]"""
        h = self.perm[i[:, 0] & 255]
        h = self.perm[(h + i[:, 1]) & 255]
        h = self.perm[(h + i[:, 2]) & 255]
        return self.values[h]

    def value_noise(self, x: torch.Tensor) -> torch.Tensor:
        """Trilinear value noise with smoothstep weights, x [n, 3] (lattice units) -> [n] in [0, 1]."""
        cell = torch.floor(x)
        f = x - cell
        w = f * f * (3.0 - 2.0 * f)  # [n, 3]
        i = cell.long()
        out = torch.zeros(x.shape[0], dtype=x.dtype)
        for corner in range(8):
            o = torch.tensor([(corner >> 0) & 1, (corner >> 1) & 1, (corner >> 2) & 1])
            weight = torch.where(o.bool(), w, 1.0 - w).prod(dim=-1)
            out = out + weight * self._lattice(i + o)
        return out

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        """p [n, 3] surface points (normalised frame) -> albedo [n, 3] in [0, 1]."""
        part = sdf_parts(p).argmin(dim=-1)  # which primitive the point belongs to
        color = self.colors[part]  # [n, 3]
        # slow colour drift (scale ~0.5)
        color = color * (0.78 + 0.22 * torch.sin(4.0 * (p @ self.drift.T) + self.phase))
        # soft 3D checker (cells 0.12): tanh keeps the edges band-limited
        s = torch.sin(p * (math.pi / 0.12)).prod(dim=-1)
        color = color * (0.82 + 0.18 * torch.tanh(12.0 * s))[:, None]
        # fine stripes (period 0.06) along a slanted axis
        stripes = torch.sin(p @ float_tensor([0.62, -0.48, 0.62]) * (2 * math.pi / 0.06))
        color = color * (0.9 + 0.1 * stripes)[:, None]
        # value noise, three octaves (periods ~0.17, 0.07, 0.03)
        n = 0.5 * self.value_noise(p * 6.0 + 11.0) + 0.3 * self.value_noise(p * 14.0 + 37.0)
        n = n + 0.2 * self.value_noise(p * 32.0 + 71.0)
        color = color * (0.45 + 1.1 * n)[:, None]
        # sparse spots with crisp (but band-limited) edges: blob features for SIFT
        spots = self.value_noise(p * 20.0 + 5.0)
        light = ((spots - 0.78) / 0.04).clamp(0.0, 1.0)
        dark = ((0.22 - spots) / 0.04).clamp(0.0, 1.0)
        color = color + light[:, None] * (0.95 - color) * 0.8 - dark[:, None] * color * 0.75
        if self.detail > 0:
            # fine spots a few pixels across at 400x300: corners that SIFT localises well
            fine = self.value_noise(p * 60.0 + 3.0)
            light = ((fine - 0.7) / 0.05).clamp(0.0, 1.0)
            dark = ((0.3 - fine) / 0.05).clamp(0.0, 1.0)
            color = color + self.detail * (light[:, None] * (0.95 - color) - dark[:, None] * color)
        return color.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- rendering


@torch.no_grad()
def sphere_trace(
    origin: torch.Tensor, dirs: torch.Tensor, max_steps: int = 96, eps: float = 1e-4
) -> Tuple[torch.Tensor, torch.Tensor]:
    """First surface hit along rays from one origin [3] with unit directions dirs [n, 3]
    (normalised frame) -> hit [n] bool, t [n]. Rays start where they enter the bounding
    sphere; those that leave it, or are converged, drop out of the batch."""
    n = dirs.shape[0]
    hit = torch.zeros(n, dtype=torch.bool)
    t_out = torch.zeros(n)
    b = dirs @ origin  # [n]
    disc = b * b - (origin @ origin - BOUND_RADIUS**2)
    idx = torch.nonzero(disc > 0)[:, 0]
    root = disc[idx].sqrt()
    t = (-b[idx] - root).clamp(min=0.0)
    t_far = -b[idx] + root
    d = dirs[idx]
    s = torch.full_like(t, float("inf"))
    for _ in range(max_steps):
        if idx.numel() == 0:
            break
        s = scene_sdf(origin + t[:, None] * d)
        done_hit = s.abs() < eps
        t = t + s
        done = done_hit | (t > t_far)
        if done.any():
            hit[idx[done_hit]] = True
            t_out[idx[done_hit]] = t[done_hit] - s[done_hit]
            keep = ~done
            idx, t, t_far, d, s = idx[keep], t[keep], t_far[keep], d[keep], s[keep]
    # rays still marching: grazing the surface slowly; accept those already very close
    close = s.abs() < 20 * eps
    hit[idx[close]] = True
    t_out[idx[close]] = t[close] - s[close]
    return hit, t_out


@torch.no_grad()
def shade(origin: torch.Tensor, dirs: torch.Tensor, albedo: Albedo) -> Tuple[torch.Tensor, torch.Tensor]:
    """Colour of rays from origin [3] along dirs [n, 3] -> rgb [n, 3] in [0, 1] (white where
    they miss), hit [n] bool."""
    hit, t = sphere_trace(origin, dirs)
    rgb = torch.full((dirs.shape[0], 3), BACKGROUND)
    if hit.any():
        p = origin + t[hit, None] * dirs[hit]
        normal = sdf_normals(p)
        lambert = (normal @ float_tensor(LIGHT_DIR)).clamp(min=0.0)
        rgb[hit] = albedo(p) * (AMBIENT + DIFFUSE * lambert)[:, None]
    return rgb.clamp(0.0, 1.0), hit
