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
    p.add_argument("--profile-case", default=None, metavar="FILE", help="instead: time one real case step by step (read, detect, write) on --threads threads, with file sizes")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --profile-case (default 1, as a worker of a full node)")
    p.add_argument("--model", default=None, help="registry id or .safetensors file (default: the registry's default)")
    p.add_argument("--regions", action="store_true",
                   help="include each case's registration to the template (MARS locations); off by default: the throughput of detection")


def profile(args: argparse.Namespace) -> int:
    from ..cohort.benchmark import profile_case

    res = profile_case(args.profile_case, args.model, args.threads, args.repeats, regions=args.regions)
    k, r, c = res["shape"]
    print(f"{args.profile_case}: {k} x {r} x {c} voxels, {res['input_bytes'] / 1e6:.1f} MB on disk; "
          f"{res['threads']} torch thread(s), median of {args.repeats}")
    print(f"{'step':<8}{'wall s':>9}{'cpu s':>9}")
    for step, (wall, cpu) in res["steps"].items():
        print(f"{step:<8}{wall:>9.2f}{cpu:>9.2f}")
    total = sum(w for w, _ in res["steps"].values()), sum(c for _, c in res["steps"].values())
    print(f"{'total':<8}{total[0]:>9.2f}{total[1]:>9.2f}")
    written = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in res["output_bytes"].items())
    print(f"written: {sum(res['output_bytes'].values()) / 1e6:.1f} MB ({written}); peak RSS {res['peak_rss_mb']:.0f} MB")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..cohort.benchmark import cohort_benchmark

    if args.profile_case:
        return profile(args)
    if args.cases < args.workers or args.repeats < 1 or args.workers < 1:
        print("error: need --cases >= --workers >= 1 and --repeats >= 1", file=sys.stderr)
        return 2
    try:
        res = cohort_benchmark(args.cases, tuple(args.shape), args.repeats, args.model, args.workers, log=lambda m: print(m, file=sys.stderr),
                               regions=args.regions)  # fmt: skip
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    k, r, c = res["shape"]
    print(f"{res['cases']} cases of {k} x {r} x {c}, median of {res['repeats']} runs per variant (wall time includes starting worker processes); "
          f"regions {'on' if res['regions'] else 'off (--regions to include them)'}")
    print(f"{'variant':<26}{'workers':>8}{'wall s':>9}{'s/case':>9}{'cases/h':>9}{'speed-up':>10}{'case s':>8}{'cpu s':>7}{'steady cases/h':>16}  runs")
    base = None
    for fig in res["figures"].values():
        wall = statistics.median(fig.wall_s)
        base = base or fig.cases_per_hour
        runs = ", ".join(f"{w:.1f}" for w in fig.wall_s)
        print(
            f"{fig.variant:<26}{fig.workers:>8}{wall:>9.1f}{wall / fig.cases:>9.2f}{fig.cases_per_hour:>9.0f}"
            f"{fig.cases_per_hour / base:>9.2f}x{fig.case_s:>8.2f}{fig.cpu_s:>7.2f}{fig.steady_cases_per_hour:>16.0f}  {runs}"
        )
    print("case s: one case inside its worker (read, detect, write), wall; cpu s: its CPU time, all threads;")
    print("steady: workers x 3600 / case s, what a long batch approaches once workers are up")
    print(f"LocalCluster start: {res['cluster_start_s']:.1f} s (once per cluster, not per batch)")
    print(f"scheduler overhead per case: empty-task round trip {res['noop_task_ms']:.1f} ms; "
          f"cluster wall per case per worker beyond the case's own time {res['cluster_overhead_s_per_case']:.2f} s")
    return 0
