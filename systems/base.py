"""The training loop every system shares: steps, logging, validation cadence, checkpoints.

A system subclasses `BaseSystem` and writes the parts that are its own: `train_step`,
`validate`, `test`, `export_mesh`.
"""
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from utils.config import Configurable, to_primitive
from utils.misc import get_rng_state, set_rng_state

log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    max_steps: int = 20000
    train_num_rays: int = 256  # rays in the first step
    max_train_num_rays: int = 8192
    dynamic_ray_sampling: bool = True  # adapt the rays per step to keep ~num_samples_per_step samples
    num_samples_per_step: int = 262144
    log_every: int = 50  # steps between TensorBoard scalars / log lines
    val_every: int = 2500  # steps between validation renders (0: never)
    ckpt_every: int = 5000  # steps between checkpoints (0: only the final one)
    eval_chunk_rays: int = 4096  # rays rendered at once in validation / test
    test_at_end: bool = True  # --train ends with the test stage (renders, metrics, video, mesh)
    n_test_traj_steps: int = 60  # frames of the orbit video
    test_traj_downscale: float = 1.0  # render the orbit video at 1/this of the image size


@dataclass
class ExportConfig:
    mesh_resolution: int = 512  # marching cubes grid (fine pass) over the object region
    mesh_threshold: float = 0.0  # iso-level of the SDF
    mesh_chunk: int = 65536  # points per SDF evaluation
    formats: List[str] = field(default_factory=lambda: ["ply"])  # any of ply, obj, stl
    largest_component: bool = True  # keep only the largest connected piece
    cull_with_masks: bool = False  # drop faces that project outside the (dilated) masks
    fscore_threshold: float = 0.01  # F-score distance, in units of the normalised (unit-sphere) radius


@dataclass
class RunPaths:
    trial_dir: str
    ckpt_dir: str
    save_dir: str
    code_dir: str
    config_dir: str
    logs_dir: str
    log_file: str

    @classmethod
    def for_trial(cls, trial_dir: str, logs_dir: str = None) -> "RunPaths":
        return cls(
            trial_dir=trial_dir,
            ckpt_dir=os.path.join(trial_dir, "ckpt"),
            save_dir=os.path.join(trial_dir, "save"),
            code_dir=os.path.join(trial_dir, "code"),
            config_dir=os.path.join(trial_dir, "config"),
            logs_dir=logs_dir or os.path.join(trial_dir, "logs"),
            log_file=os.path.join(trial_dir, "train.log"),
        )


class BaseSystem(Configurable):
    def __init__(self, config: DictConfig, paths: RunPaths, device: torch.device):
        self.full_config = config
        self.config = config.system
        self.trainer_config: TrainerConfig = config.trainer
        self.paths = paths
        self.device = device
        self.global_step = 0
        self.train_num_rays = self.trainer_config.train_num_rays
        self._writer = None

    # --- to be written by each system -------------------------------------------------
    def train_step(self, step: int) -> Dict[str, float]:
        raise NotImplementedError

    def validate(self) -> Dict[str, float]:
        raise NotImplementedError

    def test(self) -> Dict[str, Any]:
        raise NotImplementedError

    def export_mesh(self) -> str:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------
    @property
    def writer(self) -> SummaryWriter:
        if self._writer is None:
            self._writer = SummaryWriter(self.paths.logs_dir)
        return self._writer

    def fit(self) -> None:
        cfg = self.trainer_config
        log.info("training from step %d to %d on %s", self.global_step, cfg.max_steps, self.device)
        bar = tqdm(total=cfg.max_steps, initial=self.global_step, dynamic_ncols=True, desc="train", mininterval=1.0)
        window: List[Dict[str, float]] = []
        while self.global_step < cfg.max_steps:
            start = time.perf_counter()
            stats = self.train_step(self.global_step)
            self.global_step += 1
            stats["seconds_per_step"] = time.perf_counter() - start
            window.append(stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", psnr=f"{stats['psnr']:.2f}", lr=f"{stats['lr']:.2e}")
            if self.global_step % cfg.log_every == 0 or self.global_step == cfg.max_steps:
                self.log_scalars(window)
                window = []
            if cfg.val_every > 0 and self.global_step % cfg.val_every == 0:
                self.validate()
            if cfg.ckpt_every > 0 and self.global_step % cfg.ckpt_every == 0:
                self.save()
        bar.close()
        if not os.path.exists(self.checkpoint_path(self.global_step)):
            self.save()
        if cfg.test_at_end:
            self.test()

    def log_scalars(self, window: List[Dict[str, float]]) -> None:
        mean = {k: sum(s[k] for s in window) / len(window) for k in window[-1]}
        for key, value in mean.items():
            self.writer.add_scalar(f"train/{key}", value, self.global_step)
        log.info(
            "step %d/%d loss %.4f psnr %.2f lr %.2e rays %d samples/ray %.1f inv_s %.1f %.3f s/step",
            self.global_step, self.trainer_config.max_steps, mean["loss"], mean["psnr"], mean["lr"],
            mean["rays"], mean["samples_per_ray"], mean["inv_s"], mean["seconds_per_step"],
        )

    def checkpoint_path(self, step: int) -> str:
        return os.path.join(self.paths.ckpt_dir, checkpoint_name(step))

    def save(self) -> str:
        path = self.checkpoint_path(self.global_step)
        state = {
            "step": self.global_step,
            "train_num_rays": self.train_num_rays,
            "rng": get_rng_state(),
            "config": to_primitive(self.full_config),
            **self.state_dict(),
        }
        save_checkpoint(path, state)
        log.info("saved checkpoint %s", path)
        return path

    def load(self, path: str) -> None:
        state = load_checkpoint(path, map_location="cpu")
        self.load_state_dict(state)
        self.global_step = int(state["step"])
        self.train_num_rays = int(state["train_num_rays"])
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.global_step)
