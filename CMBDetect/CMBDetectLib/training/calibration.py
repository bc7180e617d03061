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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.special import expit, logit

from ..detection.candidates import (
    CURRENT_STAGE,
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
from ..detection.context import FEATURES, ContextModel, context_features
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
    features: np.ndarray | None = None  # (n_candidates, len(context.FEATURES))


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
    context: bool = False,
) -> CaseCandidates:
    """Every candidate of one case with the stage's P(microbleed) (no-phase rule without phase)
    and its overlap with the true lesions (`truth`: a label map, one id per microbleed); with
    `context`, its context features too (for fit_context)."""
    labels, cands = find_candidates(unet_probability, geometry, classifier.settings)
    truth = np.asarray(truth).astype(np.int64, copy=False)
    truth_ids = np.unique(truth[truth > 0])
    truth_sizes = np.array([int((truth == t).sum()) for t in truth_ids])
    truth_large = equivalent_diameter_mm(truth_sizes, geometry.spacing) >= SMALL_LARGE_BOUNDARY_MM if len(truth_ids) else np.zeros(0, bool)
    if not cands:
        z = np.zeros(0, np.float32)
        return CaseCandidates(case, z, z.astype(bool), np.zeros((0, len(truth_ids))), truth_large, np.zeros((0, len(FEATURES)), np.float32))
    centres = np.array([c.centroid_lps for c in cands])
    magnitude = scaled_magnitude(image)
    patches = sample_patches(magnitude, phase, geometry, centres, classifier.network.config)
    if phase is None:
        probs = without_phase(classify_patches(classifier.network, patches))
    else:
        probs, _ = choose_phase_sign(classifier.network, patches, "keep")
    features = context_features(magnitude, geometry, labels, cands, probs) if context else None
    if classifier.settings.grow_outlines:  # as stage 2 outlines them, after the features are read
        from ..detection.outline import grow_outlines

        order = [cands[n].id for n in np.argsort(-probs[:, MICROBLEED], kind="stable")]
        labels = grow_outlines(np.asarray(image), geometry, labels, order, classifier.settings.max_diameter_mm)
    # Overlap of every candidate with every true lesion, from the pairs of labels voxel by voxel.
    both = (labels > 0) & (truth > 0)
    index = {int(t): n for n, t in enumerate(truth_ids)}
    overlap = np.zeros((len(cands), len(truth_ids)))
    pairs, counts = np.unique(np.stack([labels[both].astype(np.int64), truth[both]]), axis=1, return_counts=True)
    for (c, t), n in zip(pairs.T, counts):
        overlap[int(c) - 1, index[int(t)]] += n
    coverage = overlap / np.maximum(truth_sizes, 1)[None, :]
    return CaseCandidates(case, probs[:, MICROBLEED].astype(np.float32), overlap.sum(axis=1) > 0, coverage, truth_large, features)


PLATT_KNOTS = 121  # knots of a Platt map, evenly spaced in logit from -12 to 12


def fit_platt(cases: Sequence[CaseCandidates]) -> Calibration:
    """Platt scaling: a logistic regression of truth on logit(P), as dense piecewise-linear knots.

    For the context model's out-of-fold P: it is a logistic model's output already, and two
    parameters fitted on a few hundred candidates give a smooth map, where an isotonic one is a
    staircase whose few steps leave the operating points only a few cuts to choose from."""
    from sklearn.linear_model import LogisticRegression

    p, y = _labelled_p(cases)
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(logit(np.clip(p, 1e-6, 1 - 1e-6))[:, None], y.astype(int))
    a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if a <= 0:
        raise ValueError("P does not rise with the share of true candidates: nothing to calibrate")
    x = np.r_[0.0, expit(np.linspace(-12.0, 12.0, PLATT_KNOTS)), 1.0]
    v = expit(a * logit(x) + b)  # logit(0) and logit(1) are -inf and inf: v is 0 and 1 there
    keep = np.r_[True, np.diff(x) > 1e-9]
    return Calibration.from_dict({"x": np.round(x[keep], 9).tolist(), "y": np.round(np.maximum.accumulate(v[keep]), 6).tolist()})


def _labelled_p(cases: Sequence[CaseCandidates]) -> tuple[np.ndarray, np.ndarray]:
    p = np.concatenate([c.p_stage for c in cases]).astype(np.float64)
    y = np.concatenate([c.is_true for c in cases]).astype(np.float64)
    if len(p) < 10 or y.min() == y.max():
        raise ValueError(f"calibration needs true and false candidates ({int(y.sum())} true of {len(p)})")
    return p, y


def fit_calibration(cases: Sequence[CaseCandidates]) -> Calibration:
    """Isotonic regression of truth on the stage's P(microbleed), as piecewise-linear knots."""
    from sklearn.isotonic import IsotonicRegression

    p, y = _labelled_p(cases)
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
    context: ContextModel | None = None
    context_report: dict = field(default_factory=dict)

    def card_figures(self) -> dict:
        return {
            **({"context_model": self.context_report} if self.context is not None else {}),
            "n_candidates": self.n_candidates, "n_true": self.n_true,
            "ece_before": round(self.ece_before, 4), "ece_after": round(self.ece_after, 4),
            "reliability_after": self.reliability_after,
            "operating_points": {k: v.as_dict() for k, v in self.points.items()},
        }  # fmt: skip


def _with_p(cases: Sequence[CaseCandidates], p: np.ndarray) -> list[CaseCandidates]:
    """The cases with their candidates' P replaced by `p` (all candidates, in case order)."""
    out, start = [], 0
    for case in cases:
        n = len(case.p_stage)
        out.append(replace(case, p_stage=p[start : start + n] if n else case.p_stage))
        start += n
    return out


CONTEXT_C = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # inverse L2 strengths tried for the context model
CONTEXT_FOLDS = 5


def _stack(cases: Sequence[CaseCandidates]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with_any = [c for c in cases if len(c.p_stage)]
    if any(c.features is None for c in with_any):
        raise ValueError("the context model needs every case scored with its context features")
    x = np.concatenate([c.features for c in with_any]).astype(np.float64) if with_any else np.zeros((0, len(FEATURES)))
    y = np.concatenate([c.is_true for c in with_any]) if with_any else np.zeros(0, bool)
    groups = np.concatenate([[n] * len(c.p_stage) for n, c in enumerate(with_any)]) if with_any else np.zeros(0, int)
    return x, y, groups


def _logistic(x: np.ndarray, y: np.ndarray, c: float) -> ContextModel:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)  # a constant feature gets scale 1
    fit = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x), y)
    rounded = lambda v: tuple(round(float(x), 6) for x in v)  # noqa: E731
    return ContextModel(FEATURES, rounded(scaler.mean_), rounded(scaler.scale_), rounded(fit.coef_[0]), round(float(fit.intercept_[0]), 6))


def fit_context(tune: Sequence[CaseCandidates], extra: Sequence[CaseCandidates] = ()) -> tuple[ContextModel, list[CaseCandidates], dict]:
    """A logistic model of "is a microbleed" on the context features (detection/context.py) of
    the tuning cases and of `extra` labelled cases (another domain: what the model learns should
    hold on both). Its L2 strength is chosen by case-grouped cross-validated log loss. Returns the
    model fitted on all cases, the tuning cases with P replaced by *out-of-fold* P (each case
    scored by a model fitted without it, so that the calibration and the operating points fitted
    next are not fitted on in-sample P), and what was measured."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import GroupKFold

    x_t, y_t, g_t = _stack(tune)
    x_e, y_e, _ = _stack(extra)
    folds = min(CONTEXT_FOLDS, len(np.unique(g_t)))
    if folds < 2 or y_t.all() or not y_t.any():
        raise ValueError(f"the context model needs two or more tuning cases with true and false candidates ({int(y_t.sum())} true of {len(y_t)})")
    splits = list(GroupKFold(n_splits=folds).split(x_t, y_t, g_t))

    def out_of_fold(c: float) -> np.ndarray:
        p = np.zeros(len(y_t), np.float32)
        for train, test in splits:
            model = _logistic(np.r_[x_t[train], x_e], np.r_[y_t[train], y_e], c)
            p[test] = model(x_t[test])
        return p

    losses = {c: float(log_loss(y_t, out_of_fold(c), labels=[False, True])) for c in CONTEXT_C}
    best = min(losses, key=losses.get)
    p_oof = out_of_fold(best)
    model = _logistic(np.r_[x_t, x_e], np.r_[y_t, y_e], best)
    scored = _with_p(tune, p_oof)
    report = {
        "n_tuning_candidates": len(y_t), "n_extra_candidates": len(y_e), "l2_c": best,
        "oof_log_loss": {str(c): round(v, 4) for c, v in losses.items()},
        "oof_auc": round(_auc(p_oof, y_t), 4),
        "stage_auc": round(_auc(np.concatenate([c.p_stage for c in tune if len(c.p_stage)]), y_t), 4),
    }  # fmt: skip
    return model, scored, report


PRIOR_ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)  # ridge strengths tried when refitting towards a model


def fit_context_towards(prior: ContextModel, cases: Sequence[CaseCandidates]) -> tuple[ContextModel, list[CaseCandidates], dict]:
    """A context model refitted from `prior` (the base model's) on a few labelled cases of a site.

    The prior's logit is a fixed offset and only corrections to its standardised coefficients and
    intercept are fitted, with a ridge penalty towards zero (statsmodels' penalised GLM), its
    strength chosen by case-grouped cross-validated log loss: a handful of cases can move what the
    site shows clearly and leave the rest as the base learned it from many. Returns the model, the
    cases with P replaced by out-of-fold P (for the calibration fitted next) and what was measured."""
    import statsmodels.api as sm
    from sklearn.metrics import log_loss
    from sklearn.model_selection import GroupKFold

    x, y, groups = _stack(cases)
    folds = min(CONTEXT_FOLDS, len(np.unique(groups)))
    if folds < 2 or y.all() or not y.any():
        raise ValueError(f"refitting the context model needs two or more cases with true and false candidates ({int(y.sum())} true of {len(y)})")
    z = (x[:, [FEATURES.index(f) for f in prior.features]] - np.array(prior.mean)) / np.array(prior.scale)
    design = np.c_[np.ones(len(z)), z]
    offset = z @ np.array(prior.coef) + prior.intercept
    splits = list(GroupKFold(n_splits=folds).split(design, y, groups))

    def corrections(rows: np.ndarray, alpha: float) -> np.ndarray:
        # statsmodels divides the log-likelihood by n: alpha / n is a penalty of alpha on the sum.
        penalty = np.r_[0.0, np.full(z.shape[1], alpha / len(rows))]  # the intercept moves freely
        glm = sm.GLM(y[rows].astype(float), design[rows], family=sm.families.Binomial(), offset=offset[rows])
        return np.asarray(glm.fit_regularized(alpha=penalty, L1_wt=0.0, maxiter=300).params)

    def out_of_fold(alpha: float) -> np.ndarray:
        p = np.zeros(len(y))
        for train, test in splits:
            p[test] = expit(design[test] @ corrections(train, alpha) + offset[test])
        return p

    losses = {a: float(log_loss(y, out_of_fold(a), labels=[False, True])) for a in PRIOR_ALPHAS}
    best = min(losses, key=losses.get)
    p_oof = out_of_fold(best).astype(np.float32)
    d = corrections(np.arange(len(y)), best)
    rounded = lambda v: tuple(round(float(x), 6) for x in v)  # noqa: E731
    model = ContextModel(prior.features, prior.mean, prior.scale, rounded(np.array(prior.coef) + d[1:]), round(prior.intercept + float(d[0]), 6))
    scored = _with_p(cases, p_oof)
    report = {
        "refitted_towards": "the base model's context model (its coefficients a fixed offset; ridge-penalised corrections)",
        "n_candidates": len(y), "ridge_alpha": best, "oof_log_loss": {str(a): round(v, 4) for a, v in losses.items()},
        "prior_auc": round(_auc(expit(offset), y), 4), "oof_auc": round(_auc(p_oof, y), 4),
        "largest_corrections": dict(sorted(((f, round(float(v), 3)) for f, v in zip(prior.features, d[1:])), key=lambda kv: -abs(kv[1]))[:5]),
    }  # fmt: skip
    return model, scored, report


def _auc(p: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def fit_mode(
    cases: Sequence[CaseCandidates], extra: Sequence[CaseCandidates] | None = None, prior: ContextModel | None = None
) -> ModeFit:
    """Calibration and operating points on the tuning cases; with `extra` (a sequence, possibly
    empty) a context model first (fit_context), or with `prior` one refitted from it
    (fit_context_towards), and the calibration fitted on its out-of-fold P."""
    context, report = None, {}
    if prior is not None:
        context, cases, report = fit_context_towards(prior, cases)
    elif extra is not None:
        context, cases, report = fit_context(cases, extra)
    calibration = fit_platt(cases) if context is not None else fit_calibration(cases)
    p = np.concatenate([c.p_stage for c in cases])
    y = np.concatenate([c.is_true for c in cases])
    return ModeFit(
        calibration, choose_operating_points(cases, calibration), expected_calibration_error(p, y),
        expected_calibration_error(calibration(p), y), reliability(calibration(p), y), len(p), int(y.sum()),
        context, report,
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
    # A context model belongs to the classifier whose verdicts it was fitted on: one fitted here
    # replaces the card's, and a calibration fitted without one drops it.
    out.pop("context", None)
    if any(fit.context is not None for fit in fits.values()):
        out["context"] = {mode: fit.context.as_dict() for mode, fit in fits.items() if fit.context is not None}
        out["context"]["method"] = (
            "logistic regression (scikit-learn, L2) of 'overlaps a true microbleed' on the standardised context "
            "features of detection/context.py; the calibration is fitted on its out-of-fold P"
        )
        out["calibration"]["method"] = "Platt scaling (logistic regression on logit P) of the context model's out-of-fold P(microbleed)"
    out["stage"] = {**out.get("stage", {}), **CURRENT_STAGE}
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
