"""Cohort throughput: cases per hour run one by one, in local worker processes, on a Dask cluster.

Every variant runs the same synthetic cases through `detect_batch` into a fresh folder
(`force`: nothing skipped), side by side in one invocation, because this machine is shared
and noisy; each is repeated and the median kept. Wall time includes what a user waits for:
spawning worker processes and loading the model in each. The Dask cluster is started once,
outside the timing (a cluster outlives one batch), and its start time is reported apart. The steady rate (workers / seconds per case inside a
worker) is what a long cohort approaches once start-up is paid.

The scheduler's overhead per case is measured two ways: the round trip of an empty task
through the same cluster, and the cluster's wall time per case beyond the detection time the
workers themselves measured (reading, detecting, writing).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..detection.pipeline import DetectionParams
from ..io import Geometry, write_volume
from .batch import detect_batch


@dataclass
class Figure:
    variant: str
    wall_s: list[float]
    cases: int
    workers: int
    case_s: float  # one case inside its worker (read, detect, write), median over cases
    cpu_s: float  # CPU time of that, all threads: robust to a busy machine, unlike wall time

    @property
    def cases_per_hour(self) -> float:
        return 3600.0 * self.cases / statistics.median(self.wall_s)

    @property
    def steady_cases_per_hour(self) -> float:
        """Once workers are up and the model is loaded: what a long cohort approaches."""
        return 3600.0 * self.workers / self.case_s


def write_cases(folder: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    """n SWI-like volumes: bright head in dark air, noise, a few dark spots (distinct per case)."""
    k, r, c = shape
    yy, xx = np.mgrid[0:r, 0:c]
    head = ((yy - r / 2) / (0.42 * r)) ** 2 + ((xx - c / 2) / (0.4 * c)) ** 2 < 1
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        array = np.where(head, 450.0, 10.0)[None] + rng.normal(0, 15, (k, r, c))
        for _ in range(5):
            z, y, x = rng.integers(1, k - 1), rng.integers(r // 3, 2 * r // 3), rng.integers(c // 3, 2 * c // 3)
            array[z, y - 2 : y + 3, x - 2 : x + 3] = 30.0
        path = folder / f"bench-{i:03d}.nii.gz"
        write_volume(np.abs(array).astype(np.float32), Geometry((0.6, 0.6, 2.0), (0.0, 0.0, 0.0)), path)
        paths.append(path)
    return paths


def _timed_batch(paths: list[Path], root: Path, params: DetectionParams, **how) -> tuple[float, float, float]:
    out = Path(tempfile.mkdtemp(dir=root, prefix="out-"))
    start = time.perf_counter()
    outcomes = detect_batch(paths, out, params, show_progress=False, force=True, **how)
    wall = time.perf_counter() - start
    failed = [o.error for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"benchmark cases failed: {failed[:3]}")
    return wall, statistics.median(o.seconds for o in outcomes), statistics.median(o.cpu_seconds for o in outcomes)


def _noop(x: int) -> int:
    return x


def cohort_benchmark(
    n_cases: int = 6, shape: tuple[int, int, int] = (24, 256, 256), repeats: int = 2, model: str | None = None,
    workers: int = 2, log=None, regions: bool = False,
) -> dict:  # fmt: skip
    """Figures for serial, `workers` local processes and a `workers`-worker LocalCluster. Without
    `regions` the cases skip the registration to the template (detect's `--no-regions`): its
    metric runs on one thread, so it would flatter the workers against the serial run."""
    from .distributed import import_distributed

    distributed = import_distributed()
    say = log or (lambda message: None)
    params = DetectionParams(device="cpu", model=model, regions=regions)
    figures: dict[str, Figure] = {}
    with tempfile.TemporaryDirectory(prefix="cmbdetect-cohort-bench-") as tmp:
        root = Path(tmp)
        paths = write_cases(root / "in", n_cases, shape)
        say(f"{n_cases} cases of {shape[0]} x {shape[1]} x {shape[2]} written; starting a {workers}-worker LocalCluster")
        start = time.perf_counter()
        cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=40
        )  # fmt: skip
        client = distributed.Client(cluster)
        cluster_start = time.perf_counter() - start
        try:
            # Warm the cluster once (imports, model load), as a long-lived cluster would be.
            _timed_batch(paths[:workers], root, params, scheduler=client)
            variants = {
                "serial (1 worker)": dict(workers=1),
                f"{workers} local workers": dict(workers=workers),
                f"LocalCluster {workers} workers": dict(scheduler=client),
            }
            for r in range(repeats):
                for name, how in variants.items():  # interleaved: the machine's load hits all alike
                    wall, case_s, cpu_s = _timed_batch(paths, root, params, **how)
                    fig = figures.setdefault(name, Figure(name, [], n_cases, how.get("workers", workers), case_s, cpu_s))
                    fig.wall_s.append(wall)
                    fig.case_s, fig.cpu_s = case_s, cpu_s
                    say(f"  repeat {r + 1}: {name}: {wall:.1f} s")
            roundtrips = []
            for _ in range(repeats):
                t = time.perf_counter()
                client.gather(client.map(_noop, range(200), pure=False))
                roundtrips.append((time.perf_counter() - t) / 200)
        finally:
            client.close()
            cluster.close()
    lc = figures[f"LocalCluster {workers} workers"]
    beyond = statistics.median(lc.wall_s) * workers / n_cases - lc.case_s
    return {
        "shape": list(shape), "cases": n_cases, "repeats": repeats, "regions": regions, "cluster_start_s": cluster_start,
        "figures": figures, "noop_task_ms": 1000 * statistics.median(roundtrips),
        "cluster_overhead_s_per_case": beyond,
    }  # fmt: skip


def profile_case(path: Path, model: str | None = None, threads: int = 1, repeats: int = 2, regions: bool = False) -> dict:
    """One real case, step by step on `threads` torch threads: read, detect, write; time and bytes.

    The steps a cohort repeats 50,000 times, apart, so that a cost estimate can say which one
    grows into the bottleneck (storage reads, compute, writes). CPU seconds are given beside
    wall seconds because wall time on a shared machine measures the neighbours too.
    """
    import resource

    import torch

    from ..detection.outputs import write_case_outputs
    from ..detection.pipeline import detect_volume, get_model
    from ..io import read_volume

    torch.set_num_threads(threads)
    params = DetectionParams(device="cpu", model=model, regions=regions)
    steps: dict[str, list[tuple[float, float]]] = {"read": [], "detect": [], "write": []}

    def timed(step: str, fn):
        w, c = time.perf_counter(), time.process_time()
        value = fn()
        steps[step].append((time.perf_counter() - w, time.process_time() - c))
        return value

    with tempfile.TemporaryDirectory(prefix="cmbdetect-profile-") as tmp:
        get_model(model, torch.device("cpu"))  # loaded once, before timing, as a worker does
        for _ in range(repeats):
            volume = timed("read", lambda: read_volume(path))
            result = timed("detect", lambda: detect_volume(volume, params))
            written = timed("write", lambda: write_case_outputs(result, Path(tmp), "case"))
        out_bytes = {k: p.stat().st_size for k, p in written.items()}
        shape = volume.array.shape
    return {
        "shape": shape, "threads": threads, "input_bytes": Path(path).stat().st_size, "output_bytes": out_bytes,
        "steps": {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in steps.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip
