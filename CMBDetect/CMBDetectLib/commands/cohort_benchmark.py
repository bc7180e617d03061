"""`cmbdetect cohort-benchmark`: cases per hour, serial vs local workers vs a Dask LocalCluster."""

from __future__ import annotations

import argparse
import statistics
import sys

HELP = "measure cohort throughput: cases per hour for 1 and N local workers and an N-worker Dask LocalCluster"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=int, default=6, help="cases per run (default 6)")
    p.add_argument("--shape", type=int, nargs=3, default=[24, 256, 256], metavar=("SLICES", "ROWS", "COLS"), help="case size (default 24 256 256)")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant; the median is reported (default 2)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes and LocalCluster workers (default 2)")
    p.add_argument("--model", default=None, help="registry id or .safetensors file (default: the registry's default)")


def run(args: argparse.Namespace) -> int:
    from ..cohort.benchmark import cohort_benchmark

    if args.cases < args.workers or args.repeats < 1 or args.workers < 1:
        print("error: need --cases >= --workers >= 1 and --repeats >= 1", file=sys.stderr)
        return 2
    try:
        res = cohort_benchmark(args.cases, tuple(args.shape), args.repeats, args.model, args.workers, log=lambda m: print(m, file=sys.stderr))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    k, r, c = res["shape"]
    print(f"{res['cases']} cases of {k} x {r} x {c}, median of {res['repeats']} runs per variant (wall time includes starting worker processes)")
    print(f"{'variant':<26}{'workers':>8}{'wall s':>9}{'s/case':>9}{'cases/h':>9}{'detect s/case':>15}{'speed-up':>10}  runs")
    base = None
    for fig in res["figures"].values():
        wall = statistics.median(fig.wall_s)
        base = base or fig.cases_per_hour
        runs = ", ".join(f"{w:.1f}" for w in fig.wall_s)
        print(
            f"{fig.variant:<26}{fig.workers:>8}{wall:>9.1f}{wall / fig.cases:>9.2f}{fig.cases_per_hour:>9.0f}"
            f"{fig.compute_s_per_case:>15.2f}{fig.cases_per_hour / base:>9.2f}x  {runs}"
        )
    print(f"LocalCluster start: {res['cluster_start_s']:.1f} s (once per cluster, not per batch)")
    print(f"scheduler overhead per case: empty-task round trip {res['noop_task_ms']:.1f} ms; "
          f"cluster wall per case per worker beyond detection {res['cluster_overhead_s_per_case']:.2f} s (reading, writing, transfers)")
    return 0
