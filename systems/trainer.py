"""The generic trainer: one optimisation step (forward under autocast, backward, grad scaler,
the non-finite check agreed by all ranks, skip / rollback), the ray budget, signals, the
checkpoint cadence and the logging cadence. What a checkpoint holds, saving, resuming and the
rollback itself are systems/checkpointing.py's. What is trained, and how it is evaluated, is
the task's (systems/neus.py); nothing here knows NeuS.

One training step (`Trainer.step`):

    task.set_step(step)                      schedules that follow the step
    task.update_shared_state(step)           rank 0 (occupancy grids); broadcast to the others
    batch = task.sample_batch(rays_per_rank)
    losses, telemetry = task.loss(model, batch, autocast)
    backward -> unscale -> finite? (all ranks agree) -> optimizer step -> next_ray_count
    -> StepResult(skipped, non_finite, scaler_backoff, stats)
"""
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from systems.backends import resolve_backends
from systems.checkpointing import MIN_LOSS_SCALE, TrainerCheckpoints, WallClockMarks
from systems.optim import build_optimizer, build_scheduler
from systems.registry import SYSTEMS
from utils import distributed as dist
from utils.checkpoint import checkpoints_in
from utils.config import Precision
from utils.logger import NullWriter
from utils.misc import process_age

log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    max_steps: int = 20000
    train_num_rays: int = 256  # rays in the first step
    max_train_num_rays: int = 8192
    dynamic_ray_sampling: bool = True  # adapt the rays per step to keep ~num_samples_per_step samples
    num_samples_per_step: int = 262144
    # a background sample's cost in foreground samples, in that budget (next_ray_count)
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
    precision: Precision = "auto"
    eval_chunk_rays: int = 4096  # rays rendered at once in validation / test
    test_at_end: bool = True  # --train ends with the test stage (renders, metrics, video, mesh)
    n_test_traj_steps: int = 60  # frames of the orbit video
    test_traj_downscale: float = 1.0  # render the orbit video at 1/this of the image size
    # also write a checkpoint to <trial>/curve/ when the command's wall clock (from process start,
    # minus the time spent writing these) passes each of these seconds (scripts/curve.py)
    checkpoint_at_seconds: List[float] = field(default_factory=list)


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


@dataclass
class StepResult:
    """What one training step did. A skipped step left the parameters as they were: `non_finite`
    says what was not finite, `scaler_backoff` whether the grad scaler took it as a float16
    overflow (and halved its scale). `stats` are the scalars to log (empty when skipped)."""

    skipped: bool
    non_finite: str = ""
    scaler_backoff: bool = False
    stats: Dict[str, float] = field(default_factory=dict)


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM stopped training; a checkpoint of the current step was written."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(f"{signal.Signals(signum).name} at checkpoint {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


def next_ray_count(n_rays: int, n_samples: int, config: TrainerConfig, n_bg_samples: int = 0) -> int:
    """The ray budget: the next step's rays (all ranks together), scaled from this step's
    n_rays, n_samples and n_bg_samples (over all ranks) so that the step costs about
    num_samples_per_step foreground samples, within [64, max_train_num_rays]:
        cost = n_samples + background_sample_cost * n_bg_samples,  rays = n_rays * budget / cost
    (a background sample has no SDF gradient, no eikonal double backward and a smaller grid).
    Without the background term an unmasked run whose foreground samples per ray fall buys ever
    more rays, each paying for all its background samples: its steps grew from 0.3 s to 1 s."""
    cost = n_samples + config.background_sample_cost * n_bg_samples
    wanted = n_rays * config.num_samples_per_step / max(cost, 1.0)
    return int(min(max(wanted, 64), config.max_train_num_rays))


def gradients_are_finite(params: List[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack([g.detach().abs().sum() for g in grads]).sum())) if grads else True


class Trainer(TrainerCheckpoints):
    """Trains the task `config.system.name` names: builds it, its optimizer and schedule, and
    runs, saves and resumes the training; validate / test / export_mesh are the task's
    evaluation, run on every rank (each renders a share; rank 0 writes)."""

    def __init__(self, config: DictConfig, paths: RunPaths, device: torch.device):
        self.full_config = config
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
        # {config key: backend} of every component, and trainer.precision, decided once here;
        # fails (ConfigError naming the key) when the device cannot serve a request, before any
        # model is built. The task builds its components from these choices.
        self.backends = resolve_backends(config, device)
        self.mixed_precision = self.backends["trainer.precision"] == "fp16-mixed"
        # disabled (fp32): scale / unscale_ / update do nothing and step is optimizer.step
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.mixed_precision)
        self.task = SYSTEMS.get(config.system.name)(config, device, self.backends)
        self.model = self.task.model
        self.optimizer = build_optimizer(self.task.parameter_groups(), config.system.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config.system.scheduler)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.train_model = self.model if dist.world_size() == 1 else self.wrap_data_parallel(self.model, device)

    # --- pieces -----------------------------------------------------------------------------
    @property
    def dataset(self):
        return self.task.dataset

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

    @staticmethod
    def wrap_data_parallel(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
        """DDP averages the gradients over ranks during backward (the eikonal term's
        double backward included: its autograd.grad is taken w.r.t. the sample points inside
        forward, so the parameters' gradients still accumulate once, in backward). Buffers are
        not re-broadcast each forward: the state the task changes between steps (occupancy
        grids) is broadcast where it changes (update_shared_state); the schedules follow the
        step, identical on every rank."""
        return DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False
        )

    def rays_per_rank(self) -> int:
        """This rank's share of the step's global ray budget (equal on every rank, so that the
        mean of the ranks' per-ray losses is the mean over all rays)."""
        return max(self.train_num_rays // dist.world_size(), 1)

    # --- one step ---------------------------------------------------------------------------
    def step(self) -> StepResult:
        """One training step at global_step, which it advances; a non-finite step is skipped,
        counted, and rolls training back once max_bad_steps come in a row."""
        start = time.perf_counter()
        with record_function("occupancy update"):  # scripts/benchmark.py --profile reports these scopes
            self.prepare_step(self.global_step)
        with record_function("ray batch"):
            batch = self.task.sample_batch(self.rays_per_rank())
        result = self.optimise(batch)
        self.global_step += 1
        result.stats["seconds_per_step"] = time.perf_counter() - start
        if result.skipped:
            self.on_bad_step(result)
        else:
            self.bad_steps_in_a_row = 0
        return result

    def prepare_step(self, step: int) -> None:
        """The task's schedules for `step`, and its state updates (occupancy grids): rank 0
        updates, the others take a copy of what changed, so that every rank marches through the
        same cells. The update draws random cells from torch's RNG, which is each rank's own ray
        stream; copying rank 0's state keeps the ranks identical without a second random
        stream kept in step on every rank."""
        self.task.set_step(step)
        changed = self.task.update_shared_state(step) if dist.is_main() else []
        if dist.world_size() > 1:
            names_of = {id(t): name for name, t in self.model.named_buffers()}
            names = dist.broadcast_object([names_of[id(t)] for t in changed] if dist.is_main() else None)
            buffers = dict(self.model.named_buffers())
            dist.broadcast_([buffers[name] for name in names])

    def optimise(self, batch: Dict[str, torch.Tensor]) -> StepResult:
        """One optimisation step on this rank's rays; with several ranks the gradients are
        those of the loss over all ranks' rays (mean over rays, and over samples for the
        per-sample terms), and every rank skips a step that is non-finite on any rank."""
        with record_function("forward and losses"):
            losses, telemetry = self.task.loss(self.train_model, batch, self.autocast())
        self.optimizer.zero_grad(set_to_none=True)
        non_finite = [k for k, v in losses.items() if k != "total" and not torch.isfinite(v)]
        n_rays, n_samples, n_bg_samples = telemetry.n_rays, telemetry.n_samples, telemetry.n_bg_samples
        if dist.world_size() > 1:
            # one all-reduce: ranks with a non-finite loss, and the step's rays and samples
            bad_ranks, n_rays, n_samples, n_bg_samples = dist.all_reduce_sum(
                torch.tensor([float(bool(non_finite)), n_rays, n_samples, n_bg_samples], dtype=torch.float64)
            ).tolist()
            n_rays, n_samples, n_bg_samples = int(n_rays), int(n_samples), int(n_bg_samples)
            if bad_ranks and not non_finite:
                non_finite.append("loss on another rank")
            losses = self.task.weight_for_sample_share(losses, dist.world_size() * telemetry.n_samples
                                                       / max(n_samples, 1))
        backward = not non_finite and losses["total"].requires_grad  # the same on every rank
        if backward:
            with record_function("backward"):
                self.scaler.scale(losses["total"]).backward(inputs=self.params)
            self.scaler.unscale_(self.optimizer)  # true gradients (fp16-mixed), checked like fp32 ones
            if not gradients_are_finite(self.params):  # averaged over ranks: the same everywhere
                non_finite.append("gradient")
        if not non_finite:
            with record_function("optimizer"):
                self.scaler.step(self.optimizer)
            if self.trainer_config.dynamic_ray_sampling:
                self.train_num_rays = next_ray_count(n_rays, n_samples, self.trainer_config, n_bg_samples)
        scaler_backoff = False
        if backward:  # fp16-mixed: grows the loss scale, or halves it after a non-finite gradient
            self.scaler.update()
            if self.scaler.is_enabled() and non_finite == ["gradient"]:
                scaler_backoff = True  # a finite loss: most likely float16 overflow at this scale
                non_finite[-1] = f"gradient (float16 overflow? loss scale now {self.scaler.get_scale():g})"
        self.scheduler.step()
        if non_finite:  # the parameters stay as they were; step() counts it and may roll back
            return StepResult(skipped=True, non_finite=", ".join(non_finite), scaler_backoff=scaler_backoff)
        stats = {f"loss_{k}": v.item() for k, v in losses.items() if k != "total"}
        stats.update(loss=losses["total"].item(), **telemetry.rank_mean)
        stats = dist.mean_over_ranks(stats)
        stats.update(lr=self.optimizer.param_groups[0]["lr"], **telemetry.scalars, rays=float(n_rays),
                     samples_per_ray=n_samples / n_rays)
        if self.mixed_precision:
            stats["loss_scale"] = self.scaler.get_scale()
        return StepResult(skipped=False, stats=stats)

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> None:
        """Train to max_steps: validation and checkpoints on their cadence, non-finite steps
        skipped (rolled back when they persist), SIGINT / SIGTERM -> checkpoint and
        TrainingInterrupted; then the test stage."""
        cfg = self.trainer_config
        log.info("training from step %d to %d on %s%s", self.global_step, cfg.max_steps, self.device,
                 f" x {dist.world_size()} ranks" if dist.world_size() > 1 else "")
        if self.global_step == 0:
            self.task.start_training()
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
        first_step = self.global_step
        while self.global_step < cfg.max_steps:
            result = self.step()
            if self.global_step == first_step + 1:
                log.info("first step done %.1f s after the command started (the step itself took %.1f s: with "
                         "compile: true most of it is torch.compile; the occupancy grid's warm-up update is in it)",
                         process_age(), result.stats.get("seconds_per_step", float("nan")))
            bar.update(1)
            for callback in self.step_callbacks:
                callback(self.global_step)
            if result.skipped:
                if self.global_step < bar.n:  # rolled back
                    bar.reset(total=cfg.max_steps)
                    bar.update(self.global_step)
                    window = []
            else:
                window.append(result.stats)
                bar.set_postfix(loss=f"{result.stats['loss']:.4f}", lr=f"{result.stats['lr']:.2e}",
                                **self.task.progress(result.stats))
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

    # --- non-finite steps -----------------------------------------------------------------------
    def on_bad_step(self, result: StepResult) -> None:
        """Count a skipped (non-finite) step; roll back once max_bad_steps come in a row. A
        float16 overflow with a finite loss (fp16-mixed) is the grad scaler's to handle (it has
        just halved its scale): it counts towards a rollback only once the scale is below
        MIN_LOSS_SCALE, else the first steps' overflows at the initial 65536 could trigger one."""
        cfg = self.trainer_config
        self.skipped_steps += 1
        scaler_handles_it = result.scaler_backoff and self.scaler.get_scale() >= MIN_LOSS_SCALE
        if not scaler_handles_it:
            self.bad_steps_in_a_row += 1
        self.writer.add_scalar("train/skipped_steps", self.skipped_steps, self.global_step)
        log.warning("step %d skipped: non-finite %s (%d in a row)", self.global_step - 1,
                    result.non_finite or "loss or gradient", self.bad_steps_in_a_row)
        if self.bad_steps_in_a_row >= cfg.max_bad_steps:
            self.rollback()

    def log_scalars(self, window: List[Dict[str, float]]) -> None:
        mean = {k: sum(s[k] for s in window) / len(window) for k in window[-1]}
        for key, value in mean.items():
            self.writer.add_scalar(f"train/{key}", value, self.global_step)
        task_scalars = " ".join(f"{k} {v}" for k, v in self.task.progress(mean).items())
        log.info("step %d/%d loss %.4f %s lr %.2e rays %d %.3f s/step", self.global_step,
                 self.trainer_config.max_steps, mean["loss"], task_scalars, mean["lr"], mean["rays"],
                 mean["seconds_per_step"])

    # --- evaluation: the task's, on every rank ---------------------------------------------
    def validate(self) -> Dict[str, float]:
        return self.task.validate(self.global_step, self.paths.save_dir, self.writer)

    def test(self) -> Dict[str, Any]:
        return self.task.test(self.global_step, self.paths.save_dir, self.writer)

    def export_mesh(self) -> List[str]:
        return self.task.export_mesh(self.global_step, self.paths.save_dir)
