"""Benchmark of the synthetic data engine: seconds per 384 x 384 x 100 case.

Prints the median over several cases (different seeds, so different lesion counts and
protocols) of the generation time, the time to write the image, labels and JSON, and their
sum, plus the median of each generation stage. The template is loaded, and one small case
generated, before timing starts: those are one-off costs per process.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARK_SHAPE = {"matrix": (384, 384), "n_slices": 100}


def benchmark(repeats: int = 5, overrides: dict[str, object] | None = None) -> dict[str, object]:
    from .anatomy import load_template
    from .case import generate_case
    from .timing import collect
    from .writer import write_case

    settings = {**BENCHMARK_SHAPE, **(overrides or {})}
    start = time.perf_counter()
    load_template()
    template_s = time.perf_counter() - start
    generate_case(0, 10_000, matrix=(64, 64), n_slices=16)  # warm-up: imports, caches
    generation, writing, stages, lesions = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="cmbdetect-synth-bench-") as tmp:
        for r in range(repeats):
            with collect() as timings:
                t0 = time.perf_counter()
                case = generate_case(0, r, **settings)
                t1 = time.perf_counter()
            write_case(case, Path(tmp))
            t2 = time.perf_counter()
            generation.append(t1 - t0)
            writing.append(t2 - t1)
            stages.append(timings)
            lesions.append(int(case.meta["n_lesions"]))  # type: ignore[arg-type]
            del case
    names = list(stages[0])
    return {
        "settings": settings,
        "repeats": repeats,
        "template_load_s": template_s,
        "generate_s": generation,
        "write_s": writing,
        "total_s": [g + w for g, w in zip(generation, writing)],
        "stage_median_s": {n: float(np.median([s.get(n, 0.0) for s in stages])) for n in names},
        "lesions": lesions,
    }


def print_benchmark(repeats: int = 5, overrides: dict[str, object] | None = None) -> int:
    result = benchmark(repeats, overrides)
    shape = result["settings"]
    print(f"cmbdetect synth benchmark: {shape['matrix'][0]}x{shape['matrix'][1]}x{shape['n_slices']} cases, "  # type: ignore[index]
          f"{result['repeats']} runs (lesions per case: {result['lesions']})")
    print(f"  template load (once per process): {result['template_load_s']:.2f} s")
    for key, label in (("generate_s", "generate"), ("write_s", "write NIfTI + JSON"), ("total_s", "total")):
        values = result[key]
        print(f"  {label:<20} median {np.median(values):6.2f} s   min {min(values):6.2f}   max {max(values):6.2f}")  # type: ignore[arg-type,type-var]
    print("  generation stages (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in result["stage_median_s"].items()))  # type: ignore[union-attr]
    return 0
