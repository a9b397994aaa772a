"""Time one hash grid's forward + d out/dx (create_graph) + backward of an eikonal-like loss.

    python scripts/bench_hashgrid.py {eager|compile|cpp} [threads] [n_points]

Grid: 12 levels, 2 features, 2^17 table, base 16, scale 1.4587 (the CPU config's). Prints the
first call (compile or build/load cost included), the extension's load time (cpp) and the
median of 10 timed calls after warm-up at varying sizes.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encoder.hashgrid import HashGrid  # noqa: E402


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "cpp"
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    n_points = int(sys.argv[3]) if len(sys.argv) > 3 else 16384
    start = time.perf_counter()
    if kind == "cpp":
        from encoder import hashgrid_cpp

        assert hashgrid_cpp.extension() is not None, hashgrid_cpp.build_error()
        print("extension load", round(time.perf_counter() - start, 3), "s")
    config = HashGrid.Config(n_levels=12, log2_hashmap_size=17, base_resolution=16, per_level_scale=1.4587,
                             backend="torch" if kind != "cpp" else "cpp", compile=kind == "compile", start_level=12)
    grid = HashGrid(config)

    def run(n):
        x = torch.rand(n, 3, requires_grad=True)
        f = grid(x)
        (dx,) = torch.autograd.grad(f.sum(), x, create_graph=True)
        (f.square().sum() + dx.square().sum()).backward()

    t0 = time.perf_counter()
    run(n_points)
    print("first call", round(time.perf_counter() - t0, 2), "s")
    for n in (n_points // 2, n_points, n_points + 3616):
        run(n)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        run(n_points)
        times.append(time.perf_counter() - t)
    times.sort()
    print(kind, "threads", torch.get_num_threads(), "median", round(times[5], 4), "min", round(times[0], 4),
          f"s per fwd+grad+bwd of {n_points} points")


if __name__ == "__main__":
    main()
