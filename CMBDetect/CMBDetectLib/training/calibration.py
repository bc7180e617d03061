"""Calibrating stage 2's P(microbleed) and choosing its operating points on a tuning set.

The candidate classifier ranks candidates well out of its training domain, but its raw
P(microbleed) is overconfident there, so a fixed 0.5 keeps far too many. Here every candidate of
a labelled *tuning* set (its own seeds, drawn from a domain the classifier was not trained on)
is scored once, labelled true when it overlaps a true microbleed, and:
- an isotonic regression (scikit-learn) maps the stage's P(microbleed) to the observed share of
  true candidates: the calibration, stored in the card as knots (applying it needs numpy only);
- two operating points are chosen on the calibrated P: *count* (precision first: the lowest
  threshold with precision >= 0.85 and <= 0.5 false positives per scan on the tuning set) and
  *review* (sensitivity first: the highest threshold that loses at most 2 points of the
  sensitivity stage 1's candidates allow).
Separately for scans with and without phase. Reported figures on the tuning set are
optimistic by construction; the card's held-out figures come from other seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..detection.candidates import (
    MICROBLEED,
    Calibration,
    LoadedClassifier,
    choose_phase_sign,
    classify_patches,
    find_candidates,
    sample_patches,
    scaled_magnitude,
    without_phase,
)
from ..detection.lesions import SMALL_LARGE_BOUNDARY_MM, equivalent_diameter_mm
from ..io import Geometry

LESION_RULE_FRACTION = 0.4  # the paper's rule: a true lesion is found when > 40% of it is covered
COUNT_PRECISION = 0.85
COUNT_FP_PER_SCAN = 0.5
REVIEW_SENSITIVITY_LOSS = 0.02
MODES = ("no_phase", "phase")


@dataclass
class CaseCandidates:
    """One tuning case: each candidate's stage P(microbleed) and truth, each true lesion's size."""

    case: str
    p_stage: np.ndarray  # (n_candidates,)
    is_true: np.ndarray  # (n_candidates,) bool: overlaps a true microbleed
    coverage: np.ndarray  # (n_candidates, n_truth) fraction of each true lesion it covers
    truth_large: np.ndarray  # (n_truth,) bool: 5-10 mm


@dataclass
class OperatingFigures:
    threshold: float
    sensitivity_small: float | None
    sensitivity_large: float | None
    precision: float | None
    fp_per_scan: float
    n_kept: int

    def as_dict(self) -> dict[str, float | int | None]:
        r = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
        return {
            "threshold": r(self.threshold), "sensitivity_small": r(self.sensitivity_small),
            "sensitivity_large": r(self.sensitivity_large), "precision": r(self.precision),
            "fp_per_scan": r(self.fp_per_scan), "n_kept": self.n_kept,
        }  # fmt: skip


def score_case(
    case: str,
    image: np.ndarray,
    unet_probability: np.ndarray,
    geometry: Geometry,
    truth: np.ndarray,
    classifier: LoadedClassifier,
    phase: np.ndarray | None = None,
) -> CaseCandidates:
    """Every candidate of one case with the stage's P(microbleed) (no-phase rule without phase)
    and its overlap with the true lesions (`truth`: a label map, one id per microbleed)."""
    labels, cands = find_candidates(unet_probability, geometry, classifier.settings)
    truth = np.asarray(truth).astype(np.int64, copy=False)
    truth_ids = np.unique(truth[truth > 0])
    truth_sizes = np.array([int((truth == t).sum()) for t in truth_ids])
    truth_large = equivalent_diameter_mm(truth_sizes, geometry.spacing) >= SMALL_LARGE_BOUNDARY_MM if len(truth_ids) else np.zeros(0, bool)
    if not cands:
        z = np.zeros(0, np.float32)
        return CaseCandidates(case, z, z.astype(bool), np.zeros((0, len(truth_ids))), truth_large)
    centres = np.array([c.centroid_lps for c in cands])
    patches = sample_patches(scaled_magnitude(image), phase, geometry, centres, classifier.network.config)
    if phase is None:
        probs = without_phase(classify_patches(classifier.network, patches))
    else:
        probs, _ = choose_phase_sign(classifier.network, patches, "keep")
    # Overlap of every candidate with every true lesion, from the pairs of labels voxel by voxel.
    both = (labels > 0) & (truth > 0)
    index = {int(t): n for n, t in enumerate(truth_ids)}
    overlap = np.zeros((len(cands), len(truth_ids)))
    pairs, counts = np.unique(np.stack([labels[both].astype(np.int64), truth[both]]), axis=1, return_counts=True)
    for (c, t), n in zip(pairs.T, counts):
        overlap[int(c) - 1, index[int(t)]] += n
    coverage = overlap / np.maximum(truth_sizes, 1)[None, :]
    return CaseCandidates(case, probs[:, MICROBLEED].astype(np.float32), overlap.sum(axis=1) > 0, coverage, truth_large)


def fit_calibration(cases: Sequence[CaseCandidates]) -> Calibration:
    """Isotonic regression of truth on the stage's P(microbleed), as piecewise-linear knots."""
    from sklearn.isotonic import IsotonicRegression

    p = np.concatenate([c.p_stage for c in cases]).astype(np.float64)
    y = np.concatenate([c.is_true for c in cases]).astype(np.float64)
    if len(p) < 10 or y.min() == y.max():
        raise ValueError(f"calibration needs true and false candidates ({int(y.sum())} true of {len(p)})")
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    x, v = np.asarray(iso.X_thresholds_, float), np.asarray(iso.y_thresholds_, float)
    # Pin the ends so every P in 0..1 maps inside the fitted range.
    if x[0] > 0.0:
        x, v = np.r_[0.0, x], np.r_[v[0], v]
    if x[-1] < 1.0:
        x, v = np.r_[x, 1.0], np.r_[v, v[-1]]
    keep = np.r_[True, np.diff(x) > 1e-9]
    return Calibration.from_dict({"x": np.round(x[keep], 6).tolist(), "y": np.round(np.maximum.accumulate(v[keep]), 6).tolist()})


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE: the mean |observed share - mean P| over equal-width bins, weighted by their counts."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    if len(p) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(y[inside].mean() - p[inside].mean())
    return float(total / len(p))


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict[str, float | int]]:
    """The reliability diagram's points: per bin, mean P, observed share and count."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            out.append({"bin": [round(edges[b], 2), round(edges[b + 1], 2)], "mean_p": round(float(p[inside].mean()), 4),
                        "observed": round(float(y[inside].mean()), 4), "n": int(inside.sum())})  # fmt: skip
    return out


def figures_at(cases: Sequence[CaseCandidates], threshold: float, calibrate: Callable[[np.ndarray], np.ndarray]) -> OperatingFigures:
    """Lesion figures when candidates with calibrated P >= threshold are kept (the paper's rule)."""
    found = {False: [0, 0], True: [0, 0]}  # large? -> [found, total]
    tp = fp = 0
    for c in cases:
        kept = calibrate(c.p_stage) >= threshold if len(c.p_stage) else np.zeros(0, bool)
        covered = c.coverage[kept].sum(axis=0) if len(c.p_stage) else np.zeros(len(c.truth_large))
        for large, hit in zip(c.truth_large, covered > LESION_RULE_FRACTION):
            found[bool(large)][0] += int(hit)
            found[bool(large)][1] += 1
        tp += int((kept & c.is_true).sum())
        fp += int((kept & ~c.is_true).sum())
    share = lambda a, b: a / b if b else None  # noqa: E731
    return OperatingFigures(
        threshold, share(*found[False]), share(*found[True]), share(tp, tp + fp), fp / max(len(cases), 1), tp + fp
    )


def _sensitivity(f: OperatingFigures) -> float:
    return f.sensitivity_small if f.sensitivity_small is not None else (f.sensitivity_large or 0.0)


def choose_operating_points(cases: Sequence[CaseCandidates], calibrate: Callable[[np.ndarray], np.ndarray]) -> dict[str, OperatingFigures]:
    """`count` and `review` thresholds on calibrated P (see the module's docstring)."""
    values = np.unique(np.concatenate([calibrate(c.p_stage) for c in cases if len(c.p_stage)] or [np.zeros(0)]))
    grid = np.unique(np.r_[values, 0.0])
    figures = [figures_at(cases, float(t), calibrate) for t in grid]
    ceiling = _sensitivity(figures[0])
    review = max((f for f in figures if _sensitivity(f) >= ceiling - REVIEW_SENSITIVITY_LOSS), key=lambda f: f.threshold)
    meets = [f for f in figures if f.fp_per_scan <= COUNT_FP_PER_SCAN and (f.precision or 0.0) >= COUNT_PRECISION]
    if not meets:  # the targets cannot both be met: keep the false-positive bound
        meets = [f for f in figures if f.fp_per_scan <= COUNT_FP_PER_SCAN] or figures[-1:]
    count = min(meets, key=lambda f: f.threshold)
    return {"review": review, "count": count}


@dataclass
class ModeFit:
    calibration: Calibration
    points: dict[str, OperatingFigures]
    ece_before: float
    ece_after: float
    reliability_after: list = field(default_factory=list)
    n_candidates: int = 0
    n_true: int = 0

    def card_figures(self) -> dict:
        return {
            "n_candidates": self.n_candidates, "n_true": self.n_true,
            "ece_before": round(self.ece_before, 4), "ece_after": round(self.ece_after, 4),
            "reliability_after": self.reliability_after,
            "operating_points": {k: v.as_dict() for k, v in self.points.items()},
        }  # fmt: skip


def fit_mode(cases: Sequence[CaseCandidates]) -> ModeFit:
    calibration = fit_calibration(cases)
    p = np.concatenate([c.p_stage for c in cases])
    y = np.concatenate([c.is_true for c in cases])
    return ModeFit(
        calibration, choose_operating_points(cases, calibration), expected_calibration_error(p, y),
        expected_calibration_error(calibration(p), y), reliability(calibration(p), y), len(p), int(y.sum()),
    )  # fmt: skip


def describe_fits(fits: dict[str, "ModeFit"], where: str) -> list[str]:
    """What `calibrate` and `adapt` print: per phase mode, the candidates and each operating
    point's figures on the cases it was fitted on (`where` says which: they are optimistic)."""
    lines = []
    for mode, fit in fits.items():
        f = fit.card_figures()
        lines.append(f"{mode}: {f['n_candidates']} candidates ({f['n_true']} true); ECE {f['ece_before']} -> {f['ece_after']}")
        for name, point in f["operating_points"].items():
            lines.append(
                f"  {name}: P >= {point['threshold']}: sensitivity small {point['sensitivity_small']} large "
                f"{point['sensitivity_large']}, precision {point['precision']}, {point['fp_per_scan']} FP/scan ({where}: optimistic)"
            )
    return lines


def calibrated_card(card: dict, fits: dict[str, ModeFit], provenance: dict, default_point: str = "count") -> dict:
    """A copy of a classifier card with the calibration, the operating points and how they were made."""
    out = dict(card)
    out["calibration"] = {mode: fit.calibration.as_dict() for mode, fit in fits.items()}
    out["calibration"]["method"] = "isotonic regression of 'overlaps a true microbleed' on the stage's P(microbleed)"
    out["operating_points"] = {
        "default": default_point,
        **{name: {mode: round(fit.points[name].threshold, 6) for mode, fit in fits.items()} for name in ("review", "count")},
    }
    out["calibration_fit"] = {**provenance, **{mode: fit.card_figures() for mode, fit in fits.items()}}
    out["stage"] = {**out.get("stage", {}), "bridge_slices": 1}
    return out


def read_case_files(image: Path, truth: Path, phase: Path | None):
    """(volume, truth array, phase array or None) for one tuning case, grids checked."""
    from ..io import read_phase, read_volume

    volume = read_volume(image)
    labels = read_volume(truth)
    if labels.shape != volume.shape:
        raise ValueError(f"{truth.name}: label map shape {labels.shape} differs from the image's {volume.shape}")
    phase_array = read_phase(phase, image.name, volume) if phase is not None else None
    return volume, np.rint(labels.array).astype(np.int64), phase_array
