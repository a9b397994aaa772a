"""How long a config's training would take on this CPU, and a one-line warning when a
GPU-sized config is about to run on one.

The estimate is deliberately simple: training cost is proportional to the samples it
marches, so

    seconds ~= max_steps * num_samples_per_step * SECONDS_PER_SAMPLE * (n_levels / 12) * (2 / threads)

with SECONDS_PER_SAMPLE measured with `scripts/benchmark.py` on the CPU-sized DTU config
(12 hash levels, 2 threads of a 2-core x86 VM, torch 2.13 CPU: ~0.254 s for ~16k samples; with the
C++ hash grid a whole 2500-step scan 24 run averaged 0.256 s per step, 2026-12-01).
It is an order of magnitude, which is what the warning needs: the GPU-sized configs come out
at tens of hours, the CPU-sized ones at about a quarter of an hour.
"""
import os
from typing import Optional

SECONDS_PER_SAMPLE = 0.254 / 16384  # one training sample (forward + backward), 12 levels, 2 threads
REFERENCE_THREADS = 2
REFERENCE_LEVELS = 12  # the hash-grid levels SECONDS_PER_SAMPLE was measured with
WARN_ABOVE_SECONDS = 2 * 3600.0  # longer than this on a CPU: say so up front


def estimated_cpu_seconds(config, threads: int) -> float:
    """Estimated wall-clock seconds of `config`'s training on `threads` CPU threads."""
    trainer = config.trainer
    encoding = config.model.geometry.xyz_encoding
    # a hash grid costs in proportion to its levels; other encodings about as the reference
    levels = encoding.n_levels if "n_levels" in encoding else REFERENCE_LEVELS
    per_step = trainer.num_samples_per_step * SECONDS_PER_SAMPLE * (levels / REFERENCE_LEVELS)
    return trainer.max_steps * per_step * REFERENCE_THREADS / max(threads, 1)


def cpu_sized_variant(config_file: str) -> Optional[str]:
    """confs/X.yaml -> confs/X-cpu.yaml when that file exists (the project's naming), else None."""
    stem, ext = os.path.splitext(config_file)
    if stem.endswith("-cpu"):
        return None
    candidate = f"{stem}-cpu{ext}"
    return candidate if os.path.isfile(candidate) else None


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def gpu_config_on_cpu_warning(config, config_file: str, device_type: str, threads: int) -> Optional[str]:
    """The one-line warning for training `config` on a CPU when it would take longer than
    WARN_ABOVE_SECONDS (None when it would not, or when the device is not a CPU)."""
    if device_type != "cpu":
        return None
    seconds = estimated_cpu_seconds(config, threads)
    if seconds <= WARN_ABOVE_SECONDS:
        return None
    variant = cpu_sized_variant(config_file)
    advice = (f"use {variant} (CPU-sized)" if variant
              else "use a CPU-sized config such as confs/neus-dtu-wmask-cpu.yaml or lower trainer.max_steps "
                   "and trainer.num_samples_per_step")
    return (f"{config_file} is sized for a GPU: {config.trainer.max_steps} steps of "
            f"{config.trainer.num_samples_per_step} samples would take about {_duration(seconds)} on this CPU "
            f"({threads} threads); {advice}. Going ahead as asked (Ctrl-C stops with a checkpoint).")
