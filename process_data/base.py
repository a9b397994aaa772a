"""What every scene format provides once loaded, and the ray sampling built on it.

Conventions (also in README.md): cameras are pinhole with OpenCV axes (x right, y down,
z forward); integer pixel coordinates (u, v) are pixel CENTRES; poses are camera-to-world
[R | t] in the NORMALISED frame, where the object of interest lies inside the unit sphere.
`scale_mat` [4, 4] maps normalised homogeneous points back to the dataset's world frame
(DTU: millimetres): X_world = scale_mat @ X_normalised.
"""
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from utils.config import BackgroundColor

log = logging.getLogger(__name__)

BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}


@dataclass
class DatasetConfig:
    """The keys every dataset has; each dataset's Config extends it (and may change a default).
    OmegaConf checks the Literal at load: a bad background_color fails naming the valid ones."""

    name: str = ""
    root_dir: str = ""
    img_downscale: float = 1.0  # the images are loaded at 1/img_downscale of their size (must divide it)
    apply_mask: bool = True  # replace the pixels outside the mask with the background colour
    background_color: BackgroundColor = "random"  # random (training; white for evaluation) | white | black
    gt_mesh: Optional[str] = None  # ground-truth mesh in the world frame (default: <root_dir>/gt_mesh.ply if present)


def resolve_gt_mesh(config) -> Optional[str]:
    """The scene's ground-truth mesh: dataset.gt_mesh when set (None, with a warning, when
    that file does not exist: `dataset.gt_mesh=absent.ply` is how a run skips the mesh
    metrics), else <root_dir>/gt_mesh.ply when present, else None (no mesh metrics)."""
    if config.gt_mesh:
        if not os.path.isfile(config.gt_mesh):
            log.warning("dataset.gt_mesh %s not found: no mesh metrics", config.gt_mesh)
            return None
        return config.gt_mesh
    default = os.path.join(config.root_dir, "gt_mesh.ply")
    return default if os.path.isfile(default) else None


@dataclass
class Views:
    """A scene as arrays. images [N, H, W, 3] uint8 RGB; masks [N, H, W] float in [0, 1] or
    None; intrinsics [N, 3, 3]; c2w [N, 3, 4] normalised frame; world_mats [N, 4, 4] the
    original projections K [R | t] (world frame), kept for checks and mesh culling."""

    images: np.ndarray
    masks: Optional[np.ndarray]
    intrinsics: np.ndarray
    c2w: np.ndarray
    scale_mat: np.ndarray
    world_mats: np.ndarray
    names: List[str]
    mask_source: Optional[str] = None  # where the masks came from: a folder, "alpha", or None


def split_indices(n_views: int, holdout_every: int) -> Dict[str, List[int]]:
    """Every holdout_every-th view (0, K, 2K, ...) is held out for testing; 0 holds none out."""
    if holdout_every <= 0:
        return {"train": list(range(n_views)), "test": []}
    test = [i for i in range(n_views) if i % holdout_every == 0]
    return {"train": [i for i in range(n_views) if i % holdout_every != 0], "test": test}


def pixel_directions(
    u: torch.Tensor, v: torch.Tensor, intrinsics: torch.Tensor, c2w: torch.Tensor
) -> torch.Tensor:
    """World-frame unit directions through pixel centres (u, v).

    d_cam = K^-1 [u, v, 1] (OpenCV axes), d = R_c2w d_cam / |.|
    u, v: [n]; intrinsics: [n, 3, 3]; c2w: [n, 3, 4] -> [n, 3]
    """
    fx, fy = intrinsics[:, 0, 0], intrinsics[:, 1, 1]
    cx, cy, skew = intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 0, 1]
    y_cam = (v - cy) / fy
    x_cam = (u - cx - skew * y_cam) / fx
    d_cam = torch.stack([x_cam, y_cam, torch.ones_like(x_cam)], dim=-1)  # [n, 3]
    d = (c2w[:, :, :3] @ d_cam[:, :, None])[:, :, 0]  # [n, 3]
    return d / d.norm(dim=-1, keepdim=True)


class RayDataset:
    """Holds a scene's views on the training device; draws random rays from all training
    views each step and gives the rays of whole views for evaluation. gt_mesh: the path of
    the scene's ground-truth mesh (world frame), or None; every dataset answers it. config: the
    dataset's config section (every registered dataset keeps it; the texture export re-reads
    the photos through it at another img_downscale)."""

    gt_mesh: Optional[str] = None
    config = None

    def __init__(self, views: Views, holdout_every: int, apply_mask: bool, background_color: str, device):
        self.views = views
        self.device = torch.device(device)
        self.n_views, self.height, self.width = views.images.shape[:3]
        self.split = split_indices(self.n_views, holdout_every)
        self.apply_mask = apply_mask
        if background_color not in ("random", *BACKGROUNDS):
            raise ValueError(f"background_color must be random, white or black, got '{background_color}'")
        self.background_color = background_color
        self.images = torch.from_numpy(views.images).to(self.device)  # [N, H, W, 3] uint8
        masks = views.masks if views.masks is not None else np.ones(views.images.shape[:3], np.float32)
        self.masks = torch.from_numpy(masks.astype(np.float32)).to(self.device)  # [N, H, W]
        self.has_masks = views.masks is not None
        self.intrinsics = torch.from_numpy(views.intrinsics.astype(np.float32)).to(self.device)
        self.c2w = torch.from_numpy(views.c2w.astype(np.float32)).to(self.device)
        self.train_views = torch.tensor(self.split["train"], device=self.device)

    def eval_background(self) -> torch.Tensor:
        """[1, 3]: the fixed colour used for evaluation (white when training draws random)."""
        return torch.tensor([BACKGROUNDS.get(self.background_color, BACKGROUNDS["white"])], device=self.device)

    def _rays(self, view: torch.Tensor, u: torch.Tensor, v: torch.Tensor, background: torch.Tensor) -> dict:
        """view, u, v: [n] int64 -> the ray batch dict (see DESIGN: rays_o, rays_d, rgb, mask)."""
        rgb = self.images[view, v, u].float() / 255.0  # [n, 3]
        mask = self.masks[view, v, u]  # [n]
        if self.apply_mask:
            rgb = rgb * mask[:, None] + background * (1.0 - mask[:, None])
        c2w = self.c2w[view]  # [n, 3, 4]
        return {
            "rays_o": c2w[:, :, 3],
            "rays_d": pixel_directions(u.float(), v.float(), self.intrinsics[view], c2w),
            "rgb": rgb,
            "mask": mask,
            "background": background,
        }

    def sample_rays(self, n_rays: int, generator: Optional[torch.Generator] = None) -> dict:
        """n_rays pixels drawn uniformly from all training views."""
        pick = torch.randint(len(self.train_views), (n_rays,), device=self.device, generator=generator)
        u = torch.randint(self.width, (n_rays,), device=self.device, generator=generator)
        v = torch.randint(self.height, (n_rays,), device=self.device, generator=generator)
        if self.background_color == "random":
            background = torch.rand(n_rays, 3, device=self.device, generator=generator)
        else:
            background = self.eval_background().expand(n_rays, 3)
        return self._rays(self.train_views[pick], u, v, background)

    def view_rays(self, index: int) -> dict:
        """All H*W rays of view `index` in row-major pixel order."""
        u, v = self._pixel_grid(self.width, self.height)
        view = torch.full_like(u, index)
        return self._rays(view, u, v, self.eval_background().expand(u.shape[0], 3))

    def pose_rays(self, c2w: torch.Tensor, intrinsics: torch.Tensor, width: int, height: int) -> dict:
        """Rays of a free camera (no ground truth): c2w [3, 4] normalised frame, K [3, 3]."""
        u, v = self._pixel_grid(width, height)
        n = u.shape[0]
        return {
            "rays_o": c2w[:, 3].expand(n, 3),
            "rays_d": pixel_directions(u.float(), v.float(), intrinsics.expand(n, 3, 3), c2w.expand(n, 3, 4)),
            "background": self.eval_background().expand(n, 3),
        }

    def _pixel_grid(self, width: int, height: int):
        v, u = torch.meshgrid(
            torch.arange(height, device=self.device), torch.arange(width, device=self.device), indexing="ij"
        )
        return u.reshape(-1), v.reshape(-1)
