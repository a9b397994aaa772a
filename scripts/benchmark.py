"""Training throughput of a config: seconds per step, samples and rays per second.

    python scripts/benchmark.py --config confs/neus-dtu-wmask-cpu.yaml \
        dataset.root_dir=../shared/data/dtu_scan24 [--resume CKPT] [--steps 100] [--profile]

Runs `--warmup` steps first (not timed: the first steps pay for allocation and the occupancy
grid's warm-up), then times `--steps` steps. With --resume it measures a trained state
(fewer samples per ray than at the start). --profile prints the top operators.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from systems import RunPaths, Trainer  # noqa: E402
from systems.config import load_config  # noqa: E402
from utils.misc import resolve_device, seed_everything  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--profile", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    with tempfile.TemporaryDirectory() as tmp:
        system = Trainer(config, RunPaths.for_trial(tmp), device)
        if args.resume:
            system.load(args.resume)
        for _ in range(args.warmup):
            system.step()
        samples = rays = 0.0
        start = time.perf_counter()
        for _ in range(args.steps):
            stats = system.step().stats
            if "rays" not in stats:  # a skipped step
                continue
            samples += stats["samples_per_ray"] * stats["rays"]
            rays += stats["rays"]
        elapsed = time.perf_counter() - start
        print(f"config {args.config} on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"steps {args.steps} from step {system.global_step - args.steps}: {elapsed / args.steps:.4f} s/step, "
              f"{samples / elapsed:,.0f} samples/s, {rays / elapsed:,.0f} rays/s, "
              f"{samples / args.steps:,.0f} samples/step, {rays / args.steps:,.0f} rays/step")
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                for _ in range(10):
                    system.step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
