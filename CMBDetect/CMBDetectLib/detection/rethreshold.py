"""Lesions again from a kept probability map: a new threshold or size range, no network.

The network's output does not depend on the threshold or on the size range: both act only
in lesion extraction (lesions.extract_lesions). Keeping the probability map of a run makes
moving either control a matter of relabelling, about a second, instead of a new inference.

What the threshold cuts is what the command line cut. The paper's pipeline (one stage) cuts
the network's probability. With the candidate stage the kept map is P(microbleed): the
classifier's value, constant over each candidate (the U-Net's component at the candidate
threshold), and below the candidate threshold everywhere else (candidates.py,
microbleed_probability_map). Cutting it at t >= the candidate threshold therefore gives back
exactly the candidates with P(microbleed) >= t, and at the stage's own cut (keep_at) exactly
the command line's lesions. Each lesion takes its verdict (P(microbleed), certainty) and the
U-Net's mean and maximum probability from the run's candidate records, so a re-thresholded
lesion reads as the command line wrote it; the candidates below the threshold are the rejected.

Torch-free on purpose: the Slicer module re-thresholds in the GUI process, which never
imports torch (detection itself runs in a child process, see runner.py and worker.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from ..anatomy.atlas import Location
from ..anatomy.locate import locations_from_summary, with_counts
from ..io import Geometry
from .lesions import Lesion, extract_lesions, lesion_counts
from .records import Candidate

BELOW_THRESHOLD = "below threshold"  # the reason of a candidate the stage kept but a higher threshold drops
MATCH_VOXELS = 1e-3  # a lesion is its candidate when their centroids agree this closely (voxels)


@dataclass
class LesionMap:
    """What write_result needs (labels, lesions, geometry, summary()), from a probability map.

    `run` holds the summary of the detection that made the probability map (model, version,
    seconds of the run): it stays true after re-thresholding, and is copied into summary().
    `candidates` (two stages only) are every candidate of the run with its verdict; `rejected`
    are those below the threshold, in the size range.
    """

    probability: np.ndarray  # (k, j, i) float32 on the input's grid
    labels: np.ndarray  # (k, j, i), lesion ids 1..N
    lesions: list[Lesion]
    geometry: Geometry
    threshold: float
    min_diameter_mm: float
    max_diameter_mm: float
    run: dict = field(default_factory=dict)
    candidates: list[Candidate] | None = None
    rejected: list[Candidate] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """The keys of pipeline.DetectionResult.summary(), counts and parameters recomputed."""
        out = {
            **self.run,
            **lesion_counts(self.lesions),
            "threshold": float(self.threshold),
            "threshold_of": "probability" if self.candidates is None else "p_microbleed",
            "size_range_mm": [float(self.min_diameter_mm), float(self.max_diameter_mm)],
        }
        if self.candidates is not None and isinstance(self.run.get("candidate_stage"), dict):
            out["candidate_stage"] = {**self.run["candidate_stage"], "n_rejected": len(self.rejected)}
        if isinstance(self.run.get("regions"), dict):
            out["regions"] = with_counts(self.run["regions"], [Location(l.mars_region, l.mars_structure, l.side) for l in self.lesions])
        return out


def stage_cut(run: dict) -> float | None:
    """The candidate stage's own cut on P(microbleed) in a run's summary; None for one stage."""
    stage = run.get("candidate_stage")
    return float(stage["keep_at"]) if isinstance(stage, dict) and "keep_at" in stage else None


def lesions_from_probability(
    probability: np.ndarray,
    geometry: Geometry,
    threshold: float,
    min_diameter_mm: float,
    max_diameter_mm: float,
    run: dict | None = None,
    candidates: list[Candidate] | None = None,
) -> LesionMap:
    """Threshold, 3D components and size filter of a kept probability map, as detect_volume does.

    With `candidates` (a two-stage run), the map is P(microbleed) and the threshold a cut on it:
    it must not lie below the run's candidate threshold, under which the map holds the U-Net's
    capped probability instead (ValueError)."""
    probability = np.asarray(probability, dtype=np.float32)
    run = dict(run or {})
    if candidates is None:
        labels, lesions = extract_lesions(probability, geometry, threshold, min_diameter_mm, max_diameter_mm)
        _locate(lesions, run)
        return LesionMap(probability, labels, lesions, geometry, threshold, min_diameter_mm, max_diameter_mm, run)
    stage = run.get("candidate_stage") or {}
    # Below this the map holds the U-Net's capped probability, not P(microbleed): the candidate
    # threshold, or a lower operating point's cut (runs before p_map_floor: the candidate threshold).
    floor = float(stage.get("p_map_floor", stage.get("candidate_threshold", 0.0)))
    if threshold < floor:
        raise ValueError(
            f"with the candidate stage the threshold cuts P(microbleed) over the candidates found at "
            f"{float(stage.get('candidate_threshold', 0.0)):g}; {threshold:g} lies below {floor:g}, where the map is not P(microbleed)"
        )
    labels, found = extract_lesions(probability, geometry, threshold, min_diameter_mm, max_diameter_mm)
    kept = [_with_verdict(lesion, _record_of(lesion, candidates), stage) for lesion in found]
    _locate(kept, run)
    below = [c for c in candidates if c.p_microbleed < threshold and min_diameter_mm <= c.diameter_mm <= max_diameter_mm]
    # The stage's own rejections first, in its order, so that at its cut the ids are the command line's.
    below.sort(key=lambda c: c.kept)
    rejected = [_rejected(c, n) for n, c in enumerate(below, start=1)]
    return LesionMap(
        probability, labels, kept, geometry, threshold, min_diameter_mm, max_diameter_mm, run, list(candidates), rejected
    )


def _record_of(lesion: Lesion, candidates: list[Candidate]) -> Candidate:
    for candidate in candidates:
        if candidate.n_voxels == lesion.n_voxels and np.allclose(candidate.centroid_ijk, lesion.centroid_ijk, atol=MATCH_VOXELS):
            return candidate
    raise ValueError(
        f"the lesion at voxel {tuple(round(v, 1) for v in lesion.centroid_ijk)} is none of the run's candidates: "
        "the kept probability map and the candidate list disagree"
    )


def _locate(lesions: list[Lesion], run: dict) -> None:
    """Each lesion's MARS location through the run's registration (kept in its summary), so a
    lesion re-extracted here reads as the command line wrote it; nothing when the run had none."""
    where = locations_from_summary(run.get("regions"), [lesion.centroid_lps for lesion in lesions])
    for lesion, place in zip(lesions, where or []):
        lesion.mars_region, lesion.mars_structure, lesion.side = place.mars_region, place.mars_structure, place.side


def _lesion_fields(lesion: Lesion) -> dict:
    return {f.name: getattr(lesion, f.name) for f in fields(Lesion)}


def _with_verdict(lesion: Lesion, record: Candidate, stage: dict) -> Candidate:
    """The lesion as found now (id, voxels), with its candidate's verdict and U-Net probabilities."""
    values = _lesion_fields(lesion)
    values["mean_probability"], values["max_probability"] = record.mean_probability, record.max_probability
    return Candidate(**values, p_microbleed=record.p_microbleed, certainty=_certainty(record, stage),
                     class_probabilities=dict(record.class_probabilities))  # fmt: skip


def _certainty(record: Candidate, stage: dict) -> str:
    """The stage's grade; for a candidate it rejected, the grade it gets when a lower threshold keeps it.

    "definite" needs the network's own P(microbleed) >= definite_at. With phase that is the
    recorded P; without phase the recorded P includes P(calcification), an upper bound on the
    network's own, and a rejected candidate's P lies below keep_at, itself below definite_at
    on every card so far: "possible"."""
    if record.certainty:
        return record.certainty
    definite_at = float(stage.get("definite_at", 1.0))
    return "definite" if stage.get("phase_used") and record.p_microbleed >= definite_at else "possible"


def _rejected(candidate: Candidate, new_id: int) -> Candidate:
    values = _lesion_fields(candidate)
    values["id"] = new_id
    return Candidate(**values, p_microbleed=candidate.p_microbleed, reason=candidate.reason or BELOW_THRESHOLD,
                     class_probabilities=dict(candidate.class_probabilities))  # fmt: skip
