"""Training throughput of a config: seconds per step, samples and rays per second.

    python scripts/benchmark.py --config confs/neus-dtu-wmask-cpu.yaml \
        dataset.root_dir=../shared/data/dtu_scan24 [--resume CKPT] [--steps 100] [--profile]

Runs `--warmup` steps first (not timed: the first steps pay for allocation and the occupancy
grid's warm-up), then times `--steps` steps. With --resume it measures a trained state
(fewer samples per ray than at the start). --profile prints where a step's time goes, the top
operators, and the matmul FLOP/s against this CPU's measured matmul peak.
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


# the named scopes of one step (record_function in systems/trainer.py and models/neus.py)
STEP_SCOPES = ["occupancy update", "ray batch", "forward and losses", "backward", "optimizer"]
FORWARD_SCOPES = ["march", "sdf and its gradient", "colour network", "compositing", "background"]
# backward nodes by what they differentiate (autograd::engine::evaluate_function: <node>)
BACKWARD_GROUPS = {
    "hash grid (table scatter, jvp and its adjoint)": ("_InterpolateTable", "_SpatialGradient",
                                                       "_TableJacobianVectorProduct", "CompiledFunction"),
    "MLPs (linear, softplus, relu, weight norm)": ("Addmm", "Mm", "Softplus", "Relu", "Threshold", "Norm",
                                                   "WeightNorm", "Sigmoid", "T", "Cat"),
}


def profile_table(events, n_steps: int, elapsed: float) -> str:
    """Where one step's time goes: the named scopes (inclusive CPU time per step, share of the
    step's wall time) and the backward's nodes grouped by what they differentiate."""
    total = {e.key: e.cpu_time_total / 1e6 / n_steps for e in events}  # seconds per step
    step = elapsed / n_steps
    lines = [f"per step: {step:.4f} s wall ({n_steps} steps profiled; the profiler adds its own overhead)",
             f"{'scope':<52}{'s/step':>9}{'share':>8}"]
    for name in STEP_SCOPES:
        lines.append(f"{name:<52}{total.get(name, 0.0):>9.4f}{total.get(name, 0.0) / step:>8.1%}")
        if name == "forward and losses":
            for sub in FORWARD_SCOPES:
                lines.append(f"  {sub:<50}{total.get(sub, 0.0):>9.4f}{total.get(sub, 0.0) / step:>8.1%}")
        if name == "backward":
            nodes = {k.split(": ", 1)[1]: v for k, v in total.items()
                     if k.startswith("autograd::engine::evaluate_function: ")}
            grouped = {group: 0.0 for group in BACKWARD_GROUPS}
            other = 0.0
            for node, seconds in nodes.items():
                group = next((g for g, prefixes in BACKWARD_GROUPS.items()
                              if any(node.startswith(p) for p in prefixes)), None)
                if group is None:
                    other += seconds
                else:
                    grouped[group] += seconds
            for group, seconds in [*grouped.items(), ("other backward nodes", other)]:
                lines.append(f"  {group:<50}{seconds:>9.4f}{seconds / step:>8.1%}")
    return "\n".join(lines)


def matmul_peak(n: int = 1024, seconds: float = 1.0) -> float:
    """This machine's float32 matmul rate in FLOP/s: n x n by n x n products (2 n^3 FLOPs each)
    for about `seconds`, on torch's threads; the best of three rounds."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def flops_line(events, n_steps: int, elapsed: float, peak: float) -> str:
    """The matmul FLOPs the profiler counted (linear layers, forward and backward) per step, and
    what they make of the step's wall time against the machine's matmul peak."""
    flops = sum(e.flops for e in events if e.flops) / n_steps  # per step
    matmul_seconds = sum(e.self_cpu_time_total for e in events if e.flops) / 1e6 / n_steps
    step = elapsed / n_steps
    return (f"matmul FLOPs: {flops / 1e9:.2f} GFLOP/step; over the whole step {flops / step / 1e9:.2f} GFLOP/s = "
            f"{flops / step / peak:.1%} of this CPU's measured matmul peak ({peak / 1e9:.1f} GFLOP/s, "
            f"{torch.get_num_threads()} threads); inside the matmuls {flops / max(matmul_seconds, 1e-9) / 1e9:.1f} "
            f"GFLOP/s ({matmul_seconds / step:.0%} of the step)")


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

            n_profiled = 16  # two occupancy updates at update_every 8
            with profile(with_flops=True) as prof:
                start = time.perf_counter()
                for _ in range(n_profiled):
                    system.step()
                elapsed = time.perf_counter() - start
            print(profile_table(prof.key_averages(), n_profiled, elapsed))
            print(flops_line(prof.key_averages(), n_profiled, elapsed, matmul_peak()))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
