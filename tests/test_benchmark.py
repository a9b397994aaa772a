"""scripts/benchmark.py's FLOP figure, from hand-made profiler rows."""
from collections import namedtuple

from scripts.benchmark import flops_line, matmul_peak

Row = namedtuple("Row", "key flops self_cpu_time_total")


def test_flops_line_from_counted_matmuls():
    """Two steps, 0.5 s each: 4 GFLOP of matmuls (2 GFLOP/step) that took 0.2 s of self time
    (0.1 s/step) -> 4 GFLOP/s over the step, 20 GFLOP/s inside them, 20% of the step; against a
    40 GFLOP/s peak that is 10%. Rows without FLOPs (a hash-grid kernel) count for neither."""
    rows = [Row("aten::mm", 3e9, 150_000.0), Row("aten::addmm", 1e9, 50_000.0), Row("_InterpolateTable", 0, 9e6)]
    line = flops_line(rows, n_steps=2, elapsed=1.0, peak=40e9)
    assert "2.00 GFLOP/step" in line
    assert "4.00 GFLOP/s = 10.0% of this CPU's measured matmul peak (40.0 GFLOP/s" in line
    assert "inside the matmuls 20.0 GFLOP/s (20% of the step)" in line


def test_matmul_peak_is_a_plausible_rate():
    peak = matmul_peak(n=128, seconds=0.1)
    assert 1e8 < peak < 1e14  # a CPU core does at least 0.1 GFLOP/s; nothing here does 100 TFLOP/s
