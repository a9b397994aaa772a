"""The training loop every system shares: steps, logging, validation cadence, checkpoints.

A system subclasses `BaseSystem` and writes the parts that are its own: `train_step`,
`validate`, `test`, `export_mesh`.
"""
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from systems.backends import resolve_backends
from utils.checkpoint import (
    CheckpointError,
    checkpoint_name,
    checkpoints_in,
    load_checkpoint,
    newest_loadable,
    prune_checkpoints,
    save_checkpoint,
    step_of,
)
from utils import distributed as dist
from utils.config import Configurable, to_primitive
from utils.logger import NullWriter
from utils.misc import get_rng_state, process_age, seed_everything, set_rng_state

log = logging.getLogger(__name__)
MIN_LOSS_SCALE = 1.0  # below it, fp16-mixed overflow skips count towards a rollback (on_bad_step)


@dataclass
class TrainerConfig:
    max_steps: int = 20000
    train_num_rays: int = 256  # rays in the first step
    max_train_num_rays: int = 8192
    dynamic_ray_sampling: bool = True  # adapt the rays per step to keep ~num_samples_per_step samples
    num_samples_per_step: int = 262144
    # a background sample's cost in foreground samples, in that budget (systems.neus.next_ray_count)
    background_sample_cost: float = 0.3
    log_every: int = 50  # steps between TensorBoard scalars / log lines
    val_every: int = 2500  # steps between validation renders (0: never)
    ckpt_every: int = 5000  # steps between checkpoints (0: only the final one)
    keep_checkpoints: int = 3  # newest checkpoints kept in ckpt/ (0: all); the final one always stays
    # a step whose loss or gradient is not finite is skipped; after max_bad_steps of them in a
    # row training rolls back to the newest checkpoint with the learning rates times
    # rollback_lr_factor, at most max_rollbacks times
    max_bad_steps: int = 10
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    # auto: fp16-mixed on CUDA (float16 autocast around the model's forward, a grad scaler whose
    # skipped steps count as non-finite ones), fp32 on CPU; or fp16-mixed | fp32 explicitly
    precision: str = "auto"
    eval_chunk_rays: int = 4096  # rays rendered at once in validation / test
    test_at_end: bool = True  # --train ends with the test stage (renders, metrics, video, mesh)
    # also write a checkpoint to <trial>/curve/ when the command's wall clock (from process start,
    # minus the time spent writing these) passes each of these seconds (scripts/curve.py)
    checkpoint_at_seconds: List[float] = field(default_factory=list)
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
    # the object without its support (utils/isolate.py): find the plane it stands on (all cameras
    # above it, reaching the region's edge) and cut the surface `isolate_margin` above it (normalised
    # units); what is cut goes to it<step>-mc<res>-removed.ply. On in the unmasked configs.
    isolate: bool = False
    isolate_margin: float = 0.02
    isolate_tolerance: float = 0.01  # RANSAC inlier distance of the plane
    # a textured mesh beside the coloured one (systems/texture.py): it<step>-mc<res>-textured.obj
    # (+ .mtl, .png) and .glb, the mesh decimated to texture_faces, a texture_size^2 atlas
    texture: bool = False
    texture_faces: int = 100000
    texture_size: int = 2048


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


class WallClockMarks:
    """trainer.checkpoint_at_seconds: a checkpoint in <trial>/curve/ each time the command's
    wall clock passes a mark, not counting the time spent writing them, and
    <trial>/curve/marks.json listing {mark, seconds, step, path}. Rank 0's clock decides."""

    def __init__(self, seconds: List[float], trial_dir: str):
        self.pending = sorted(float(s) for s in seconds)
        self.folder = os.path.join(trial_dir, "curve")
        self.paused = 0.0  # seconds spent writing mark checkpoints
        self.written: List[Dict[str, Any]] = []

    def save_if_due(self, system: "BaseSystem") -> None:
        if not self.pending:
            return
        elapsed = dist.broadcast_object(process_age() - self.paused)  # rank 0's clock
        if elapsed < self.pending[0]:
            return
        started = time.perf_counter()
        mark = self.pending.pop(0)
        while self.pending and elapsed >= self.pending[0]:  # a step longer than the gap: one file
            self.pending.pop(0)
        if dist.is_main():
            os.makedirs(self.folder, exist_ok=True)
        path = system.save(os.path.join(self.folder, checkpoint_name(system.global_step)))
        if dist.is_main():
            self.written.append({"mark": mark, "seconds": round(elapsed, 2), "step": system.global_step,
                                 "path": os.path.abspath(path)})
            with open(os.path.join(self.folder, "marks.json"), "w") as f:
                json.dump(self.written, f, indent=1)
        self.paused += time.perf_counter() - started


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM stopped training; a checkpoint of the current step was written."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(f"{signal.Signals(signum).name} at checkpoint {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


class TrainingDiverged(RuntimeError):
    """Non-finite steps that rolling back could not cure."""


class BaseSystem(Configurable):
    def __init__(self, config: DictConfig, paths: RunPaths, device: torch.device):
        self.full_config = config
        self.config = config.system
        self.trainer_config: TrainerConfig = config.trainer
        self.paths = paths
        self.device = device
        self.global_step = 0
        self.train_num_rays = self.trainer_config.train_num_rays
        self.lr_scale = 1.0  # product of the rollbacks' learning-rate factors
        self.skipped_steps = 0
        self.rollbacks = 0
        self.bad_steps_in_a_row = 0
        self._stop_signal: Optional[int] = None
        self.step_callbacks: List[Any] = []  # called with the step after each training step (the live viewer)
        self._writer = None
        # {config key: backend} of every component, and trainer.precision; fails here (ConfigError
        # naming the key) when the device cannot serve a request, before any model is built
        self.backends = resolve_backends(config, device)
        self.mixed_precision = self.backends["trainer.precision"] == "fp16-mixed"
        # disabled (fp32): scale / unscale_ / update do nothing and step is optimizer.step
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.mixed_precision)

    # --- to be written by each system -------------------------------------------------
    def train_step(self, step: int) -> Dict[str, float]:
        raise NotImplementedError

    # validate, test and export_mesh run on every rank (each renders a share); rank 0 writes
    def validate(self) -> Dict[str, float]:
        raise NotImplementedError

    def test(self) -> Dict[str, Any]:
        raise NotImplementedError

    def export_mesh(self) -> List[str]:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------
    def autocast(self):
        """float16 autocast for the training forward under fp16-mixed, else nothing."""
        if not self.mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.float16)

    @property
    def writer(self) -> SummaryWriter:
        """TensorBoard on rank 0; on the other ranks a writer that drops everything."""
        if self._writer is None:
            self._writer = SummaryWriter(self.paths.logs_dir) if dist.is_main() else NullWriter()
        return self._writer

    def rays_per_rank(self) -> int:
        """This rank's share of the step's global ray budget (equal on every rank, so that the
        mean of the ranks' per-ray losses is the mean over all rays)."""
        return max(self.train_num_rays // dist.world_size(), 1)

    def fit(self) -> None:
        """Train to max_steps: validation and checkpoints on their cadence, non-finite steps
        skipped (rolled back when they persist), SIGINT / SIGTERM -> checkpoint and
        TrainingInterrupted; then the test stage."""
        cfg = self.trainer_config
        log.info("training from step %d to %d on %s%s", self.global_step, cfg.max_steps, self.device,
                 f" x {dist.world_size()} ranks" if dist.world_size() > 1 else "")
        if dist.broadcast_object(not checkpoints_in(self.paths.ckpt_dir)):
            self.save()  # something to roll back to, even before the first checkpoint is due
        previous_handlers = self._catch_stop_signals()
        try:
            self._train_loop()
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        if dist.broadcast_object(not os.path.exists(self.checkpoint_path(self.global_step))):
            self.save()
        if cfg.test_at_end:
            self.test()

    def _train_loop(self) -> None:
        cfg = self.trainer_config
        bar = tqdm(total=cfg.max_steps, initial=self.global_step, dynamic_ncols=True, desc="train", mininterval=1.0,
                   disable=not dist.is_main())
        window: List[Dict[str, float]] = []
        marks = WallClockMarks(cfg.checkpoint_at_seconds, self.paths.trial_dir)
        while self.global_step < cfg.max_steps:
            start = time.perf_counter()
            stats = self.train_step(self.global_step)
            self.global_step += 1
            stats["seconds_per_step"] = time.perf_counter() - start
            bar.update(1)
            for callback in self.step_callbacks:
                callback(self.global_step)
            if stats["skipped"]:
                self.on_bad_step(stats)
                if self.global_step < bar.n:  # rolled back
                    bar.reset(total=cfg.max_steps)
                    bar.update(self.global_step)
                    window = []
            else:
                self.bad_steps_in_a_row = 0
                window.append(stats)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", psnr=f"{stats['psnr']:.2f}", lr=f"{stats['lr']:.2e}")
            if window and (self.global_step % cfg.log_every == 0 or self.global_step == cfg.max_steps):
                self.log_scalars(window)
                window = []
            if cfg.val_every > 0 and self.global_step % cfg.val_every == 0:
                self.validate()  # every rank renders its share; rank 0 writes
            if cfg.ckpt_every > 0 and self.global_step % cfg.ckpt_every == 0:
                self.save()
            marks.save_if_due(self)
            stop_signal = self.agreed_stop_signal()
            if stop_signal:
                bar.close()
                path = self.checkpoint_path(self.global_step)
                if dist.broadcast_object(not os.path.exists(path)):
                    path = self.save()
                raise TrainingInterrupted(stop_signal, path)
        bar.close()

    def agreed_stop_signal(self) -> int:
        """The stop signal any rank has received (0: none), the same on every rank, so that all
        ranks stop after the same step (torchrun relays a signal to each rank, not at once)."""
        if dist.world_size() == 1:
            return self._stop_signal or 0
        return int(dist.all_reduce_max(torch.tensor([self._stop_signal or 0]))[0])

    def _catch_stop_signals(self) -> Dict[int, Any]:
        """SIGINT / SIGTERM end training after the current step (with a checkpoint); a second
        one stops at once. Only the main thread can set handlers: elsewhere nothing changes."""

        def request_stop(signum, frame):
            log.warning("%s received: stopping after this step and saving a checkpoint (again to abort)",
                        signal.Signals(signum).name)
            self._stop_signal = signum
            signal.signal(signum, previous[signum])

        previous: Dict[int, Any] = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, request_stop)
        except ValueError:  # not the main thread
            pass
        return previous

    @staticmethod
    def gradients_are_finite(params: List[torch.Tensor]) -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        return bool(torch.isfinite(torch.stack([g.detach().abs().sum() for g in grads]).sum())) if grads else True

    def on_bad_step(self, stats: Dict[str, float]) -> None:
        """Count a skipped (non-finite) step; roll back once max_bad_steps come in a row. A
        float16 overflow with a finite loss (fp16-mixed) is the grad scaler's to handle (it has
        just halved its scale): it counts towards a rollback only once the scale is below
        MIN_LOSS_SCALE, else the first steps' overflows at the initial 65536 could trigger one."""
        cfg = self.trainer_config
        self.skipped_steps += 1
        scaler_handles_it = stats.get("scaler_backoff") and self.scaler.get_scale() >= MIN_LOSS_SCALE
        if not scaler_handles_it:
            self.bad_steps_in_a_row += 1
        self.writer.add_scalar("train/skipped_steps", self.skipped_steps, self.global_step)
        log.warning("step %d skipped: non-finite %s (%d in a row)", self.global_step - 1,
                    stats.get("non_finite", "loss or gradient"), self.bad_steps_in_a_row)
        if self.bad_steps_in_a_row >= cfg.max_bad_steps:
            self.rollback()

    def rollback(self) -> None:
        """Back to the newest loadable checkpoint before this step, learning rates scaled by
        rollback_lr_factor (on top of earlier rollbacks)."""
        cfg = self.trainer_config
        if self.rollbacks >= cfg.max_rollbacks:
            raise TrainingDiverged(
                f"{cfg.max_bad_steps} non-finite steps in a row at step {self.global_step} after "
                f"{self.rollbacks} rollbacks; lower system.optimizer.lr_* or check the data"
            )
        earlier = [p for p in checkpoints_in(self.paths.ckpt_dir) if step_of(p) < self.global_step]
        path = dist.broadcast_object(newest_loadable(earlier) if dist.is_main() else None)
        if path is None:
            raise TrainingDiverged(f"non-finite steps at step {self.global_step} and no checkpoint to roll back to")
        lr_scale = self.lr_scale * cfg.rollback_lr_factor
        rollbacks, skipped, from_step = self.rollbacks + 1, self.skipped_steps, self.global_step
        loss_scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.load(path)
        self.set_lr_scale(lr_scale)
        if loss_scale is not None:
            self.scaler.load_state_dict(self.loss_scale_after_rollback(loss_scale))
        self.rollbacks, self.skipped_steps, self.bad_steps_in_a_row = rollbacks, skipped, 0
        self.writer.add_scalar("train/rollbacks", self.rollbacks, self.global_step)
        log.warning("%d non-finite steps in a row at step %d: rolled back to %s, learning rates x%g",
                    cfg.max_bad_steps, from_step, path, lr_scale)

    def loss_scale_after_rollback(self, scale_before: float) -> Dict[str, Any]:
        """The grad scaler's state to go on with: the loaded one, its scale lowered to the scale
        reached before the rollback (the checkpoint's higher one overflowed), but not below
        MIN_LOSS_SCALE, under which float16 gradients underflow. Through the state dict, which
        also works for a scaler that has not scaled a loss yet."""
        state = self.scaler.state_dict()
        state["scale"] = max(MIN_LOSS_SCALE, min(scale_before, state["scale"]))
        return state

    def set_lr_scale(self, lr_scale: float) -> None:
        """Scale every learning rate (and the schedule's base rates) to lr_scale x configured."""
        ratio = lr_scale / self.lr_scale
        self.scheduler.base_lrs = [lr * ratio for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
        self.lr_scale = lr_scale

    def log_scalars(self, window: List[Dict[str, float]]) -> None:
        mean = {k: sum(s[k] for s in window) / len(window) for k in window[-1] if k != "skipped"}
        for key, value in mean.items():
            self.writer.add_scalar(f"train/{key}", value, self.global_step)
        log.info(
            "step %d/%d loss %.4f psnr %.2f lr %.2e rays %d samples/ray %.1f inv_s %.1f %.3f s/step",
            self.global_step, self.trainer_config.max_steps, mean["loss"], mean["psnr"], mean["lr"],
            mean["rays"], mean["samples_per_ray"], mean["inv_s"], mean["seconds_per_step"],
        )

    def checkpoint_path(self, step: int) -> str:
        return os.path.join(self.paths.ckpt_dir, checkpoint_name(step))

    def save(self, path: Optional[str] = None) -> str:
        """Write the checkpoint of this step to `path` (default: ckpt/ckpt_<step>.pth) (rank 0;
        every rank must call it, as it gathers the ranks' random-number states and waits until
        the file is there) -> its path."""
        path = path or self.checkpoint_path(self.global_step)
        rng_per_rank = dist.gather_objects(get_rng_state())
        if dist.is_main():
            state = {
                "step": self.global_step,
                "train_num_rays": self.train_num_rays,
                "lr_scale": self.lr_scale,
                "skipped_steps": self.skipped_steps,
                "rollbacks": self.rollbacks,
                "rng": rng_per_rank[0],
                "config": to_primitive(self.full_config),
                "backends": dict(self.backends),
                "grad_scaler": self.scaler.state_dict(),  # {} in fp32
                **self.state_dict(),
            }
            if len(rng_per_rank) > 1:
                state["rng_per_rank"] = rng_per_rank
            save_checkpoint(path, state)
            log.info("saved checkpoint %s", path)
            for removed in prune_checkpoints(self.paths.ckpt_dir, self.trainer_config.keep_checkpoints,
                                             self.trainer_config.max_steps):
                log.info("removed old checkpoint %s", removed)
        dist.barrier()
        return path

    def load(self, path: str) -> None:
        state = load_checkpoint(path, map_location="cpu")
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint {path} does not fit this config ({first}); it was trained with the config "
                f"stored in it (and in its trial's config/parsed.yaml)"
            ) from None
        self.global_step = int(state["step"])
        self.train_num_rays = int(state["train_num_rays"])
        self.lr_scale = float(state["lr_scale"])
        self.skipped_steps, self.rollbacks = int(state["skipped_steps"]), int(state["rollbacks"])
        # a scaler state exists only after fp16-mixed training; otherwise the scaler starts fresh
        if state.get("grad_scaler") and self.mixed_precision:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.restore_rng(state)
        log.info("resumed from %s at step %d", path, self.global_step)

    def restore_rng(self, state: Dict[str, Any]) -> None:
        """Each rank continues its own random stream when the checkpoint comes from a run of the
        same world size. Under another world size rank 0 continues the saved rank 0 stream and
        the other ranks start fresh ones derived from (seed, rank, step)."""
        saved = state.get("rng_per_rank", [state["rng"]])
        if len(saved) == dist.world_size():
            set_rng_state(saved[dist.rank()])
        elif dist.is_main():
            set_rng_state(state["rng"])
        else:
            seed_everything(dist.rank_seed(self.full_config.seed, dist.rank(), self.global_step))
