"""The NeuS task: what is NeuS in training — its dataset and model, the loss of a ray batch
and what to log of it — plus its evaluation (systems/evaluation.py) and mesh export
(systems/export.py). The step itself (autocast, backward, scaler, ranks) is the trainer's."""
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ContextManager, Dict, List, Tuple

import torch
from omegaconf import DictConfig

from models import MODELS
from process_data import DATASETS
from systems.backends import with_backends
from systems.evaluation import Evaluation
from systems.export import MeshExport
from systems.losses import LossConfig, neus_losses, with_sample_weight
from systems.optim import OptimizerConfig, SchedulerConfig
from systems.registry import SYSTEMS
from utils.config import Configurable
from utils.metrics import psnr

log = logging.getLogger(__name__)


@dataclass
class Telemetry:
    """What the trainer needs to know of a step's forward besides the losses: this rank's rays
    and samples (the ray budget, sample weighting), scalars to average over ranks for logging,
    and scalars that are the same on every rank."""

    n_rays: int
    n_samples: int
    n_bg_samples: int = 0  # the background model's, counted in the ray budget
    rank_mean: Dict[str, float] = field(default_factory=dict)
    scalars: Dict[str, float] = field(default_factory=dict)


@SYSTEMS.register("neus")
class NeuSTask(Configurable):
    @dataclass
    class Config:
        name: str = "neus"
        loss: LossConfig = field(default_factory=LossConfig)
        optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
        scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __init__(self, config: DictConfig, device: torch.device, backends: Dict[str, str]):
        """config: the run's; backends: what start-up chose for each component (the model is
        built from the config with them filled in)."""
        self.full_config = config
        self.config = config.system
        self.device = device
        self.dataset = DATASETS.get(config.dataset.name)(config.dataset, device)
        self.model = MODELS.get(config.model.name)(with_backends(config, backends).model).to(device)
        self.evaluation = Evaluation(self.model, self.dataset, config.trainer, device)
        self.mesh = MeshExport(self.model, self.dataset, config.export, device)

    # --- training -----------------------------------------------------------------------------
    def start_training(self) -> None:
        """Before the first step of a fresh run (a resumed one holds it in the model's state):
        the plane below which the opacity prior does not count (loss.opacity_spares_support)."""
        loss, export = self.config.loss, self.full_config.export
        if not (loss.opacity_spares_support and loss.lambda_opacity > 0 and self.model.background is not None):
            return
        if not (export.isolate and export.isolate_from_points):
            log.warning("system.loss.opacity_spares_support is ignored without export.isolate and "
                        "export.isolate_from_points (it spares only what their cut removes)")
            return
        plane = self.mesh.photo_plane()
        if plane is None:
            log.info("opacity prior: no support plane among the photos' points; it counts everywhere")
            return
        # above the export's cut: what lies below it never reaches the mesh
        self.model.set_prior_plane(plane.normal, plane.offset - export.isolate_points_margin)
        log.info("opacity prior: counted above n=(%.3f, %.3f, %.3f) d=%.3f, %.3f from the support plane found in "
                 "the photos' points", *plane.normal, plane.offset, export.isolate_points_margin)

    def parameter_groups(self) -> Dict[str, list]:
        return self.model.parameter_groups()

    def set_step(self, step: int) -> None:
        """Training mode, and the schedules that follow the step (cos anneal, hash-grid levels)."""
        self.model.train()
        self.model.set_step(step)

    def update_shared_state(self, step: int) -> List[torch.Tensor]:
        """The occupancy grids' periodic updates -> the tensors they changed (the trainer copies
        them to the other ranks)."""
        return self.model.update_occupancy(step)

    def sample_batch(self, n_rays: int) -> Dict[str, torch.Tensor]:
        return self.dataset.sample_rays(n_rays)

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor],
             autocast: ContextManager) -> Tuple[Dict[str, torch.Tensor], Telemetry]:
        """Render the batch's rays with `model` (the trainer's: maybe data-parallel) -> the
        weighted loss terms and their sum under 'total', and the step's Telemetry."""
        with autocast:  # the networks' matmuls; their outputs and all that follows are float32
            out = model(batch["rays_o"], batch["rays_d"], batch["background"])
        # outside autocast: binary_cross_entropy refuses it, and the losses are float32 anyway
        losses = neus_losses(self.config.loss, out, batch)
        n_rays = batch["rays_o"].shape[0]
        telemetry = Telemetry(n_rays=n_rays, n_samples=out["n_samples"],
                              n_bg_samples=out["background"]["n_samples"] if "background" in out else 0)
        if all(torch.isfinite(v) for k, v in losses.items() if k != "total"):
            telemetry.rank_mean["psnr"] = psnr(out["rgb"].detach(), batch["rgb"])
            if "background" in out:
                telemetry.rank_mean["bg_samples_per_ray"] = out["background"]["n_samples"] / n_rays
            telemetry.scalars["inv_s"] = out["inv_s"].item()
        return losses, telemetry

    @staticmethod
    def weight_for_sample_share(losses: Dict[str, torch.Tensor], weight: float) -> Dict[str, torch.Tensor]:
        """The per-sample terms (eikonal, sparsity) times weight = world_size x this rank's
        share of the step's samples, so that the ranks' averaged gradient is that of the mean
        over all samples."""
        return with_sample_weight(losses, weight)

    @staticmethod
    def progress(stats: Dict[str, float]) -> Dict[str, str]:
        """The task's scalars on the progress bar and the log line."""
        shown = {"psnr": ("psnr", ".2f"), "samples_per_ray": ("samples/ray", ".1f"), "inv_s": ("inv_s", ".1f")}
        return {name: format(stats[key], spec) for key, (name, spec) in shown.items() if key in stats}

    # --- evaluation and export (every rank calls them; rank 0 writes) --------------------------
    def validate(self, step: int, save_dir: str, writer) -> Dict[str, float]:
        return self.evaluation.validate(step, save_dir, writer)

    def test(self, step: int, save_dir: str, writer) -> Dict[str, Any]:
        return self.evaluation.test(step, save_dir, writer, lambda: self.export_mesh(step, save_dir),
                                    self.mesh_metrics)

    def export_mesh(self, step: int, save_dir: str) -> List[str]:
        return self.mesh.export(step, save_dir)

    def mesh_metrics(self, mesh_path: str) -> Dict[str, float]:
        """Chamfer / F-score against the scene's ground-truth mesh (dataset.gt_mesh, else
        <root_dir>/gt_mesh.ply), if it has one."""
        dataset = self.full_config.dataset
        gt_path = dataset.get("gt_mesh") or os.path.join(dataset.root_dir, "gt_mesh.ply")
        return self.mesh.metrics(mesh_path, gt_path)
