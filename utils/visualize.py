"""Turning renders into pictures: RGB, normal maps, depth maps, side-by-side panels."""
import os

import cv2
import imageio.v2 as imageio
import numpy as np
import torch


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def normal_image(normal: torch.Tensor, opacity: torch.Tensor, background: float = 1.0) -> np.ndarray:
    """World-frame unit normals [H, W, 3] -> colours (n + 1) / 2, blended over the background
    by opacity [H, W]."""
    n = torch.nn.functional.normalize(normal, dim=-1)
    colour = (n + 1.0) * 0.5
    a = opacity[..., None].clamp(0, 1)
    return (colour * a + background * (1 - a)).cpu().numpy()


def depth_image(depth: torch.Tensor, opacity: torch.Tensor) -> np.ndarray:
    """Depth [H, W] -> turbo colours, scaled between the 1st and 99th percentile of the
    depths where opacity > 0.5; transparent pixels white."""
    d = depth.cpu().numpy()
    solid = opacity.cpu().numpy() > 0.5
    if solid.any():
        lo, hi = np.percentile(d[solid], [1, 99])
    else:
        lo, hi = float(d.min()), float(d.max())
    scaled = np.clip((d - lo) / max(hi - lo, 1e-8), 0, 1)
    colour = cv2.applyColorMap(to_uint8(scaled), cv2.COLORMAP_TURBO)[:, :, ::-1] / 255.0
    colour[~solid] = 1.0
    return colour


def save_image(path: str, img: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.imwrite(path, to_uint8(img))
