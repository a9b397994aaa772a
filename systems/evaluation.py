"""Evaluation of a trained model on its dataset: validation panels, held-out test views
(PSNR/SSIM, metrics.json) and the orbit video.

Rank-agnostic: every rank calls these, and each shares out its work through the one helper
it is given, utils.distributed.Shards (map_in_turns: rank r takes items r, r + N, ...; rank 0
gathers the results and alone writes images, TensorBoard and metrics.json). The items are whole test views, whole
orbit frames, or the N blocks of a validation view's rays. In one process it is a plain map.
No rank waits in a collective while another renders a whole test set.
"""
import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

from utils.distributed import Shards
from utils.camera import downscale_matrix, orbit_poses
from utils.metrics import psnr, ssim
from utils.misc import map_in_chunks
from utils.visualize import depth_image, normal_image, save_image, to_uint8

log = logging.getLogger(__name__)


def image_metrics(images: Dict[str, torch.Tensor], has_masks: bool) -> Dict[str, float]:
    """PSNR and SSIM of a render against its ground truth, whole image and inside the mask."""
    metrics = {"psnr": psnr(images["rgb"], images["gt_rgb"]), "ssim": ssim(images["rgb"], images["gt_rgb"])}
    if has_masks:
        metrics["psnr_masked"] = psnr(images["rgb"], images["gt_rgb"], images["mask"])
        metrics["ssim_masked"] = ssim(images["rgb"], images["gt_rgb"], images["mask"])
    return metrics


def as_images(rendered: Dict[str, torch.Tensor], height: int, width: int) -> Dict[str, torch.Tensor]:
    """Per-ray outputs [H*W, ...] in row-major pixel order -> images [H, W] or [H, W, C]."""
    return {k: v.view(height, width, -1).squeeze(-1) for k, v in rendered.items()}


class Evaluation:
    """Renders of `model` over `dataset`'s views and cameras, and their metrics."""

    def __init__(self, model: torch.nn.Module, dataset, trainer_config, device: torch.device,
                 shards: Shards = Shards()):
        self.model = model
        self.shards = shards
        self.dataset = dataset
        self.config = trainer_config
        self.device = device
        self.n_validations = 0
        self.eval_chunk_rays = trainer_config.eval_chunk_rays  # halved for good on out-of-memory

    # --- rendering ----------------------------------------------------------------------------
    @torch.no_grad()
    def render_rays(self, rays: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Render N rays in chunks of eval_chunk_rays -> rgb [N, 3], opacity [N] (foreground),
        depth [N], normal [N, 3], rgb_foreground [N, 3] (over black) and, with a background
        model, rgb_background [N, 3]."""
        self.model.eval()

        def render(start: int, stop: int) -> Dict[str, torch.Tensor]:
            out = self.model(rays["rays_o"][start:stop], rays["rays_d"][start:stop], rays["background"][start:stop])
            if "background" in out:
                out["rgb_background"] = out["background"]["rgb"]
            keys = ("rgb", "opacity", "depth", "normal", "rgb_foreground", "rgb_background")
            return {k: out[k] for k in keys if k in out}

        parts, self.eval_chunk_rays = map_in_chunks(render, rays["rays_o"].shape[0], self.eval_chunk_rays, "rendering")
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def render_image(self, rays: Dict[str, torch.Tensor], height: int, width: int) -> Dict[str, torch.Tensor]:
        """Render H*W rays (row-major pixels) -> render_rays' outputs as images [H, W, ...]."""
        return as_images(self.render_rays(rays), height, width)

    def render_view(self, index: int) -> Dict[str, torch.Tensor]:
        """Render view `index` -> render_image's images plus gt_rgb [H, W, 3], mask [H, W]."""
        rays = self.dataset.view_rays(index)
        return with_ground_truth(self.render_image(rays, self.dataset.height, self.dataset.width), rays,
                                 self.dataset.height, self.dataset.width)

    # --- validation -----------------------------------------------------------------------------
    def validation_view(self) -> int:
        views = self.dataset.split["test"] or self.dataset.split["train"]
        view = views[self.n_validations % len(views)]
        self.n_validations += 1
        return view

    def validate(self, step: int, save_dir: str, writer) -> Dict[str, float]:
        """Render the next validation view (every rank its share of the rays) -> its metrics;
        rank 0 writes the panels and TensorBoard ({} elsewhere)."""
        view = self.validation_view()
        rays = self.dataset.view_rays(view)
        h, w = self.dataset.height, self.dataset.width
        blocks = self.shards.blocks(h * w)

        def render_block(block: slice) -> Dict[str, torch.Tensor]:  # on the CPU, to travel to rank 0
            return {k: v.cpu() for k, v in self.render_rays({k: v[block] for k, v in rays.items()}).items()}

        parts = [part for _, part in self.shards.map(render_block, blocks)]
        if not self.shards.writes:
            return {}
        rendered = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        images = with_ground_truth(as_images(rendered, h, w), {k: v.cpu() for k, v in rays.items()}, h, w)
        metrics = {"psnr": psnr(images["rgb"], images["gt_rgb"])}
        if self.dataset.has_masks:
            metrics["psnr_masked"] = psnr(images["rgb"], images["gt_rgb"], images["mask"])
        write_validation_panels(os.path.join(save_dir, f"it{step:06d}-val"), view, images, writer, step)
        for key, value in metrics.items():
            writer.add_scalar(f"val/{key}", value, step)
        log.info("validation at step %d, view %d: %s", step, view, " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        return metrics

    # --- test stage -----------------------------------------------------------------------------
    def test_views(self, out_dir: str) -> Tuple[List[int], Dict[str, Dict[str, float]]]:
        """Render the held-out views (in turns over the ranks) -> the views and, on rank 0,
        their metrics by '<view:06d>' (renders written to out_dir)."""
        views = self.dataset.split["test"] or self.dataset.split["train"][::8]
        per_view = {}
        turns = self.shards.map(self.test_view, views)
        for view, (rgb, view_metrics) in tqdm(turns, total=len(views), desc="test views", leave=False,
                                              disable=not self.shards.writes):
            save_image(os.path.join(out_dir, f"{view:06d}.png"), rgb)
            per_view[f"{view:06d}"] = view_metrics
        return views, per_view

    def test_view(self, view: int) -> Tuple[np.ndarray, Dict[str, float]]:
        """Render held-out view `view` -> its RGB [H, W, 3] (on the CPU, to travel to rank 0)
        and its image_metrics."""
        images = self.render_view(view)
        return images["rgb"].cpu().numpy(), image_metrics(images, self.dataset.has_masks)

    def render_orbit(self, out_dir: str, video_path: str) -> Optional[str]:
        """n_test_traj_steps frames on a circle fitted to the cameras, RGB | normals, as PNGs
        and an mp4 at 30 fps -> the video's path (rank 0; None elsewhere)."""
        poses = torch.from_numpy(orbit_poses(self.dataset.views.c2w, self.config.n_test_traj_steps)
                                 .astype(np.float32))  # [n, 3, 4]
        frames = []
        turns = self.shards.map(lambda i: self.orbit_frame(poses[i]), range(len(poses)))
        for i, frame in tqdm(turns, total=len(poses), desc="orbit video", leave=False, disable=not self.shards.writes):
            save_image(os.path.join(out_dir, f"traj-{i:04d}.png"), frame)
            frames.append(to_uint8(frame))
        if not self.shards.writes:
            return None
        imageio.mimwrite(video_path, frames, fps=30, quality=8, macro_block_size=2)
        log.info("orbit video: %s", video_path)
        return video_path

    def orbit_frame(self, c2w: torch.Tensor) -> np.ndarray:
        """The orbit camera c2w [3, 4] at 1/test_traj_downscale of the image size (even sides,
        for the video encoder) -> RGB | normals [h, 2w, 3] (on the CPU)."""
        scale = self.config.test_traj_downscale
        width, height = int(self.dataset.width / scale) // 2 * 2, int(self.dataset.height / scale) // 2 * 2
        intrinsics = torch.from_numpy((downscale_matrix(scale) @ self.dataset.views.intrinsics[0]).astype(np.float32))
        rays = self.dataset.pose_rays(c2w.to(self.device), intrinsics.to(self.device), width, height)
        images = self.render_image(rays, height, width)
        return np.concatenate([images["rgb"].cpu().numpy(), normal_image(images["normal"], images["opacity"])], axis=1)

    def test(self, step: int, save_dir: str, writer, export_mesh: Callable[[], List[str]],
             mesh_metrics: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
        """Held-out views (PSNR/SSIM, whole image and inside the mask), an orbit video and the
        mesh (export_mesh(), with mesh_metrics(path)) -> metrics.json and the metrics (rank 0;
        {} elsewhere). Every rank must call it."""
        out_dir = os.path.join(save_dir, f"it{step:06d}-test")
        views, per_view = self.test_views(out_dir)
        video = self.render_orbit(out_dir, os.path.join(save_dir, f"it{step:06d}-test.mp4"))
        mesh_paths = export_mesh()
        if not self.shards.writes:
            return {}
        mean = {k: float(np.mean([m[k] for m in per_view.values()])) for k in next(iter(per_view.values()))}
        metrics = {"step": step, "views": per_view, "mean": mean, "video": video}
        metrics["mesh"] = {"path": mesh_paths[0], **mesh_metrics(mesh_paths[0])}
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        for key, value in mean.items():
            writer.add_scalar(f"test/{key}", value, step)
        log.info("test at step %d over %d views: %s", step, len(views), " ".join(f"{k} {v:.3f}" for k, v in mean.items()))
        return metrics


def with_ground_truth(images: Dict[str, torch.Tensor], rays: Dict[str, torch.Tensor], height: int,
                      width: int) -> Dict[str, torch.Tensor]:
    """images plus the view's gt_rgb [H, W, 3] and mask [H, W] (from its rays)."""
    return {**images, "gt_rgb": rays["rgb"].view(height, width, 3), "mask": rays["mask"].view(height, width)}


def write_validation_panels(out_dir: str, view: int, images: Dict[str, torch.Tensor], writer, step: int) -> None:
    """RGB | ground truth | normals | depth (and foreground | background | opacity with a
    background model) to out_dir/<view>.png and TensorBoard."""
    panel = np.concatenate(
        [
            images["rgb"].cpu().numpy(),
            images["gt_rgb"].cpu().numpy(),
            normal_image(images["normal"], images["opacity"]),
            depth_image(images["depth"], images["opacity"]),
        ],
        axis=1,
    )
    save_image(os.path.join(out_dir, f"{view:06d}.png"), panel)
    writer.add_image("val/rgb_gt_normal_depth", panel.clip(0, 1), step, dataformats="HWC")
    writer.add_image("val/opacity", images["opacity"].clamp(0, 1).cpu().numpy(), step, dataformats="HW")
    if "rgb_background" in images:
        layers = np.concatenate(
            [
                images["rgb_foreground"].cpu().numpy(),
                images["rgb_background"].cpu().numpy(),
                np.repeat(images["opacity"].clamp(0, 1).cpu().numpy()[..., None], 3, axis=-1),
            ],
            axis=1,
        )
        save_image(os.path.join(out_dir, f"{view:06d}-foreground-background-opacity.png"), layers)
        writer.add_image("val/foreground_background_opacity", layers.clip(0, 1), step, dataformats="HWC")
