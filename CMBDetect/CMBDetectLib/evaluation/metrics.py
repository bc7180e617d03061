"""Evaluation metrics for microbleed detection, on plain numpy arrays.

Everything here is a pure function of label maps, probability maps and counts, so the
same numbers come out whether the caller is the `cmbdetect evaluate` command, a notebook
or a test. docs/metrics.md defines every figure; the conventions that matter most:

- A ratio whose denominator is zero is 1.0 when the "other side" is empty too (nothing
  to find and nothing found is perfect agreement) and undefined (NaN here, null in
  reports) otherwise; the failure then shows in the complementary figure (recall 0, or
  precision 0). `ratio` implements that once for scalars and arrays.
- Pooled figures are computed from counts summed over cases, never by averaging ratios.
- Lesions are instances: connected components (26-connectivity by default) of the
  nonzero voxels, or the label ids themselves when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Sequence

import numpy as np

from ..detection.lesions import CONNECTIVITY, MAX_DIAMETER_MM, MIN_DIAMETER_MM, SMALL_LARGE_BOUNDARY_MM, equivalent_diameter_mm, label_components

SIZE_CLASSES = ("small", "large")
RULES = ("overlap", "touch", "distance")  # the paper's, any overlap, VALDO's centre distance
DEFAULT_OVERLAP_FRACTION = 0.4  # the paper: "overlap greater than 40% of the true lesion"
DEFAULT_DISTANCE_MM = 5.0  # VALDO 2021 task 2: centres of mass closer than 5 mm
# Pixel ROC bins: probabilities are rounded to the nearest multiple of 2**-20 (about 1e-6).
# A power of two keeps the scaling exact in floating point, so a probability that already
# lies on the grid (0.5, 0.25, k/2**20) keeps its exact value and its ties.
PIXEL_ROC_BITS = 20
PIXEL_ROC_BINS = 2**PIXEL_ROC_BITS
FROC_FP_POINTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FROC_MAX_POINTS = 2000


# --------------------------------------------------------------------------- ratios


def ratio(num, den, other=0):
    """num / den, with 0/0 defined: 1.0 where `other` is 0 too, NaN where it is not.

    `other` is the count on the opposite side of the comparison: for a recall (den = true
    positives + false negatives) it is the number of predicted positives, for a precision
    it is the number of true positives. Works elementwise on arrays (for the bootstrap).
    """
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    other = np.asarray(other, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(other > 0, np.nan, 1.0))
    return float(out) if out.ndim == 0 else out


def harmonic_f1(precision, recall):
    """F1 as the harmonic mean of precision and recall.

    If either is undefined (no predictions, or no true lesions, while the other side is
    non-empty), nothing is right and something is wrong: F1 = 0. Both 1 gives 1, both 0 gives 0.
    """
    p = np.asarray(precision, dtype=float)
    r = np.asarray(recall, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1.0), 0.0)
    f = np.where(np.isnan(p) | np.isnan(r), 0.0, f)
    # Both undefined cannot happen with `ratio`'s convention (both empty gives 1 and 1).
    return float(f) if f.ndim == 0 else f


def none_if_nan(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if np.isnan(x) else x


# --------------------------------------------------------------------------- pixel level


@dataclass(frozen=True)
class PixelCounts:
    """Voxel confusion counts of a binary prediction against a binary truth."""

    tp: int
    fp: int
    fn: int
    tn: int = 0

    @property
    def dice(self) -> float:
        """2TP / (2TP + FP + FN); two empty masks agree perfectly: 1."""
        return ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, 0)

    @property
    def precision(self) -> float:
        """TP / (TP + FP); NaN when nothing is predicted but there is truth, 1 if both empty."""
        return ratio(self.tp, self.tp + self.fp, self.fn)

    @property
    def recall(self) -> float:
        """TP / (TP + FN); NaN when there is no truth but something is predicted, 1 if both empty."""
        return ratio(self.tp, self.tp + self.fn, self.fp)

    def __add__(self, other: "PixelCounts") -> "PixelCounts":
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)


def pixel_counts(prediction: np.ndarray, truth: np.ndarray) -> PixelCounts:
    """Confusion counts of two masks of the same shape (nonzero = lesion)."""
    p = np.asarray(prediction) != 0
    t = np.asarray(truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    tp = int(np.count_nonzero(p & t))
    n_p = int(np.count_nonzero(p))
    n_t = int(np.count_nonzero(t))
    return PixelCounts(tp=tp, fp=n_p - tp, fn=n_t - tp, tn=int(p.size - n_p - n_t + tp))


# --------------------------------------------------------------------------- ROC


@dataclass
class RocCurve:
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray  # score at or above which a sample is called positive; +inf first
    n_positive: float
    n_negative: float

    @property
    def auc(self) -> float | None:
        if self.n_positive <= 0 or self.n_negative <= 0:
            return None  # AUC needs both classes
        return trapezoid_area(self.fpr, self.tpr)


def trapezoid_area(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _curve_from_cumulative(tps: np.ndarray, fps: np.ndarray, thresholds: np.ndarray) -> RocCurve:
    # Start at (0, 0) with an infinite threshold, as scikit-learn does.
    tps = np.concatenate([[0.0], tps])
    fps = np.concatenate([[0.0], fps])
    thresholds = np.concatenate([[np.inf], thresholds])
    n_pos, n_neg = float(tps[-1]), float(fps[-1])
    tpr = tps / n_pos if n_pos > 0 else np.full_like(tps, np.nan)
    fpr = fps / n_neg if n_neg > 0 else np.full_like(fps, np.nan)
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, n_positive=n_pos, n_negative=n_neg)


def roc_curve(scores: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None = None) -> RocCurve:
    """Exact ROC of scores against binary labels, one point per distinct score.

    Tied scores move together, giving a diagonal step, so the trapezoid area counts a
    tied positive-negative pair as half right: the same curve and AUC as scikit-learn's
    `roc_curve(drop_intermediate=False)` and `roc_auc_score`.
    """
    scores = np.asarray(scores, dtype=float).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError("scores and labels differ in length")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    weight = np.ones(scores.shape) if sample_weight is None else np.asarray(sample_weight, dtype=float).ravel()
    order = np.argsort(-scores, kind="mergesort")
    s, y, w = scores[order], labels[order], weight[order]
    last_of_tie = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if s.size else np.array([], dtype=int)
    tps = np.cumsum(w * y)[last_of_tie]
    fps = np.cumsum(w * ~y)[last_of_tie]
    return _curve_from_cumulative(tps, fps, s[last_of_tie])


def roc_auc(scores: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None = None) -> float | None:
    """Area under the exact ROC curve; None when only one class is present."""
    return roc_curve(scores, labels, sample_weight).auc


def grouped_auc_many(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC under many weightings of whole groups at once: row r weighs every sample of
    group g by weights[r, g]. Rows lacking a class give NaN.

    Used by the case bootstrap (a group is a case, a weight how often it was drawn). The
    weighted AUC is a sum over positive-negative pairs, so it splits into a small matrix
    K[a, b] = pairs won by positives of group a over negatives of group b (ties one half),
    and AUC_r = w_r K w_r / (positives_r negatives_r): exact, and no resample-by-sample array.
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    groups = np.asarray(groups, dtype=np.int64)
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    n_groups = weights.shape[1]
    pos_scores, pos_groups = scores[labels], groups[labels]
    won = np.zeros((n_groups, n_groups))
    for g in np.unique(groups[~labels]):
        neg = np.sort(scores[~labels & (groups == g)])
        below = np.searchsorted(neg, pos_scores, "left")
        ties = np.searchsorted(neg, pos_scores, "right") - below
        won[:, g] = np.bincount(pos_groups, weights=below + 0.5 * ties, minlength=n_groups)
    n_pos = weights @ np.bincount(pos_groups, minlength=n_groups)
    n_neg = weights @ np.bincount(groups[~labels], minlength=n_groups)
    area = np.einsum("ra,ab,rb->r", weights, won, weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), area / (n_pos * n_neg), np.nan)


def probability_bins(probability: np.ndarray) -> np.ndarray:
    """Bin index 0..PIXEL_ROC_BINS of each probability: round(p * 2**20), ties to even."""
    p = np.asarray(probability, dtype=np.float32)
    return np.rint(p * np.float32(PIXEL_ROC_BINS)).astype(np.int32)


@dataclass
class ProbabilityHistogram:
    """Lesion and background voxel counts per probability bin, for the pooled pixel ROC.

    Histograms of several cases add up, so the pooled ROC needs neither every voxel in
    memory nor subsampling. `*_exact` count the voxels whose probability is exactly their
    bin's centre (0 and 1 above all), which bounds the error the binning can cause.
    """

    positive: np.ndarray
    negative: np.ndarray
    positive_exact: np.ndarray
    negative_exact: np.ndarray

    def __iadd__(self, other: "ProbabilityHistogram") -> "ProbabilityHistogram":
        self.positive += other.positive
        self.negative += other.negative
        self.positive_exact += other.positive_exact
        self.negative_exact += other.negative_exact
        return self

    def roc(self) -> RocCurve:
        return roc_from_histograms(self.positive, self.negative)

    def auc_error_bound(self) -> float | None:
        """Largest possible difference between this binned AUC and the AUC of the exact scores.

        Only a lesion and a background voxel in the same bin, one of them off the bin's
        centre, can be ordered differently by their exact values; the binned AUC counts
        such a pair as half right, so it is off by at most one half per pair. Pairs that
        are exactly tied count one half in both.
        """
        pos, neg = self.positive.astype(float), self.negative.astype(float)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            return None
        unsure = pos * neg - self.positive_exact.astype(float) * self.negative_exact.astype(float)
        return float(0.5 * unsure.sum() / (n_pos * n_neg))


def probability_histograms(probability: np.ndarray, truth: np.ndarray) -> ProbabilityHistogram:
    """Bin one case's probabilities (see `probability_bins`), split by the truth mask."""
    p = np.asarray(probability, dtype=np.float32)
    t = np.asarray(truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"probability shape {p.shape} differs from truth shape {t.shape}")
    if not np.isfinite(p).all() or p.min(initial=0.0) < 0.0 or p.max(initial=0.0) > 1.0:
        raise ValueError("probabilities must be finite and lie in [0, 1]")
    p = p.ravel()
    t = t.ravel()
    bins = probability_bins(p)
    exact = bins.astype(np.float32) / np.float32(PIXEL_ROC_BINS) == p
    n = PIXEL_ROC_BINS + 1

    def count(sel: np.ndarray) -> np.ndarray:
        return np.bincount(bins[sel], minlength=n).astype(np.int64)

    return ProbabilityHistogram(count(t), count(~t), count(t & exact), count(~t & exact))


def roc_from_histograms(positive: np.ndarray, negative: np.ndarray) -> RocCurve:
    """ROC of binned scores: every bin is one distinct score, its centre k / 2**20."""
    positive = np.asarray(positive, dtype=float)
    negative = np.asarray(negative, dtype=float)
    occupied = np.flatnonzero((positive + negative) > 0)[::-1]  # high scores first
    tps = np.cumsum(positive[occupied])
    fps = np.cumsum(negative[occupied])
    return _curve_from_cumulative(tps, fps, occupied / float(positive.size - 1))


# --------------------------------------------------------------------------- lesion instances


def instance_labels(volume: np.ndarray, connectivity: int = CONNECTIVITY, use_ids: bool = False) -> tuple[np.ndarray, int]:
    """Lesion instances 1..n of a mask or label map.

    By default the paper's definition: connected components of the nonzero voxels. With
    `use_ids`, each distinct nonzero value is one lesion (renumbered 1..n by value), for
    tools that hand out instance maps in which lesions may touch.
    """
    volume = np.asarray(volume)
    if not use_ids:
        return label_components(volume != 0, connectivity)
    values = np.rint(volume).astype(np.int64) if np.issubdtype(volume.dtype, np.floating) else volume.astype(np.int64)
    ids, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.reshape(values.shape)
    if ids.size and ids[0] == 0:
        return inverse.astype(np.int32), int(ids.size - 1)
    return (inverse + 1).astype(np.int32), int(ids.size)


def _classes(diameters: np.ndarray) -> np.ndarray:
    """`lesions.size_class` for many diameters at once."""
    return np.where(np.asarray(diameters) < SMALL_LARGE_BOUNDARY_MM, "small", "large").astype(object)


@dataclass
class LesionTable:
    """Everything lesion matching needs about one case, a few numbers per lesion.

    Truth lesions t = 0..n_truth-1 and predicted lesions p = 0..n_pred-1 are instances
    numbered t+1 and p+1 in the instance maps. Overlaps are kept as a sparse list of
    pairs (pair_truth[q], pair_pred[q]) sharing pair_voxels[q] voxels, so a noisy mask
    with many thousands of components costs no dense matrix. Centres are centres of mass
    in patient millimetres (distances only, so the origin is left out). Mean
    probabilities are NaN without a probability map.
    """

    truth_voxels: np.ndarray
    truth_diameter_mm: np.ndarray
    truth_centre_mm: np.ndarray
    truth_mean_probability: np.ndarray
    pred_voxels: np.ndarray
    pred_diameter_mm: np.ndarray
    pred_centre_mm: np.ndarray
    pred_mean_probability: np.ndarray
    pair_truth: np.ndarray
    pair_pred: np.ndarray
    pair_voxels: np.ndarray
    has_probability: bool = False
    _near: dict = field(default_factory=dict, repr=False, compare=False)  # close_pairs by distance

    @property
    def n_truth(self) -> int:
        return int(self.truth_voxels.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_voxels.size)

    @property
    def overlap(self) -> np.ndarray:
        """Dense (n_truth, n_pred) overlap matrix, for inspection and small cases."""
        m = np.zeros((self.n_truth, self.n_pred), np.int64)
        m[self.pair_truth, self.pair_pred] = self.pair_voxels
        return m

    @property
    def truth_class(self) -> np.ndarray:
        return _classes(self.truth_diameter_mm)

    @property
    def truth_outside_size_range(self) -> np.ndarray:
        d = self.truth_diameter_mm
        return (d < MIN_DIAMETER_MM) | (d > MAX_DIAMETER_MM)

    def truth_covered(self, keep: np.ndarray | None = None) -> np.ndarray:
        """Voxels of each true lesion under the (kept) predicted lesions, which are disjoint."""
        w = self.pair_voxels if keep is None else self.pair_voxels * keep[self.pair_pred]
        return np.bincount(self.pair_truth, weights=w, minlength=self.n_truth).astype(np.int64)

    @property
    def pred_outside_truth(self) -> np.ndarray:
        inside = np.bincount(self.pair_pred, weights=self.pair_voxels, minlength=self.n_pred).astype(np.int64)
        return self.pred_voxels - inside

    @property
    def distance_mm(self) -> np.ndarray:
        """Dense (n_truth, n_pred) centre distances, for inspection and small cases."""
        diff = self.truth_centre_mm[:, None, :] - self.pred_centre_mm[None, :, :]
        return np.sqrt(np.sum(diff**2, axis=-1))

    def close_pairs(self, max_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(truth, pred, distance) of every pair whose centres lie strictly closer than max_mm."""
        if max_mm in self._near:
            return self._near[max_mm]
        if self.n_truth == 0 or self.n_pred == 0:
            e = np.zeros(0, np.int64)
            return e, e, np.zeros(0)
        from scipy.spatial import cKDTree

        near = cKDTree(self.truth_centre_mm).sparse_distance_matrix(cKDTree(self.pred_centre_mm), max_mm, output_type="ndarray")
        near = near[near["v"] < max_mm]
        self._near[max_mm] = (near["i"].astype(np.int64), near["j"].astype(np.int64), near["v"].astype(float))
        return self._near[max_mm]

    @property
    def pred_class(self) -> np.ndarray:
        """Size class of each predicted lesion: that of the true lesion it overlaps most
        (the first in scan order on a tie), or its own if it overlaps none (a false positive)."""
        classes = _classes(self.pred_diameter_mm)
        if self.pair_voxels.size:
            # Sort pairs by prediction, then most voxels, then truth order: the first pair of
            # each prediction names its true lesion.
            order = np.lexsort((self.pair_truth, -self.pair_voxels, self.pair_pred))
            p, t = self.pair_pred[order], self.pair_truth[order]
            first = np.r_[True, p[1:] != p[:-1]]
            classes[p[first]] = self.truth_class[t[first]]
        return classes


def _index_to_mm(spacing: Sequence[float], direction: Sequence[float] | None) -> np.ndarray:
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    return d @ np.diag(np.asarray(spacing, dtype=float))


def _sparse_stats(
    instances: np.ndarray, n: int, index_to_mm: np.ndarray, values: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Centres of mass (mm) and mean values of instances 1..n, from their voxels only.

    Lesions are a tiny fraction of a volume: working on their flat indices keeps this
    proportional to the lesion voxels rather than to the whole grid.
    """
    if n == 0:
        return np.zeros((0, 3)), np.zeros(0)
    flat = np.flatnonzero(instances)
    ids = instances.ravel()[flat].astype(np.int64)
    voxels = np.bincount(ids, minlength=n + 1)[1:].astype(float)
    kji = np.unravel_index(flat, instances.shape)
    centre_ijk = np.stack([np.bincount(ids, weights=kji[axis], minlength=n + 1)[1:] / voxels for axis in (2, 1, 0)], axis=1)
    if values is None:
        means = np.full(n, np.nan)
    else:
        means = np.bincount(ids, weights=values.ravel()[flat].astype(float), minlength=n + 1)[1:] / voxels
    return centre_ijk @ index_to_mm.T, means


def lesion_table(
    truth_instances: np.ndarray,
    n_truth: int,
    pred_instances: np.ndarray,
    n_pred: int,
    spacing: Sequence[float],
    direction: Sequence[float] | None = None,
    probability: np.ndarray | None = None,
) -> LesionTable:
    """Measure the lesions of one case from its instance maps (see `instance_labels`).

    `spacing` is (i, j, k) in mm and `direction` the 3x3 SimpleITK direction (row-major),
    so sizes and centre distances are physical even on anisotropic or oblique grids.
    """
    if truth_instances.shape != pred_instances.shape:
        raise ValueError(f"truth shape {truth_instances.shape} differs from prediction shape {pred_instances.shape}")
    t = truth_instances.ravel()
    p = pred_instances.ravel()
    t_flat, p_flat = np.flatnonzero(t), np.flatnonzero(p)
    truth_voxels = np.bincount(t[t_flat], minlength=n_truth + 1)[1:].astype(np.int64)
    pred_voxels = np.bincount(p[p_flat], minlength=n_pred + 1)[1:].astype(np.int64)
    both = t_flat[p[t_flat] > 0]
    pair_code = (t[both].astype(np.int64) - 1) * max(n_pred, 1) + (p[both].astype(np.int64) - 1)
    codes, pair_voxels = np.unique(pair_code, return_counts=True)
    m = _index_to_mm(spacing, direction)
    spacing = tuple(float(s) for s in spacing)
    truth_centre, truth_mean = _sparse_stats(truth_instances, n_truth, m, probability)
    pred_centre, pred_mean = _sparse_stats(pred_instances, n_pred, m, probability)
    return LesionTable(
        truth_voxels=truth_voxels,
        truth_diameter_mm=equivalent_diameter_mm(truth_voxels, spacing),
        truth_centre_mm=truth_centre,
        truth_mean_probability=truth_mean,
        pred_voxels=pred_voxels,
        pred_diameter_mm=equivalent_diameter_mm(pred_voxels, spacing),
        pred_centre_mm=pred_centre,
        pred_mean_probability=pred_mean,
        pair_truth=codes // max(n_pred, 1),
        pair_pred=codes % max(n_pred, 1),
        pair_voxels=pair_voxels.astype(np.int64),
        has_probability=probability is not None,
    )


# --------------------------------------------------------------------------- matching rules


@dataclass
class Matching:
    """Result of a matching rule on one case: which true lesions are detected and which
    predicted lesions are correct. Predicted lesions left out (`kept` False, for FROC
    sweeps) are neither correct nor false positives."""

    rule: str
    detected: np.ndarray  # (n_truth,) bool
    correct: np.ndarray  # (n_pred,) bool
    kept: np.ndarray  # (n_pred,) bool
    pairs: list[tuple[int, int]] = field(default_factory=list)  # one-to-one rules only

    @property
    def n_truth(self) -> int:
        return int(self.detected.size)

    @property
    def n_pred(self) -> int:
        return int(self.kept.sum())

    @property
    def tp_truth(self) -> int:
        return int(self.detected.sum())

    @property
    def tp_pred(self) -> int:
        return int(self.correct.sum())

    @property
    def fn(self) -> int:
        return self.n_truth - self.tp_truth

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp_pred

    @property
    def precision(self) -> float:
        return ratio(self.tp_pred, self.n_pred, self.n_truth)

    @property
    def recall(self) -> float:
        return ratio(self.tp_truth, self.n_truth, self.n_pred)

    @property
    def f1(self) -> float:
        return harmonic_f1(self.precision, self.recall)


def _kept(table: LesionTable, keep: np.ndarray | None) -> np.ndarray:
    return np.ones(table.n_pred, bool) if keep is None else np.asarray(keep, dtype=bool)


def match_overlap(table: LesionTable, fraction: float = DEFAULT_OVERLAP_FRACTION, keep: np.ndarray | None = None) -> Matching:
    """The paper's rule.

    A true lesion is detected when the predicted voxels (all predicted lesions together)
    cover strictly more than `fraction` of its voxels, so a lesion split in two halves by
    the prediction is still detected. A predicted lesion is correct when it overlaps at
    least one detected true lesion, i.e. it helps cover a true lesion that is covered
    more than `fraction`; a lesion merging two true lesions is one correct prediction.
    """
    kept = _kept(table, keep)
    covered = table.truth_covered(kept)
    # Exact rational comparison: 2 of 5 voxels is exactly 40%, which is not "more than 40%".
    q = Fraction(str(fraction)).limit_denominator(10**6)
    detected = covered * q.denominator > q.numerator * table.truth_voxels
    correct = np.zeros(table.n_pred, bool)
    correct[table.pair_pred[detected[table.pair_truth]]] = True
    correct &= kept
    return Matching("overlap", detected, correct, kept)


def match_touch(table: LesionTable, keep: np.ndarray | None = None) -> Matching:
    """Any overlap: a true lesion is detected, and a predicted lesion correct, when they
    share at least one voxel with the other side (the WMH challenge's and mendeltem's rule)."""
    kept = _kept(table, keep)
    detected = np.zeros(table.n_truth, bool)
    detected[table.pair_truth[kept[table.pair_pred]]] = True
    correct = np.zeros(table.n_pred, bool)
    correct[table.pair_pred] = True
    correct &= kept
    return Matching("touch", detected, correct, kept)


def match_centre_distance(table: LesionTable, max_mm: float = DEFAULT_DISTANCE_MM, keep: np.ndarray | None = None) -> Matching:
    """One-to-one matching by centre of mass distance strictly below `max_mm`, greedy by
    distance: the closest pair is matched first, then the closest pair among the lesions
    still free, and so on (ties by truth then prediction order). Unmatched predictions are
    false positives, unmatched true lesions are missed."""
    kept = _kept(table, keep)
    detected = np.zeros(table.n_truth, bool)
    correct = np.zeros(table.n_pred, bool)
    pairs: list[tuple[int, int]] = []
    if table.n_truth and table.n_pred:
        ti, pi, d = table.close_pairs(max_mm)
        ti, pi, d = ti[kept[pi]], pi[kept[pi]], d[kept[pi]]
        order = np.lexsort((pi, ti, d))
        for t, p in zip(ti[order], pi[order]):
            if not detected[t] and not correct[p]:
                detected[t] = correct[p] = True
                pairs.append((int(t), int(p)))
    return Matching("distance", detected, correct, kept, pairs)


def match(table: LesionTable, rule: str, keep: np.ndarray | None = None, fraction: float = DEFAULT_OVERLAP_FRACTION, distance_mm: float = DEFAULT_DISTANCE_MM) -> Matching:
    if rule == "overlap":
        return match_overlap(table, fraction, keep)
    if rule == "touch":
        return match_touch(table, keep)
    if rule == "distance":
        return match_centre_distance(table, distance_mm, keep)
    raise ValueError(f"unknown matching rule {rule!r}; choose from {', '.join(RULES)}")


# --------------------------------------------------------------------------- size classes


def class_pixel_counts(table: LesionTable) -> dict[str, PixelCounts]:
    """Voxel counts split by lesion size class, from the lesion table alone.

    For class c: TP_c = voxels of class-c true lesions under the prediction, FN_c = their
    uncovered voxels, FP_c = voxels of class-c predicted lesions (class as in
    `LesionTable.pred_class`) outside every true lesion. The classes partition TP, FP and
    FN, so pooling them gives back the whole-volume counts (the table's "average" row).
    """
    tclass, pclass = table.truth_class, table.pred_class
    covered = table.truth_covered()
    outside = table.pred_outside_truth
    out = {}
    for c in SIZE_CLASSES:
        tm, pm = tclass == c, pclass == c
        tp = int(covered[tm].sum())
        out[c] = PixelCounts(tp=tp, fp=int(outside[pm].sum()), fn=int(table.truth_voxels[tm].sum()) - tp)
    return out


def class_detection_counts(table: LesionTable, matching: Matching) -> dict[str, dict[str, int]]:
    """Per size class: true lesions and how many were detected (sensitivity), predicted
    lesions and how many were correct (the lesion-level "specificity" of Table 3, which is
    a positive predictive value: see docs/metrics.md)."""
    tclass, pclass = table.truth_class, table.pred_class
    out = {}
    for c in SIZE_CLASSES:
        tm = tclass == c
        pm = (pclass == c) & matching.kept
        out[c] = {
            "n_truth": int(tm.sum()),
            "detected": int(matching.detected[tm].sum()),
            "n_pred": int(pm.sum()),
            "correct": int(matching.correct[pm].sum()),
        }
    return out


# --------------------------------------------------------------------------- patient level


def patient_outcome(n_truth: int, n_detected: int, n_pred: int) -> str:
    """"At least one correct lesion": a patient with true lesions is TP when at least one
    of them is detected, else FN (whatever else was predicted); a patient without true
    lesions is FP when anything is predicted, else TN."""
    if n_truth > 0:
        return "TP" if n_detected > 0 else "FN"
    return "FP" if n_pred > 0 else "TN"


def patient_rates(tp, fn, fp, tn) -> dict[str, float]:
    """FPR = FP/(FP+TN), FNR = FN/(TP+FN), TPR = TP/(TP+FN), specificity = TN/(TN+FP);
    NaN when the group is empty (no patient with, or without, lesions)."""
    pos = np.asarray(tp, float) + np.asarray(fn, float)
    neg = np.asarray(fp, float) + np.asarray(tn, float)
    return {"fpr": _rate(fp, neg), "fnr": _rate(fn, pos), "tpr": _rate(tp, pos), "specificity": _rate(tn, neg)}


def _rate(num, den):
    # Unlike `ratio`, an empty group has no "both empty" reading: a rate over no patients is undefined.
    num, den = np.asarray(num, float), np.asarray(den, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return float(v) if v.ndim == 0 else v


# --------------------------------------------------------------------------- lesion ROC and FROC


def lesion_candidates(table: LesionTable, paper_match: Matching) -> tuple[np.ndarray, np.ndarray]:
    """Scored samples for the lesion-level ROC of one case.

    Candidates: every predicted lesion, positive when correct under the paper's rule,
    scored by its mean probability; plus every true lesion the prediction missed under
    that rule, positive, scored by the mean probability over its own voxels. Each true
    lesion so enters once through what found it or through itself; false positives are
    the negatives.
    """
    if not table.has_probability:
        raise ValueError("the lesion ROC needs a probability map")
    missed = ~paper_match.detected
    kept = paper_match.kept
    scores = np.concatenate([table.pred_mean_probability[kept], table.truth_mean_probability[missed]])
    labels = np.concatenate([paper_match.correct[kept], np.ones(int(missed.sum()), bool)])
    return scores, labels


@dataclass
class FrocCurve:
    thresholds: np.ndarray  # score threshold of each point (candidates with score >= it kept)
    fp_per_scan: np.ndarray
    sensitivity: np.ndarray
    n_scans: int
    n_truth: int

    def sensitivity_at(self, fp_per_scan: float) -> float | None:
        """Best sensitivity reached with at most this many false positives per scan; None
        when the curve stops before it (the detector's own threshold was stricter)."""
        if self.fp_per_scan.size == 0 or fp_per_scan > self.fp_per_scan[-1]:
            return None
        ok = self.fp_per_scan <= fp_per_scan
        return float(self.sensitivity[ok].max())


def froc_curve(
    tables: Sequence[LesionTable],
    scores: Sequence[np.ndarray],
    rule: str = "touch",
    fraction: float = DEFAULT_OVERLAP_FRACTION,
    distance_mm: float = DEFAULT_DISTANCE_MM,
    max_points: int = FROC_MAX_POINTS,
) -> FrocCurve:
    """Sensitivity against false positives per scan as the score threshold falls.

    At each distinct score s, the predicted lesions scoring >= s are kept in every case
    and the rule is applied again to the kept ones, so rules in which lesions interact (the
    paper's coverage, one-to-one matching) are exact. The first point (threshold +inf)
    keeps nothing; the last keeps every predicted lesion, the operating point. With more
    than `max_points` distinct scores (a noisy mask with thousands of candidates), only
    `max_points` thresholds spread evenly over the sorted scores are visited, the lowest
    always among them; each point stays exact, the curve is just sampled more coarsely.
    """
    n_truth = int(sum(t.n_truth for t in tables))
    all_scores = np.concatenate([np.asarray(sc, float) for sc in scores]) if scores else np.zeros(0)
    case_of = np.concatenate([np.full(len(sc), ci) for ci, sc in enumerate(scores)]) if scores else np.zeros(0, int)
    pred_of = np.concatenate([np.arange(len(sc)) for sc in scores]) if scores else np.zeros(0, int)
    order = np.argsort(-all_scores, kind="mergesort")
    all_scores, case_of, pred_of = all_scores[order], case_of[order], pred_of[order]
    distinct = np.unique(all_scores)[::-1]
    if distinct.size > max_points:
        distinct = distinct[np.unique(np.linspace(0, distinct.size - 1, max_points).round().astype(int))]
    # Position in the sorted candidates where each threshold's kept set ends.
    ends = np.searchsorted(-all_scores, -distinct, side="right")
    keeps = [np.zeros(t.n_pred, bool) for t in tables]
    tp = np.zeros(len(tables), np.int64)
    fp = np.zeros(len(tables), np.int64)
    # Nothing kept yet: nothing detected, no false positive, in every rule.
    thresholds, fps, sens = [np.inf], [fp.sum()], [tp.sum()]
    start = 0
    for s, end in zip(distinct, ends):
        touched = set()
        for ci, pi in zip(case_of[start:end], pred_of[start:end]):
            keeps[ci][pi] = True
            touched.add(int(ci))
        start = end
        for ci in touched:
            m = match(tables[ci], rule, keeps[ci], fraction, distance_mm)
            tp[ci], fp[ci] = m.tp_truth, m.fp
        thresholds.append(s)
        fps.append(fp.sum())
        sens.append(tp.sum())
    n_scans = len(tables)
    return FrocCurve(
        thresholds=np.asarray(thresholds, float),
        fp_per_scan=np.asarray(fps, float) / max(n_scans, 1),
        sensitivity=np.asarray(sens, float) / n_truth if n_truth else np.full(len(sens), np.nan),
        n_scans=n_scans,
        n_truth=n_truth,
    )


# --------------------------------------------------------------------------- bootstrap


@dataclass
class Interval:
    estimate: float | None
    low: float | None
    high: float | None
    n_valid: int  # resamples in which the figure was defined

    def as_dict(self) -> dict[str, float | int | None]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n_valid": self.n_valid}


def bootstrap_weights(n_cases: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_cases) multiplicities: how often each case is drawn in each resample
    of n_cases drawn with replacement. Seeded, so reports are reproducible."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_cases, size=(n_resamples, n_cases))
    weights = np.zeros((n_resamples, n_cases), np.int64)
    np.add.at(weights, (np.repeat(np.arange(n_resamples), n_cases), draws.ravel()), 1)
    return weights


def percentile_interval(values: np.ndarray, estimate: float | None, level: float = 0.95) -> Interval:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Interval(none_if_nan(estimate), None, None, 0)
    a = (1.0 - level) / 2.0
    low, high = np.percentile(values, [100 * a, 100 * (1 - a)])
    return Interval(none_if_nan(estimate), float(low), float(high), int(values.size))


def bootstrap_counts(
    counts: np.ndarray,
    statistics: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]],
    columns: Sequence[str],
    weights: np.ndarray,
    level: float = 0.95,
) -> dict[str, Interval]:
    """Percentile intervals of statistics of pooled counts over case resamples.

    `counts` is (n_cases, n_columns); each statistic maps a dict column -> summed counts
    (arrays over resamples) to values, NaN where undefined. The estimate is the statistic
    of the full sum, the same function, so estimate and interval cannot disagree in definition.
    """
    counts = np.asarray(counts, float)
    full = {c: counts[:, i].sum() for i, c in enumerate(columns)}
    sums = weights @ counts
    resampled = {c: sums[:, i] for i, c in enumerate(columns)}
    out = {}
    for name, f in statistics.items():
        out[name] = percentile_interval(np.asarray(f(resampled), float), float(f(full)), level)
    return out


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = 600, log_x: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most about `max_points` points of a monotone curve for plots and JSON,
    spread evenly along its length and (for ROC curves, whose interesting part is at tiny
    false positive rates) along log10 x as well. First and last points are always kept."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x.size <= max_points:
        return x, y
    keep = {0, x.size - 1}
    length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    if length[-1] > 0:
        marks = np.linspace(0, length[-1], max_points // 2)
        keep.update(np.searchsorted(length, marks).clip(0, x.size - 1).tolist())
    if log_x:
        positive = x > 0
        if positive.any():
            lx = np.log10(np.where(positive, x, np.nan))
            lo, hi = np.nanmin(lx), np.nanmax(lx)
            marks = np.linspace(lo, hi, max_points // 2)
            idx = np.searchsorted(np.nan_to_num(lx, nan=-np.inf), marks).clip(0, x.size - 1)
            keep.update(idx.tolist())
    idx = np.array(sorted(keep))
    return x[idx], y[idx]


def as_float_list(values: Iterable[float], digits: int = 6) -> list[float | None]:
    out: list[float | None] = []
    for v in values:
        v = float(v)
        out.append(None if not np.isfinite(v) else round(v, digits))
    return out


def instance_majority(instances: np.ndarray, n: int, codes: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """For instances 1..n of a label map: the most frequent non-zero code (1..n_codes-1) inside
    each (0 where none), and whether each touches any non-zero voxel of `codes` at all.
    (Used to name candidates and false positives by the synthetic engine's mimic map.)"""
    inside = instances > 0
    ids = instances[inside].astype(np.int64)
    values = np.clip(codes[inside].astype(np.int64), 0, n_codes - 1)
    votes = np.zeros((n + 1, n_codes), np.int64)
    np.add.at(votes, (ids, values), 1)
    votes = votes[1:, 1:]
    has = votes.sum(axis=1) > 0
    return np.where(has, 1 + np.argmax(votes, axis=1), 0), has

