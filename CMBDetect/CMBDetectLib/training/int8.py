"""int8 calibration of a U-Net when it is built: `cmbdetect quantize` (detection/quantize.py does the work).

The synthetic heads are held out (their own synth seed, not the training cases'); the ranges go
beside the weights and into the card, so that nothing is calibrated at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..detection.quantize import calibrate, calibration_inputs, quantize_with_ranges, write_calibration


def synthetic_cases(n_cases: int, n_slices: int, seed: int) -> Iterator[np.ndarray]:
    """Held-out synthetic heads (their own seed: not the training cases), small and axial."""
    from ..synth.case import generate_case

    for index in range(n_cases):
        case = generate_case(seed, index, n_slices=n_slices, matrix=(192, 192), oblique=False)
        yield case.image.array


def build_calibration(spec: str | None, n_cases: int = 3, n_slices: int = 16, slices_per_case: int = 8,
                      method: str = "minmax", seed: int = 9090) -> tuple[Path, dict]:  # fmt: skip
    """Calibrate model `spec` on synthetic cases and write its int8 ranges and card (see module doc)."""
    from ..detection.engines import alignment_of, export_onnx
    from ..models import load_model

    model = load_model(spec)
    inputs = calibration_inputs(synthetic_cases(n_cases, n_slices, seed), alignment_of(model.config), slices_per_case)
    calibration = calibrate(export_onnx(model.network), inputs, method)
    calibration["source"] = f"{n_cases} synthetic heads (synth seed {seed}, {n_slices} slices of 192x192), {slices_per_case} head slices each"
    quantize_with_ranges(export_onnx(model.network), calibration)  # proves the ranges cover this export before anything is written
    return write_calibration(model.path, model.card, calibration, model.sha256)
