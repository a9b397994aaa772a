"""A trainer's checkpoints: what one holds (model, optimizer and schedule, step, ray budget,
learning-rate scale, skip / rollback counters, each rank's random state, grad scaler, config and
backends), writing it (rank 0, pruning old ones), resuming from one, rolling back to the newest
loadable one when non-finite steps persist, and the wall-clock mark checkpoints of
trainer.checkpoint_at_seconds. `Trainer` (systems/trainer.py) has these as methods of
`TrainerCheckpoints`; file names, writing and pruning are utils/checkpoint.py's.
"""
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from systems.optim import fit_state_to_parameter_shapes
from utils import distributed as dist
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
from utils.config import to_primitive
from utils.misc import get_rng_state, process_age, seed_everything, set_rng_state

if TYPE_CHECKING:
    from systems.trainer import Trainer

log = logging.getLogger(__name__)

MIN_LOSS_SCALE = 1.0  # below it, fp16-mixed overflow skips count towards a rollback (on_bad_step)


class TrainingDiverged(RuntimeError):
    """Non-finite steps that rolling back could not cure."""


class WallClockMarks:
    """trainer.checkpoint_at_seconds: a checkpoint in <trial>/curve/ each time the command's
    wall clock passes a mark, not counting the time spent writing them, and
    <trial>/curve/marks.json listing {mark, seconds, step, path}. Rank 0's clock decides."""

    def __init__(self, seconds: List[float], trial_dir: str):
        self.pending = sorted(float(s) for s in seconds)
        self.folder = os.path.join(trial_dir, "curve")
        self.paused = 0.0  # seconds spent writing mark checkpoints
        self.written: List[Dict[str, Any]] = []

    def save_if_due(self, trainer: "Trainer") -> None:
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
        path = trainer.save(os.path.join(self.folder, checkpoint_name(trainer.global_step)))
        if dist.is_main():
            self.written.append({"mark": mark, "seconds": round(elapsed, 2), "step": trainer.global_step,
                                 "path": os.path.abspath(path)})
            with open(os.path.join(self.folder, "marks.json"), "w") as f:
                json.dump(self.written, f, indent=1)
        self.paused += time.perf_counter() - started


class TrainerCheckpoints:
    """The checkpoint methods of `Trainer`, on its state: paths, full_config, trainer_config,
    backends, model, optimizer, scheduler, scaler, mixed_precision, writer, global_step,
    train_num_rays, lr_scale, skipped_steps, rollbacks, bad_steps_in_a_row."""

    def checkpoint_path(self, step: int) -> str:
        return os.path.join(self.paths.ckpt_dir, checkpoint_name(step))

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

    # --- rollback after persistent non-finite steps (Trainer.on_bad_step) ---------------------------
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
