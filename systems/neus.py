"""Training, evaluation and export for NeuS models."""
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import imageio.v2 as imageio
import numpy as np
import torch
import trimesh
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import MODELS
from process_data import DATASETS
from systems.base import BaseSystem
from systems.losses import LossConfig, neus_losses, with_sample_weight
from systems.optim import (
    OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler, fit_state_to_parameter_shapes,
)
from systems.registry import SYSTEMS
from utils.mesh import (
    extract_surface,
    faces_inside_masks,
    grid_shape,
    largest_component,
    remove_unused_vertices,
    save_mesh,
    sdf_on_grid,
    to_world,
)
from utils import distributed as dist
from utils.camera import downscale_matrix, orbit_poses
from utils.isolate import find_support_plane, split_at_plane
from utils.metrics import mesh_metrics, psnr, ssim
from utils.misc import map_in_chunks
from utils.visualize import depth_image, normal_image, save_image, to_uint8

log = logging.getLogger(__name__)


@SYSTEMS.register("neus")
class NeuSSystem(BaseSystem):
    @dataclass
    class Config:
        name: str = "neus"
        loss: LossConfig = field(default_factory=LossConfig)
        optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
        scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __init__(self, config, paths, device):
        super().__init__(config, paths, device)
        self.dataset = DATASETS.get(config.dataset.name)(config.dataset, device)
        self.model = MODELS.get(config.model.name)(config.model, device=str(device)).to(device)
        self.optimizer = build_optimizer(self.model.parameter_groups(), self.config.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.config.scheduler)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.train_model = self.model if dist.world_size() == 1 else self.wrap_data_parallel(self.model, device)
        self.n_validations = 0
        self.eval_chunk_rays = self.trainer_config.eval_chunk_rays  # halved for good on out-of-memory

    # --- training -----------------------------------------------------------------------
    @staticmethod
    def wrap_data_parallel(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
        """DDP averages the gradients over ranks during backward (the eikonal term's
        double backward included: its autograd.grad is taken w.r.t. the sample points inside
        forward, so the parameters' gradients still accumulate once, in backward). Buffers are
        not re-broadcast each forward: the occupancy grids are synchronised where they change
        (update_occupancy), the schedules follow the step, identical on every rank."""
        return DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False
        )

    def train_step(self, step: int) -> Dict[str, float]:
        self.model.train()
        self.model.set_step(step)
        self.update_occupancy(step)
        return self.optimise(self.dataset.sample_rays(self.rays_per_rank()))

    def update_occupancy(self, step: int) -> None:
        """Rank 0 updates the occupancy grids and the other ranks take a copy, so that every
        rank marches through the same cells. The update draws random cells from torch's RNG,
        which is each rank's own ray stream; copying rank 0's grid keeps the ranks identical
        without a second random stream kept in step on every rank."""
        if dist.is_main():
            self.model.update_occupancy(step)
        if dist.world_size() > 1:
            dist.broadcast_(self.model.occupancy_state_updated_at(step))

    def optimise(self, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """One optimisation step on this rank's rays; with several ranks the gradients are
        those of the loss over all ranks' rays (mean over rays, and over samples for the
        per-sample terms), and every rank skips a step that is non-finite on any rank."""
        with self.autocast():  # the networks' matmuls; their outputs and all that follows are float32
            out = self.train_model(batch["rays_o"], batch["rays_d"], batch["background"])
        # outside autocast: binary_cross_entropy refuses it, and the losses are float32 anyway
        losses = neus_losses(self.config.loss, out, batch)
        self.optimizer.zero_grad(set_to_none=True)
        non_finite = [k for k, v in losses.items() if k != "total" and not torch.isfinite(v)]
        n_rays, n_samples = batch["rays_o"].shape[0], out["n_samples"]
        n_bg_samples = out["background"]["n_samples"] if "background" in out else 0
        if dist.world_size() > 1:
            # one all-reduce: ranks with a non-finite loss, and the step's rays and samples
            bad_ranks, n_rays, n_samples, n_bg_samples = dist.all_reduce_sum(
                torch.tensor([float(bool(non_finite)), n_rays, n_samples, n_bg_samples], dtype=torch.float64)
            ).tolist()
            n_rays, n_samples, n_bg_samples = int(n_rays), int(n_samples), int(n_bg_samples)
            if bad_ranks and not non_finite:
                non_finite.append("loss on another rank")
            losses = with_sample_weight(losses, dist.world_size() * out["n_samples"] / max(n_samples, 1))
        backward = not non_finite and losses["total"].requires_grad  # the same on every rank
        if backward:
            self.scaler.scale(losses["total"]).backward(inputs=self.params)
            self.scaler.unscale_(self.optimizer)  # true gradients (fp16-mixed), checked like fp32 ones
            if not self.gradients_are_finite(self.params):  # averaged over ranks: the same everywhere
                non_finite.append("gradient")
        if not non_finite:
            self.scaler.step(self.optimizer)
            self.update_ray_count(n_rays, n_samples, n_bg_samples)
        scaler_backoff = False
        if backward:  # fp16-mixed: grows the loss scale, or halves it after a non-finite gradient
            self.scaler.update()
            if self.scaler.is_enabled() and non_finite == ["gradient"]:
                scaler_backoff = True  # a finite loss: most likely float16 overflow at this scale
                non_finite[-1] = f"gradient (float16 overflow? loss scale now {self.scaler.get_scale():g})"
        self.scheduler.step()
        if non_finite:  # the parameters stay as they were; fit() counts the step and may roll back
            return {"skipped": 1.0, "non_finite": ", ".join(non_finite), "scaler_backoff": float(scaler_backoff)}
        stats = {f"loss_{k}": v.item() for k, v in losses.items() if k != "total"}
        stats.update(loss=losses["total"].item(), psnr=psnr(out["rgb"].detach(), batch["rgb"]))
        if "background" in out:
            stats["bg_samples_per_ray"] = out["background"]["n_samples"] / batch["rays_o"].shape[0]
        stats = dist.mean_over_ranks(stats)
        stats.update(
            lr=self.optimizer.param_groups[0]["lr"],
            inv_s=out["inv_s"].item(),
            rays=float(n_rays),
            samples_per_ray=n_samples / n_rays,
            skipped=0.0,
        )
        if self.mixed_precision:
            stats["loss_scale"] = self.scaler.get_scale()
        return stats

    def update_ray_count(self, n_rays: int, n_samples: int, n_bg_samples: int = 0) -> None:
        """The next step's rays (all ranks together): next_ray_count over this step's rays,
        foreground and background samples (over all ranks)."""
        cfg = self.trainer_config
        if not cfg.dynamic_ray_sampling:
            return
        self.train_num_rays = next_ray_count(n_rays, n_samples, n_bg_samples, cfg.num_samples_per_step,
                                             cfg.background_sample_cost, cfg.max_train_num_rays)

    # --- evaluation ---------------------------------------------------------------------
    # Under torchrun every rank renders: the test views and the orbit frames are shared out in
    # turns (rank r takes r, r + N, ...), a validation view and the SDF grids by rows; rank 0
    # gathers the results and alone writes images, TensorBoard, metrics.json and the mesh. No
    # rank waits in a collective while another renders a whole test set; at the end they wait
    # (run.py's last barrier) only while rank 0 runs marching cubes and cleans the mesh.
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

    def render_image_on_ranks(
        self, rays: Dict[str, torch.Tensor], height: int, width: int
    ) -> Optional[Dict[str, torch.Tensor]]:
        """render_image with the rays shared out over the ranks (rank_slice) -> the images on
        rank 0 (None elsewhere)."""
        n = height * width
        mine = self.render_rays({k: v[dist.rank_slice(n)] for k, v in rays.items()})
        gathered = {k: dist.gather_rows(v, n) for k, v in mine.items()}
        return as_images(gathered, height, width) if dist.is_main() else None

    def render_view(self, index: int) -> Dict[str, torch.Tensor]:
        """Render view `index` -> render_image's images plus gt_rgb [H, W, 3], mask [H, W]."""
        rays = self.dataset.view_rays(index)
        return self.with_ground_truth(self.render_image(rays, self.dataset.height, self.dataset.width), rays)

    def render_view_on_ranks(self, index: int) -> Optional[Dict[str, torch.Tensor]]:
        """render_view with the view's rays shared out over the ranks -> the images on rank 0
        (None elsewhere)."""
        rays = self.dataset.view_rays(index)
        images = self.render_image_on_ranks(rays, self.dataset.height, self.dataset.width)
        return self.with_ground_truth(images, rays) if dist.is_main() else None

    def with_ground_truth(
        self, images: Dict[str, torch.Tensor], rays: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """images plus the view's gt_rgb [H, W, 3] and mask [H, W] (from its rays)."""
        h, w = self.dataset.height, self.dataset.width
        return {**images, "gt_rgb": rays["rgb"].view(h, w, 3), "mask": rays["mask"].view(h, w)}

    def validation_view(self) -> int:
        views = self.dataset.split["test"] or self.dataset.split["train"]
        view = views[self.n_validations % len(views)]
        self.n_validations += 1
        return view

    def validate(self) -> Dict[str, float]:
        """Render the next validation view (every rank its share of the rays) -> its metrics;
        rank 0 writes the panels and TensorBoard ({} elsewhere)."""
        view = self.validation_view()
        images = self.render_view_on_ranks(view)
        if not dist.is_main():
            return {}
        metrics = {"psnr": psnr(images["rgb"], images["gt_rgb"])}
        if self.dataset.has_masks:
            metrics["psnr_masked"] = psnr(images["rgb"], images["gt_rgb"], images["mask"])
        self.write_validation_panels(view, images)
        for key, value in metrics.items():
            self.writer.add_scalar(f"val/{key}", value, self.global_step)
        log.info("validation at step %d, view %d: %s", self.global_step, view,
                 " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        return metrics

    def write_validation_panels(self, view: int, images: Dict[str, torch.Tensor]) -> None:
        """RGB | ground truth | normals | depth (and foreground | background | opacity with a
        background model) to save/it<step>-val/ and TensorBoard."""
        out_dir = os.path.join(self.paths.save_dir, f"it{self.global_step:06d}-val")
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
        self.writer.add_image("val/rgb_gt_normal_depth", panel.clip(0, 1), self.global_step, dataformats="HWC")
        self.writer.add_image("val/opacity", images["opacity"].clamp(0, 1).cpu().numpy(), self.global_step,
                              dataformats="HW")
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
            self.writer.add_image("val/foreground_background_opacity", layers.clip(0, 1), self.global_step,
                                  dataformats="HWC")

    def test(self) -> Dict[str, Any]:
        """Held-out views (PSNR/SSIM, whole image and inside the mask), an orbit video and the
        mesh (with Chamfer/F-score when the scene has a ground-truth mesh) -> metrics.json and
        the metrics (rank 0; {} elsewhere). Every rank must call it."""
        out_dir = os.path.join(self.paths.save_dir, f"it{self.global_step:06d}-test")
        views = self.dataset.split["test"] or self.dataset.split["train"][::8]
        per_view = {}
        turns = dist.map_in_turns(self.test_view, views)
        for view, (rgb, view_metrics) in tqdm(turns, total=len(views), desc="test views", leave=False,
                                              disable=not dist.is_main()):
            save_image(os.path.join(out_dir, f"{view:06d}.png"), rgb)
            per_view[f"{view:06d}"] = view_metrics
        video = self.render_orbit(out_dir)
        mesh_paths = self.export_mesh()
        if not dist.is_main():
            return {}
        mean = {k: float(np.mean([m[k] for m in per_view.values()])) for k in next(iter(per_view.values()))}
        metrics = {"step": self.global_step, "views": per_view, "mean": mean, "video": video}
        metrics["mesh"] = {"path": mesh_paths[0], **self.mesh_metrics(mesh_paths[0])}
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        for key, value in mean.items():
            self.writer.add_scalar(f"test/{key}", value, self.global_step)
        log.info("test at step %d over %d views: %s", self.global_step, len(views),
                 " ".join(f"{k} {v:.3f}" for k, v in mean.items()))
        return metrics

    def test_view(self, view: int) -> Tuple[np.ndarray, Dict[str, float]]:
        """Render held-out view `view` -> its RGB [H, W, 3] (on the CPU, to travel to rank 0)
        and its image_metrics."""
        images = self.render_view(view)
        return images["rgb"].cpu().numpy(), image_metrics(images, self.dataset.has_masks)

    def render_orbit(self, out_dir: str) -> Optional[str]:
        """n_test_traj_steps frames on a circle fitted to the cameras, RGB | normals, as PNGs
        and an mp4 at 30 fps -> the video's path (rank 0; None elsewhere)."""
        poses = torch.from_numpy(orbit_poses(self.dataset.views.c2w, self.trainer_config.n_test_traj_steps)
                                 .astype(np.float32))  # [n, 3, 4]
        frames = []
        turns = dist.map_in_turns(lambda i: self.orbit_frame(poses[i]), range(len(poses)))
        for i, frame in tqdm(turns, total=len(poses), desc="orbit video", leave=False, disable=not dist.is_main()):
            save_image(os.path.join(out_dir, f"traj-{i:04d}.png"), frame)
            frames.append(to_uint8(frame))
        if not dist.is_main():
            return None
        path = os.path.join(self.paths.save_dir, f"it{self.global_step:06d}-test.mp4")
        imageio.mimwrite(path, frames, fps=30, quality=8, macro_block_size=2)
        log.info("orbit video: %s", path)
        return path

    def orbit_frame(self, c2w: torch.Tensor) -> np.ndarray:
        """The orbit camera c2w [3, 4] at 1/test_traj_downscale of the image size (even sides,
        for the video encoder) -> RGB | normals [h, 2w, 3] (on the CPU)."""
        scale = self.trainer_config.test_traj_downscale
        width, height = int(self.dataset.width / scale) // 2 * 2, int(self.dataset.height / scale) // 2 * 2
        intrinsics = torch.from_numpy((downscale_matrix(scale) @ self.dataset.views.intrinsics[0]).astype(np.float32))
        rays = self.dataset.pose_rays(c2w.to(self.device), intrinsics.to(self.device), width, height)
        images = self.render_image(rays, height, width)
        return np.concatenate([images["rgb"].cpu().numpy(), normal_image(images["normal"], images["opacity"])], axis=1)

    def mesh_metrics(self, mesh_path: str) -> Dict[str, float]:
        """Chamfer / F-score against the scene's ground-truth mesh, if it has one (world units)."""
        gt_path = self.full_config.dataset.gt_mesh or os.path.join(self.full_config.dataset.root_dir, "gt_mesh.ply")
        if not os.path.isfile(gt_path):
            return {}
        pred, gt = trimesh.load(mesh_path, process=False), trimesh.load(gt_path, process=False)
        world_radius = float(np.abs(np.linalg.det(self.dataset.views.scale_mat[:3, :3])) ** (1 / 3))
        result = mesh_metrics(
            np.asarray(pred.vertices), np.asarray(pred.faces), np.asarray(gt.vertices), np.asarray(gt.faces),
            threshold=self.full_config.export.fscore_threshold * world_radius,
        )
        result["gt_mesh"] = gt_path
        result["unit_sphere_radius_world"] = world_radius
        log.info("mesh vs %s: %s", gt_path, result)
        return result

    def export_mesh(self) -> List[str]:
        """Marching cubes on the SDF -> coloured mesh in the dataset's world frame, written to
        save/it<step>-mc<res>.<fmt> -> the paths (rank 0; [] elsewhere). Every rank must call it."""
        cfg = self.full_config.export
        surface = self.surface()
        if not dist.is_main():
            return []
        vertices, faces = surface
        removed = None
        if cfg.isolate:
            faces, removed = self.isolate_object(vertices, faces)
        if cfg.largest_component:
            faces = largest_component(faces)
        vertices, faces = remove_unused_vertices(vertices, faces)
        vertices_world = to_world(vertices, self.dataset.views.scale_mat)
        if cfg.cull_with_masks and self.dataset.has_masks:
            views = self.dataset.views
            faces = faces_inside_masks(vertices_world, faces, views.world_mats, views.masks)
            vertices, faces, vertices_world = remove_unused_vertices(vertices, faces, vertices_world)
        points = torch.from_numpy(vertices.astype(np.float32)).to(self.device)
        colors = self.model.surface_colors(points, cfg.mesh_chunk).cpu().numpy()
        stem = os.path.join(self.paths.save_dir, f"it{self.global_step:06d}-mc{cfg.mesh_resolution}")
        paths = save_mesh(stem, vertices_world, faces, colors, list(cfg.formats))
        if cfg.texture:
            from systems.texture import export_textured

            paths += export_textured(self.model, vertices, faces, self.dataset.views.scale_mat, cfg, stem, self.device)
        log.info("mesh: %d vertices, %d faces -> %s", len(vertices_world), len(faces), ", ".join(paths))
        if removed is not None and len(removed):
            removed_world, removed = remove_unused_vertices(to_world(surface[0], self.dataset.views.scale_mat), removed)
            removed_path = save_mesh(f"{stem}-removed", removed_world, removed, None, ["ply"])[0]
            log.info("isolate: the cut-off support and pieces (%d faces) -> %s", len(removed), removed_path)
        return paths

    def isolate_object(self, vertices: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """export.isolate: the faces of the object above its supporting plane and the faces cut
        off (None when no support plane is found: the surface is kept whole)."""
        cfg = self.full_config.export
        plane = find_support_plane(vertices, faces, self.dataset.views.c2w, self.model.config.radius,
                                   cfg.isolate_tolerance)
        if plane is None:
            log.info("isolate: no supporting plane under the object (cameras on one side, reaching the region's "
                     "edge); the mesh is kept whole")
            return faces, None
        kept, removed = split_at_plane(vertices, faces, plane, cfg.isolate_margin)
        log.info("isolate: support plane n=(%.3f, %.3f, %.3f) d=%.3f carries %.0f%% of the surface; kept %d of %d "
                 "faces", *plane.normal, plane.offset, 100 * plane.area_share, len(kept), len(faces))
        return kept, removed

    def surface(self) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """utils.mesh.extract_surface's coarse-then-fine marching cubes, each SDF grid's x-planes
        shared out over the ranks and marching cubes on rank 0 -> vertices [V, 3], faces [F, 3]
        in the normalised frame (rank 0; None elsewhere)."""
        cfg = self.full_config.export
        self.model.eval()
        # rank 0 alone holds the coarse grid: the others take its fine box, so all evaluate one grid
        return extract_surface(self.sdf_grid, self.model.config.radius, cfg.mesh_resolution, cfg.mesh_threshold,
                               agree=dist.broadcast_object)

    def sdf_grid(self, bounds: np.ndarray, resolution: int) -> Tuple[Optional[np.ndarray], np.ndarray]:
        """utils.mesh.sdf_on_grid, this rank evaluating its rank_slice of the x-planes -> the
        whole grid [nx, ny, nz] on rank 0 (None elsewhere), and the voxel size."""
        n_planes = grid_shape(bounds, resolution)[0][0]
        cfg = self.full_config.export
        mine, voxel = sdf_on_grid(self.model.mesh_sdf, bounds, resolution, cfg.mesh_chunk, self.device,
                                  dist.rank_slice(n_planes))  # [planes of this rank, ny, nz]
        values = dist.gather_rows(torch.from_numpy(mine), n_planes)
        return (values.numpy() if values is not None else None), voxel

    # --- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        fit_state_to_parameter_shapes(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])


def next_ray_count(n_rays: int, n_samples: int, n_bg_samples: int, budget: int, bg_cost: float,
                   max_rays: int, min_rays: int = 64) -> int:
    """The ray count whose step costs about `budget` foreground samples, from this step's:
    cost = n_samples + bg_cost * n_bg_samples (a background sample costs bg_cost of a
    foreground one: no SDF gradient, no eikonal double backward, a smaller grid), and
    rays = n_rays * budget / cost, clamped to [min_rays, max_rays]. Without the background
    term an unmasked run whose foreground samples per ray fall would buy ever more rays, each
    paying for all its background samples: its steps grew from 0.3 s to 1 s."""
    cost = n_samples + bg_cost * n_bg_samples
    return int(min(max(n_rays * budget / max(cost, 1.0), min_rays), max_rays))


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
