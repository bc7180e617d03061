"""How long a live re-threshold takes: mrml.rethreshold on slicer-core's real scene.

    .venv/bin/python Testing/bench_rethreshold.py [KxJxI]      (default 80x384x384)

A synthetic probability map (150 blobs of 2-6 mm at probabilities 0.3-0.95 over a 0-0.2 noise
floor) on an oblique grid; five thresholds, each timed for the whole re-threshold (lesion
extraction plus rewriting segments, table and markups) and for the extraction alone.
Prints medians of the five runs and the load average: the build machine is shared.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_headless as sh  # noqa: E402


def probability_map(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    prob = np.zeros(shape, np.float32)
    for _ in range(150):
        k, j, i = rng.integers(2, shape[0] - 2), rng.integers(8, shape[1] - 8), rng.integers(8, shape[2] - 8)
        radius, p = rng.uniform(2, 6), rng.uniform(0.3, 0.95)
        z, y, x = np.mgrid[k - 2 : k + 3, j - 8 : j + 8, i - 8 : i + 8]
        blob = np.where(np.sqrt(((z - k) * 4) ** 2 + (y - j) ** 2 + (x - i) ** 2) < radius, p, 0)
        np.maximum(prob[k - 2 : k + 3, j - 8 : j + 8, i - 8 : i + 8], blob, out=prob[k - 2 : k + 3, j - 8 : j + 8, i - 8 : i + 8])
    return prob + rng.uniform(0, 0.2, shape).astype(np.float32)


def main() -> None:
    shape = tuple(int(v) for v in sys.argv[1].split("x")) if len(sys.argv) > 1 else (80, 384, 384)
    app = sh.build_app()  # keep it: the scene and logics live as long as it does  # noqa: F841
    from CMBDetectLib.mrml.nodes import geometry_of_node
    from CMBDetectLib.mrml.results import rethreshold, write_result
    from CMBDetectLib.detection.rethreshold import lesions_from_probability

    prob = probability_map(shape)
    node = sh.add_oblique_volume(np.full(shape, 400, np.float32), "swi")
    geometry = geometry_of_node(node)
    seg, _, _ = write_result(lesions_from_probability(prob, geometry, 0.4, 2.0, 10.0, {"model_id": "bench"}), node)
    times: dict[str, list[float]] = {"rethreshold (extract + nodes)": [], "extraction alone": []}
    for threshold in (0.5, 0.6, 0.45, 0.7, 0.4):
        start = time.perf_counter()
        result, *_ = rethreshold(seg, threshold, 2.0, 10.0)
        times["rethreshold (extract + nodes)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        lesions_from_probability(prob, geometry, threshold, 2.0, 10.0)
        times["extraction alone"].append(time.perf_counter() - start)
    print(f"volume {shape} (k, j, i), {len(result.lesions)} lesions at 0.4; load average {open('/proc/loadavg').read().split()[0]}")
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.2f} s of {len(values)} (min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
