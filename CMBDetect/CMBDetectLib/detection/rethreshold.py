"""Lesions again from a kept probability map: a new threshold or size range, no network.

The network's output does not depend on the threshold or on the size range: both act only
in lesion extraction (lesions.extract_lesions). Keeping the probability map of a run makes
moving either control a matter of relabelling, about a second, instead of a new inference.

Torch-free on purpose: the Slicer module re-thresholds in the GUI process, which never
imports torch (detection itself runs in a child process, see runner.py and worker.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..io import Geometry
from .lesions import Lesion, extract_lesions, lesion_counts


@dataclass
class LesionMap:
    """What write_result needs (labels, lesions, geometry, summary()), from a probability map.

    `run` holds the summary of the detection that made the probability map (model, version,
    seconds of the run): it stays true after re-thresholding, and is copied into summary().
    """

    probability: np.ndarray  # (k, j, i) float32 on the input's grid
    labels: np.ndarray  # (k, j, i), lesion ids 1..N
    lesions: list[Lesion]
    geometry: Geometry
    threshold: float
    min_diameter_mm: float
    max_diameter_mm: float
    run: dict = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        """The keys of pipeline.DetectionResult.summary(), counts and parameters recomputed."""
        return {
            **self.run,
            **lesion_counts(self.lesions),
            "threshold": float(self.threshold),
            "size_range_mm": [float(self.min_diameter_mm), float(self.max_diameter_mm)],
        }


def lesions_from_probability(
    probability: np.ndarray,
    geometry: Geometry,
    threshold: float,
    min_diameter_mm: float,
    max_diameter_mm: float,
    run: dict | None = None,
) -> LesionMap:
    """Threshold, 3D components and size filter of a kept probability map, as detect_volume does."""
    probability = np.asarray(probability, dtype=np.float32)
    labels, lesions = extract_lesions(probability, geometry, threshold, min_diameter_mm, max_diameter_mm)
    return LesionMap(probability, labels, lesions, geometry, threshold, min_diameter_mm, max_diameter_mm, dict(run or {}))
