"""Evaluation of predictions against ground truth: per case, then pooled over cases.

`evaluate_arrays` scores one case given as arrays; `evaluate_folders` pairs the files of
a prediction folder with a truth folder by case name, scores every pair it can, and keeps
a clear error for each case it cannot (missing partner, other grid, unreadable file), so
one bad case never hides the others. `Evaluation.summary()` pools the cases into every
figure of the report; docs/metrics.md defines them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from . import metrics as M
from ..errors import CaseError
from ..io import Geometry, Volume, case_name, is_volume_file, read_volume
from ..labels import read_label_file, read_label
from ..detection.lesions import CONNECTIVITY, DEFAULT_THRESHOLD, MAX_DIAMETER_MM, MIN_DIAMETER_MM, extract_lesions

# Where a false positive lies, from the synthetic engine's mimic map (synth/mimics.py codes
# 1-4): the mimic most of its voxels lie on; "on_microbleed" if it touches a true lesion
# (a fragment, or one the paper's overlap rule did not accept); "other" if on neither.
FP_PLACES = ("vein", "calcification", "nucleus", "air_edge", "other", "on_microbleed")
MIMIC_NAMES = {1: "vein", 2: "calcification", 3: "nucleus", 4: "air_edge"}
MIMICS_FOLDER = "mimics"

LESIONS_SUFFIX = "_lesions"
PROBABILITY_SUFFIX = "_prob"
GRID_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Settings:
    connectivity: int = CONNECTIVITY
    use_label_ids: bool = False  # lesions = label ids instead of connected components
    overlap_fraction: float = M.DEFAULT_OVERLAP_FRACTION
    distance_mm: float = M.DEFAULT_DISTANCE_MM
    threshold: float = DEFAULT_THRESHOLD  # only for predictions given as a probability map alone
    # Score another operating point from stored outputs: drop predicted lesions whose highest
    # P(microbleed) in the probability map is below this (detect once at `review`, score `count`).
    keep_p: float | None = None
    n_bootstrap: int = 1000
    seed: int = 0
    confidence: float = 0.95

    def rule_label(self, rule: str) -> str:
        return {
            "overlap": f"paper: >{self.overlap_fraction:.0%} of true lesion covered",
            "touch": "any overlap (touch)",
            "distance": f"centre distance < {self.distance_mm:g} mm, one-to-one (VALDO)",
        }[rule]


# --------------------------------------------------------------------------- one case


@dataclass
class CaseResult:
    case: str
    control: bool
    prediction_kind: str  # "lesions" (cmbdetect detect), "mask" (other tools), "probability"
    table: M.LesionTable
    pixels: M.PixelCounts
    class_pixels: dict[str, M.PixelCounts]
    matchings: dict[str, M.Matching]
    class_detection: dict[str, dict[str, int]]
    notes: list[str] = field(default_factory=list)
    fp_places: dict[str, int] | None = None  # false positives by mimic (FP_PLACES), with a mimic map
    # MARS location agreement over detected true lesions, when the truth and the prediction have it
    regions: dict[str, int] = field(default_factory=dict)

    @property
    def has_probability(self) -> bool:
        return self.table.has_probability

    @property
    def paper(self) -> M.Matching:
        return self.matchings["overlap"]

    @property
    def patient(self) -> str:
        m = self.paper
        return M.patient_outcome(m.n_truth, m.tp_truth, m.n_pred)

    @property
    def count_difference(self) -> int:
        return self.table.n_pred - self.table.n_truth

    def counts(self) -> dict[str, float]:
        """The case's additive counts: pooled figures and the bootstrap are functions of their sums."""
        c: dict[str, float] = {
            "cases": 1,
            "controls": int(self.control),
            "controls_with_fp": int(self.control and self.table.n_pred > 0),
            "pixel_tp": self.pixels.tp,
            "pixel_fp": self.pixels.fp,
            "pixel_fn": self.pixels.fn,
            "case_dice": self.pixels.dice,
            "positive_cases": int(self.table.n_truth > 0),
            "positive_case_dice": self.pixels.dice if self.table.n_truth > 0 else 0.0,
            "count_difference": self.count_difference,
            "abs_count_difference": abs(self.count_difference),
        }
        for cls, pc in self.class_pixels.items():
            c[f"pixel_tp_{cls}"], c[f"pixel_fp_{cls}"], c[f"pixel_fn_{cls}"] = pc.tp, pc.fp, pc.fn
        for rule, m in self.matchings.items():
            c[f"{rule}_n_truth"], c[f"{rule}_n_pred"] = m.n_truth, m.n_pred
            c[f"{rule}_tp_truth"], c[f"{rule}_tp_pred"] = m.tp_truth, m.tp_pred
        for cls, d in self.class_detection.items():
            for key, value in d.items():
                c[f"{cls}_{key}"] = value
        for outcome in ("TP", "FN", "FP", "TN"):
            c[f"patient_{outcome.lower()}"] = int(self.patient == outcome)
        for key in REGION_KEYS:
            c[key] = self.regions.get(key, 0)
        c["cases_with_mimic_map"] = int(self.fp_places is not None)
        for place in FP_PLACES:
            c[f"fp_on_{place}"] = (self.fp_places or {}).get(place, 0)
        return c

    def row(self) -> dict[str, object]:
        """One line of the per-case CSV (and of the JSON's per-case list)."""
        t = self.table
        row: dict[str, object] = {
            "case": self.case,
            "status": "ok",
            "problem": "",
            "control": int(self.control),
            "prediction": self.prediction_kind,
            "has_probability": int(self.has_probability),
            "n_truth": t.n_truth,
            "n_pred": t.n_pred,
            "count_difference": self.count_difference,
            "n_truth_small": int((t.truth_class == "small").sum()),
            "n_truth_large": int((t.truth_class == "large").sum()),
            "n_truth_outside_2_10mm": int(t.truth_outside_size_range.sum()),
            "pixel_tp": self.pixels.tp,
            "pixel_fp": self.pixels.fp,
            "pixel_fn": self.pixels.fn,
            "dice": _round(self.pixels.dice),
            "pixel_precision": _round(self.pixels.precision),
            "pixel_recall": _round(self.pixels.recall),
        }
        for rule, m in self.matchings.items():
            row[f"{rule}_tp_truth"] = m.tp_truth
            row[f"{rule}_tp_pred"] = m.tp_pred
            row[f"{rule}_fp"] = m.fp
            row[f"{rule}_fn"] = m.fn
            row[f"{rule}_precision"] = _round(m.precision)
            row[f"{rule}_recall"] = _round(m.recall)
            row[f"{rule}_f1"] = _round(m.f1)
        for cls, d in self.class_detection.items():
            row[f"{cls}_detected"] = d["detected"]
        row["patient"] = self.patient
        row["notes"] = "; ".join(self.notes)
        return row


def _round(x: float | None, digits: int = 6) -> float | None:
    x = M.none_if_nan(x)
    return None if x is None else round(x, digits)


def evaluate_arrays(
    case: str,
    truth: np.ndarray,
    prediction: np.ndarray,
    geometry: Geometry,
    probability: np.ndarray | None = None,
    settings: Settings = Settings(),
    control: bool | None = None,
    prediction_kind: str = "lesions",
    mimics: np.ndarray | None = None,
) -> CaseResult:
    """Score one case. Arrays are (k, j, i) on one grid; nonzero = lesion.

    `control` comes from the cohort's case list; when unknown, a case with empty truth is a control.
    `mimics` (the synthetic engine's mimic map, same grid) names where each false positive lies.
    """
    truth = np.asarray(truth)
    prediction = np.asarray(prediction)
    if truth.shape != prediction.shape:
        raise CaseError(case, f"prediction has shape {prediction.shape} but the truth {truth.shape}")
    if probability is not None:
        probability = np.asarray(probability, dtype=np.float32)
        if probability.shape != truth.shape:
            raise CaseError(case, f"probability map has shape {probability.shape} but the truth {truth.shape}")
        if not np.isfinite(probability).all():
            raise CaseError(case, "probability map contains NaN or infinite values")
        lo, hi = float(probability.min()), float(probability.max())
        if lo < 0.0 or hi > 1.0:
            raise CaseError(case, f"probability map values run from {lo:g} to {hi:g}, outside [0, 1]")

    t_inst, n_t = M.instance_labels(truth, settings.connectivity, settings.use_label_ids)
    p_inst, n_p = M.instance_labels(prediction, settings.connectivity, settings.use_label_ids)
    table = M.lesion_table(t_inst, n_t, p_inst, n_p, geometry.spacing, geometry.direction, probability)
    matchings = {rule: M.match(table, rule, None, settings.overlap_fraction, settings.distance_mm) for rule in M.RULES}
    notes = []
    empty_truth = n_t == 0
    if control is None:
        control = empty_truth
    elif control and not empty_truth:
        notes.append(f"listed as a control but its truth has {n_t} lesions; scored as a patient with lesions")
    n_out = int(table.truth_outside_size_range.sum())
    if n_out:
        notes.append(f"{n_out} true lesions outside {MIN_DIAMETER_MM:g}-{MAX_DIAMETER_MM:g} mm (counted in their nearest size class)")
    fp_places = None
    if mimics is not None:
        if np.shape(mimics) != truth.shape:
            raise CaseError(case, f"mimic map has shape {np.shape(mimics)} but the truth {truth.shape}")
        fp_places = false_positive_places(p_inst, t_inst, np.asarray(mimics), matchings["overlap"])
    return CaseResult(
        case=case,
        control=bool(control),
        prediction_kind=prediction_kind,
        table=table,
        pixels=M.pixel_counts(prediction, truth),
        class_pixels=M.class_pixel_counts(table),
        matchings=matchings,
        class_detection=M.class_detection_counts(table, matchings["overlap"]),
        notes=notes,
        fp_places=fp_places,
    )


def false_positive_places(p_inst: np.ndarray, t_inst: np.ndarray, mimics: np.ndarray, matching: M.Matching) -> dict[str, int]:
    """Count the false positives of `matching` (kept, not correct) by where they lie (FP_PLACES)."""
    out = dict.fromkeys(FP_PLACES, 0)
    n = int(matching.correct.size)
    code, _ = M.instance_majority(p_inst, n, mimics, 5)
    _, on_truth = M.instance_majority(p_inst, n, t_inst > 0, 2)
    for p in np.flatnonzero(matching.kept & ~matching.correct):
        out["on_microbleed" if on_truth[p] else MIMIC_NAMES.get(int(code[p]), "other")] += 1
    return out


# --------------------------------------------------------------------------- files


@dataclass
class CasePair:
    case: str
    truth: Path | None = None
    prediction: Path | None = None  # a label map or mask
    probability: Path | None = None
    prediction_kind: str = "lesions"
    control: bool | None = None
    mimics: Path | None = None  # the synthetic engine's mimic map, where the truth folder has one
    meta: Path | None = None  # the synthetic engine's TRUTH/meta/<case>.json (MARS truth per lesion)


def read_controls(path: Path) -> dict[str, bool]:
    """case -> control flag from the synthetic engine's cases.csv (columns case, control)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "case" not in reader.fieldnames:
            raise ValueError(f"{path} has no 'case' column")
        has_control = "control" in reader.fieldnames
        out = {}
        for row in reader:
            flag = str(row.get("control", "") if has_control else "").strip().lower()
            if flag in ("1", "true", "yes", "y"):
                out[row["case"]] = True
            elif flag in ("0", "false", "no", "n"):
                out[row["case"]] = False
        return out


def _volume_files(folder: Path, segmentations: bool = False) -> list[Path]:
    """Volumes in `folder`; `.seg.nrrd` only where asked: in a detection folder it is CMBDetect's
    segmentation, a copy of `<case>_lesions.*`, but in a truth folder it is the ground truth
    (CMBReview's consensus, or one saved from Slicer)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and is_volume_file(p)
        and (segmentations or not p.name.lower().endswith(".seg.nrrd"))
    )


def discover(pred_dir: str | Path, truth_dir: str | Path) -> tuple[list[CasePair], list[CaseError]]:
    """Pair prediction and truth files by case name; every unpaired case becomes an error.

    Truth: TRUTH/labels/<case>.* when TRUTH/labels exists (the synthetic engine's layout,
    with TRUTH/cases.csv giving the controls and TRUTH/mimics/<case>.* the mimic maps that
    name where false positives lie), else TRUTH/<case>.*. Prediction, in order of
    preference: <case>_lesions.* (cmbdetect detect), <case>.* (any tool's mask), or only
    <case>_prob.*, thresholded here; <case>_prob.* also feeds the ROC and FROC.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    for d, what in ((pred_dir, "prediction"), (truth_dir, "truth")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {d}")
    label_dir = truth_dir / "labels" if (truth_dir / "labels").is_dir() else truth_dir
    controls: dict[str, bool] = {}
    errors: list[CaseError] = []
    if (truth_dir / "cases.csv").is_file():
        controls = read_controls(truth_dir / "cases.csv")
    mimic_maps: dict[str, Path] = {}
    if label_dir != truth_dir and (truth_dir / MIMICS_FOLDER).is_dir():
        mimic_maps = {case_name(p): p for p in _volume_files(truth_dir / MIMICS_FOLDER)}

    truths: dict[str, list[Path]] = {}
    for p in _volume_files(label_dir, segmentations=True):
        name = case_name(p)
        truths.setdefault(name[:-4] if name.endswith(".seg") else name, []).append(p)
    lesions: dict[str, list[Path]] = {}
    masks: dict[str, list[Path]] = {}
    probs: dict[str, list[Path]] = {}
    for p in _volume_files(pred_dir):
        name = case_name(p)
        if name.endswith(LESIONS_SUFFIX):
            lesions.setdefault(name[: -len(LESIONS_SUFFIX)], []).append(p)
        elif name.endswith(PROBABILITY_SUFFIX):
            probs.setdefault(name[: -len(PROBABILITY_SUFFIX)], []).append(p)
        else:
            masks.setdefault(name, []).append(p)

    pairs = []
    for case in sorted(set(truths) | set(lesions) | set(masks) | set(probs)):
        duplicated = [v for v in (truths.get(case), lesions.get(case), masks.get(case), probs.get(case)) if v and len(v) > 1]
        if duplicated:
            errors.append(CaseError(case, "several files for one role: " + ", ".join(p.name for p in duplicated[0])))
            continue
        if case not in truths:
            errors.append(CaseError(case, f"prediction found but no ground truth {case}.nii.gz / {case}.nrrd / {case}.seg.nrrd in {label_dir}"))
            continue
        pair = CasePair(case, truth=truths[case][0], control=controls.get(case), mimics=mimic_maps.get(case))
        meta = truth_dir / "meta" / f"{case}.json"
        pair.meta = meta if label_dir != truth_dir and meta.is_file() else None
        pair.probability = probs[case][0] if case in probs else None
        if case in lesions:
            pair.prediction, pair.prediction_kind = lesions[case][0], "lesions"
        elif case in masks:
            pair.prediction, pair.prediction_kind = masks[case][0], "mask"
        elif case in probs:
            pair.prediction_kind = "probability"
        else:
            errors.append(
                CaseError(case, f"no prediction in {pred_dir}: expected {case}_lesions.nii.gz, a mask {case}.nii.gz / {case}.nrrd, or {case}_prob.nii.gz")
            )
            continue
        pairs.append(pair)
    return pairs, errors


def _ijk(shape_kji: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape_kji[::-1])


def check_same_grid(case: str, truth: Volume, other: Volume, what: str, tol: float = GRID_TOLERANCE) -> None:
    """Predictions must lie on the truth's native grid; say exactly how they do not."""
    problems = []
    if truth.shape != other.shape:
        problems.append(f"size {_ijk(other.shape)} voxels vs {_ijk(truth.shape)}")
    g, h = other.geometry, truth.geometry
    for name in ("spacing", "origin", "direction"):
        a, b = np.asarray(getattr(g, name)), np.asarray(getattr(h, name))
        if not np.allclose(a, b, atol=tol, rtol=0):
            problems.append(f"{name} {tuple(round(float(x), 4) for x in a)} vs {tuple(round(float(x), 4) for x in b)}")
    if problems:
        raise CaseError(case, f"{what} is not on the truth's grid ({'; '.join(problems)}); resample it to the truth's native grid first")


def _read_truth(path: Path, case: str, like: Volume | None) -> Volume:
    """A label map, or a `.seg.nrrd` pasted onto the prediction's grid (Slicer may save a
    segmentation cropped to its segments' extent; any other grid is refused by read_label)."""
    if not path.name.lower().endswith(".seg.nrrd"):
        return read_volume(path, case)
    if like is None:
        array, geometry = read_label_file(path, case)
        return Volume(array, geometry)
    return Volume(read_label(path, case, like), like.geometry)


REGION_KEYS = ("region_compared", "region_agree", "side_agree")


def region_agreement(pair: CasePair, truth: np.ndarray, prediction: np.ndarray) -> dict[str, int]:
    """For each true lesion with a MARS truth (TRUTH/meta) that a predicted lesion overlaps (the
    one covering most of it) and whose lesion CSV row has a known region: does the region, and
    the side, agree? Lesions whose region came out unknown are not compared (they are counted
    in the summary's n_region_unknown); empty when either side has no locations."""
    import csv
    import json

    rows_path = pair.prediction.with_name(f"{pair.case}_lesions.csv") if pair.prediction is not None else None
    try:
        lesions = json.loads(pair.meta.read_text()).get("lesions", [])  # type: ignore[union-attr]
        with open(rows_path, newline="") as f:  # type: ignore[arg-type]
            rows = {int(r["id"]): r for r in csv.DictReader(f) if r.get("mars_region")}
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    out = dict.fromkeys(REGION_KEYS, 0)
    for lesion in lesions:
        if "mars_region" not in lesion:
            return {}  # a truth written before the generator recorded locations
        inside = prediction[truth == int(lesion["id"])]
        inside = inside[inside > 0]
        if not inside.size:
            continue
        row = rows.get(int(np.bincount(inside.astype(np.int64)).argmax()))
        if row is None or row["mars_region"] == "unknown":
            continue
        out["region_compared"] += 1
        out["region_agree"] += int(row["mars_region"] == lesion["mars_region"])
        out["side_agree"] += int(row["side"] == lesion["side"])
    return out


def evaluate_pair(pair: CasePair, settings: Settings = Settings()) -> CaseResult:
    """Read one case's files and score it; CaseError names the case and the problem."""
    return score_pair(pair, settings)[0]


def keep_probable(prediction: np.ndarray, probability: np.ndarray, keep_p: float, connectivity: int = CONNECTIVITY) -> np.ndarray:
    """The predicted lesions (connected components) whose highest probability reaches keep_p."""
    prediction = np.asarray(prediction)
    components, n = M.instance_labels(prediction, connectivity)
    if n == 0:
        return prediction
    peak = np.asarray(ndimage.maximum(probability, components, np.arange(1, n + 1)))
    keep = np.r_[False, peak >= keep_p]
    return np.where(keep[components], prediction, 0).astype(prediction.dtype, copy=False)


def count_icc(truth_counts: Sequence[float], predicted_counts: Sequence[float]) -> float | None:
    """ICC(2,1), absolute agreement of single measures (Shrout and Fleiss 1979), between the
    true and the predicted number of microbleeds per case: what MARS reports for two readers'
    counts. statsmodels has no ICC; this is the two-way ANOVA formula."""
    x = np.column_stack([np.asarray(truth_counts, float), np.asarray(predicted_counts, float)])
    n, k = x.shape
    if n < 2:
        return None
    grand = x.mean()
    ms_rows = k * ((x.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    ms_cols = n * ((x.mean(axis=0) - grand) ** 2).sum() / (k - 1)
    ss_error = ((x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + grand) ** 2).sum()
    ms_error = ss_error / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    return float((ms_rows - ms_error) / denominator) if denominator > 0 else None


def score_pair(pair: CasePair, settings: Settings = Settings()) -> tuple[CaseResult, M.ProbabilityHistogram | None]:
    """Score one pair and, when it has a probability map, its pixel ROC histograms."""
    case = pair.case
    prob = read_volume(pair.probability, case) if pair.probability is not None else None
    pred = read_volume(pair.prediction, case) if pair.prediction is not None else None
    truth = _read_truth(pair.truth, case, like=pred or prob)
    probability = None
    if prob is not None:
        check_same_grid(case, truth, prob, f"probability map {pair.probability.name}")
        probability = prob.array
    notes = []
    if pred is not None:
        check_same_grid(case, truth, pred, f"prediction {pair.prediction.name}")
        prediction = pred.array
    else:
        try:
            prediction, _ = extract_lesions(probability, truth.geometry, settings.threshold)
        except ValueError as exc:
            raise CaseError(case, f"cannot threshold the probability map: {exc}") from None
        notes.append(f"no lesion map: probability map thresholded at {settings.threshold:g}, lesions kept at {MIN_DIAMETER_MM:g}-{MAX_DIAMETER_MM:g} mm")
    if settings.keep_p is not None:
        if probability is None:
            raise CaseError(case, "--keep-p needs the probability map <case>_prob.nii.gz beside the lesions")
        prediction = keep_probable(prediction, probability, settings.keep_p, settings.connectivity)
    mimics = None
    if pair.mimics is not None:
        mimic_volume = read_volume(pair.mimics, case)
        check_same_grid(case, truth, mimic_volume, f"mimic map {pair.mimics.name}")
        mimics = mimic_volume.array
    result = evaluate_arrays(case, truth.array, prediction, truth.geometry, probability, settings, pair.control, pair.prediction_kind, mimics)
    result.notes[:0] = notes
    if pair.meta is not None and pred is not None and settings.keep_p is None:
        result.regions = region_agreement(pair, truth.array, prediction)
    histograms = M.probability_histograms(probability, truth.array) if probability is not None else None
    return result, histograms


# --------------------------------------------------------------------------- pooled


@dataclass
class Evaluation:
    settings: Settings
    results: list[CaseResult] = field(default_factory=list)
    errors: list[CaseError] = field(default_factory=list)
    histogram: M.ProbabilityHistogram | None = None  # pooled over the cases with a probability map
    n_pixel_roc_cases: int = 0

    def add(self, result: CaseResult, histogram: M.ProbabilityHistogram | None = None) -> None:
        self.results.append(result)
        if histogram is not None:
            if self.histogram is None:
                self.histogram = histogram
            else:
                self.histogram += histogram
            self.n_pixel_roc_cases += 1

    def summary(self) -> dict:
        return summarize(self)


def evaluate_folders(
    pred_dir: str | Path,
    truth_dir: str | Path,
    settings: Settings = Settings(),
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Evaluation:
    """Score every case of a prediction folder against a truth folder; never stops at a bad case."""
    from tqdm import tqdm

    pairs, errors = discover(pred_dir, truth_dir)
    evaluation = Evaluation(settings)

    def skip(error: CaseError) -> None:
        evaluation.errors.append(error)
        if log:
            with tqdm.external_write_mode():  # keep messages off the progress bar's line
                log(f"skipped {error}")

    for error in errors:
        skip(error)
    for pair in tqdm(pairs, desc="evaluate", unit="case", disable=not progress):
        try:
            evaluation.add(*score_pair(pair, settings))
        except CaseError as error:
            skip(error)
        except (ValueError, OSError, RuntimeError, MemoryError) as exc:
            # Anything else a damaged file can raise: still this case's problem only.
            skip(CaseError(pair.case, f"{type(exc).__name__}: {exc}"))
    evaluation.errors.sort(key=lambda e: e.case)
    return evaluation


# --------------------------------------------------------------------------- pooling


def _statistics(settings: Settings) -> dict[str, Callable[[dict], np.ndarray]]:
    """Headline figures as functions of summed counts (scalars or arrays over resamples)."""
    r, f1 = M.ratio, M.harmonic_f1

    def prec(rule):
        return lambda s: r(s[f"{rule}_tp_pred"], s[f"{rule}_n_pred"], s[f"{rule}_n_truth"])

    def rec(rule):
        return lambda s: r(s[f"{rule}_tp_truth"], s[f"{rule}_n_truth"], s[f"{rule}_n_pred"])

    stats: dict[str, Callable[[dict], np.ndarray]] = {
        "pixel_dice": lambda s: r(2 * s["pixel_tp"], 2 * s["pixel_tp"] + s["pixel_fp"] + s["pixel_fn"], 0),
        "pixel_precision": lambda s: r(s["pixel_tp"], s["pixel_tp"] + s["pixel_fp"], s["pixel_fn"]),
        "pixel_recall": lambda s: r(s["pixel_tp"], s["pixel_tp"] + s["pixel_fn"], s["pixel_fp"]),
        "mean_case_dice": lambda s: r(s["case_dice"], s["cases"], 1),
    }
    for rule in M.RULES:
        stats[f"{rule}_precision"] = prec(rule)
        stats[f"{rule}_recall"] = rec(rule)
        stats[f"{rule}_f1"] = (lambda p, q: lambda s: f1(p(s), q(s)))(prec(rule), rec(rule))
        stats[f"{rule}_fp_per_scan"] = (lambda rl: lambda s: r(s[f"{rl}_n_pred"] - s[f"{rl}_tp_pred"], s["cases"], 1))(rule)
    for cls in M.SIZE_CLASSES:
        stats[f"sensitivity_{cls}"] = (lambda c: lambda s: r(s[f"{c}_detected"], s[f"{c}_n_truth"], s[f"{c}_n_pred"]))(cls)
        stats[f"specificity_{cls}"] = (lambda c: lambda s: r(s[f"{c}_correct"], s[f"{c}_n_pred"], s[f"{c}_n_truth"]))(cls)
    for key in ("fpr", "fnr", "tpr"):
        stats[f"patient_{key}"] = (lambda k: lambda s: M.patient_rates(s["patient_tp"], s["patient_fn"], s["patient_fp"], s["patient_tn"])[k])(key)
    return stats


def _pixel_block(pc: M.PixelCounts) -> dict:
    return {"dice": _round(pc.dice), "precision": _round(pc.precision), "recall": _round(pc.recall), "tp": pc.tp, "fp": pc.fp, "fn": pc.fn}


def summarize(ev: Evaluation) -> dict:
    """Every pooled figure of the report as plain JSON-able values (None = undefined)."""
    s = ev.settings
    results = ev.results
    per_case = [r.counts() for r in results]
    columns = list(per_case[0]) if per_case else []
    counts = np.array([[c[k] for k in columns] for c in per_case], float).reshape(len(results), len(columns))
    sums = {c: float(counts[:, i].sum()) for i, c in enumerate(columns)}
    stats = _statistics(s)
    value = {name: M.none_if_nan(f(sums)) for name, f in stats.items()} if results else {}

    out: dict = {
        "settings": {
            "connectivity": s.connectivity,
            "lesions": "label ids" if s.use_label_ids else "connected components",
            "overlap_fraction": s.overlap_fraction,
            "distance_mm": s.distance_mm,
            "threshold_for_probability_only": s.threshold,
            "keep_p": s.keep_p,
            "bootstrap_resamples": s.n_bootstrap,
            "bootstrap_seed": s.seed,
            "confidence": s.confidence,
            "pixel_roc_bins": M.PIXEL_ROC_BINS,
        },
        "regions": {
            "compared": int(sums.get("region_compared", 0)),
            "region_agreement": (sums["region_agree"] / sums["region_compared"]) if sums.get("region_compared") else None,
            "side_agreement": (sums["side_agree"] / sums["region_compared"]) if sums.get("region_compared") else None,
            "note": "detected true lesions whose MARS region is known on both sides; the generator's anatomy comes from "
                    "the same template as the atlas, so agreement here is necessary, not sufficient",
        },
        "cases": {
            "evaluated": len(results),
            "failed": len(ev.errors),
            "controls": sum(r.control for r in results),
            "with_lesions": sum(r.table.n_truth > 0 for r in results),
            "with_probability": sum(r.has_probability for r in results),
            "errors": [{"case": e.case, "problem": e.problem} for e in ev.errors],
        },
        # Per-case counts (overlap rule's lesions) against the truth's: agreement of the burden.
        "count_icc": _round(count_icc([r.table.n_truth for r in results], [r.table.n_pred for r in results]) or float("nan"), 4)
        if results else None,
    }
    if not results:
        out.update(pixel=None, lesion=None, patient=None, table3=None, confidence_intervals={})
        return out

    pooled = M.PixelCounts(int(sums["pixel_tp"]), int(sums["pixel_fp"]), int(sums["pixel_fn"]))
    positive_cases = int(sums["positive_cases"])
    out["pixel"] = {
        "pooled": _pixel_block(pooled),
        "mean_over_cases": {
            "dice": value["mean_case_dice"],
            "dice_cases_with_lesions": _round(sums["positive_case_dice"] / positive_cases) if positive_cases else None,
        },
        "roc": _pixel_roc(ev),
    }

    rules = {}
    for rule in M.RULES:
        rules[rule] = {
            "label": s.rule_label(rule),
            "n_truth": int(sums[f"{rule}_n_truth"]),
            "n_pred": int(sums[f"{rule}_n_pred"]),
            "tp_truth": int(sums[f"{rule}_tp_truth"]),
            "tp_pred": int(sums[f"{rule}_tp_pred"]),
            "fn": int(sums[f"{rule}_n_truth"] - sums[f"{rule}_tp_truth"]),
            "fp": int(sums[f"{rule}_n_pred"] - sums[f"{rule}_tp_pred"]),
            "precision": value[f"{rule}_precision"],
            "recall": value[f"{rule}_recall"],
            "f1": value[f"{rule}_f1"],
            "fp_per_scan": value[f"{rule}_fp_per_scan"],
        }
    by_size = {}
    for cls in M.SIZE_CLASSES:
        by_size[cls] = {
            "n_truth": int(sums[f"{cls}_n_truth"]),
            "detected": int(sums[f"{cls}_detected"]),
            "sensitivity": value[f"sensitivity_{cls}"],
            "n_pred": int(sums[f"{cls}_n_pred"]),
            "correct": int(sums[f"{cls}_correct"]),
            "specificity": value[f"specificity_{cls}"],
        }
    lesion_roc, candidates = _lesion_roc(ev)
    out["lesion"] = {
        "rules": rules,
        "by_size": by_size,
        "truth_outside_2_10mm": int(sum(r.table.truth_outside_size_range.sum() for r in results)),
        "count_difference": {
            "mean": _round(sums["count_difference"] / len(results)),
            "mean_absolute": _round(sums["abs_count_difference"] / len(results)),
        },
        "roc": lesion_roc,
        "froc": _froc(ev),
        # Only with the synthetic engine's mimic maps (TRUTH/mimics): None otherwise.
        "false_positives_by_mimic": {place: int(sums[f"fp_on_{place}"]) for place in FP_PLACES}
        if sums["cases_with_mimic_map"] else None,
    }

    rates = M.patient_rates(sums["patient_tp"], sums["patient_fn"], sums["patient_fp"], sums["patient_tn"])
    out["patient"] = {
        "tp": int(sums["patient_tp"]),
        "fn": int(sums["patient_fn"]),
        "fp": int(sums["patient_fp"]),
        "tn": int(sums["patient_tn"]),
        **{k: _round(v) for k, v in rates.items()},
        "controls": int(sums["controls"]),
        "controls_with_false_positive": int(sums["controls_with_fp"]),
        "controls_with_false_positive_cases": [r.case for r in results if r.control and r.table.n_pred > 0],
    }

    table3 = {}
    for cls in M.SIZE_CLASSES:
        pc = M.PixelCounts(int(sums[f"pixel_tp_{cls}"]), int(sums[f"pixel_fp_{cls}"]), int(sums[f"pixel_fn_{cls}"]))
        table3[cls] = {**_pixel_block(pc), "sensitivity": value[f"sensitivity_{cls}"], "specificity": value[f"specificity_{cls}"]}
    table3["average"] = {**_pixel_block(pooled), "sensitivity": value["overlap_recall"], "specificity": value["overlap_precision"]}
    out["table3"] = table3

    out["confidence_intervals"] = _intervals(ev, columns, counts, stats, candidates)
    out["per_case"] = [r.row() for r in results]
    return out


def _pixel_roc(ev: Evaluation) -> dict | None:
    if ev.histogram is None:
        return None
    curve = ev.histogram.roc()
    fpr, tpr = M.thin_curve(curve.fpr, curve.tpr) if curve.auc is not None else (curve.fpr, curve.tpr)
    return {
        "auc": _round(curve.auc),
        "auc_binning_error_bound": ev.histogram.auc_error_bound(),
        "cases": ev.n_pixel_roc_cases,
        "lesion_voxels": int(curve.n_positive),
        "background_voxels": int(curve.n_negative),
        "fpr": M.as_float_list(fpr, 9),
        "tpr": M.as_float_list(tpr, 9),
    }


def _lesion_roc(ev: Evaluation) -> tuple[dict | None, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    scores, labels, case_index = [], [], []
    for i, r in enumerate(ev.results):
        if r.has_probability:
            sc, lb = M.lesion_candidates(r.table, r.paper)
            scores.append(sc)
            labels.append(lb)
            case_index.append(np.full(sc.size, i))
    if not scores:
        return None, None
    sc, lb, ci = np.concatenate(scores), np.concatenate(labels), np.concatenate(case_index)
    curve = M.roc_curve(sc, lb)
    fpr, tpr = M.thin_curve(curve.fpr, curve.tpr, 2000, log_x=False)
    return {
        "auc": _round(curve.auc),
        "cases": len(scores),
        "candidates": int(sc.size),
        "positive": int(lb.sum()),
        "negative": int((~lb).sum()),
        "fpr": M.as_float_list(fpr),
        "tpr": M.as_float_list(tpr),
    }, (sc, lb, ci)


def _froc(ev: Evaluation) -> dict | None:
    with_prob = [r for r in ev.results if r.has_probability]
    if not with_prob:
        return None
    s = ev.settings
    tables = [r.table for r in with_prob]
    scores = [r.table.pred_mean_probability for r in with_prob]
    out = {"cases": len(with_prob), "fp_points": list(M.FROC_FP_POINTS), "rules": {}}
    for rule in M.RULES:
        curve = M.froc_curve(tables, scores, rule, s.overlap_fraction, s.distance_mm)
        at = {f"{x:g}": _round(curve.sensitivity_at(x)) for x in M.FROC_FP_POINTS}
        reached = [v for v in at.values() if v is not None]
        out["rules"][rule] = {
            "fp_per_scan": M.as_float_list(curve.fp_per_scan),
            "sensitivity": M.as_float_list(curve.sensitivity),
            "thresholds": M.as_float_list(curve.thresholds),
            "sensitivity_at_fp_per_scan": at,
            # The usual FROC score (mean sensitivity at 1/8..8 FP per scan), only when the
            # curve reaches every point; a partial mean would flatter a strict detector.
            "mean_sensitivity": _round(float(np.mean(reached))) if len(reached) == len(at) else None,
        }
    return out


def _count_icc_interval(ev: Evaluation, weights: np.ndarray) -> M.Interval:
    """Bootstrap interval of the per-case count ICC: each resample repeats a case as often as
    it was drawn, as for every other figure."""
    truth = np.array([r.table.n_truth for r in ev.results], float)
    pred = np.array([r.table.n_pred for r in ev.results], float)
    values = [count_icc(np.repeat(truth, w), np.repeat(pred, w)) for w in weights]
    values = np.array([np.nan if v is None else v for v in values], float)
    return M.percentile_interval(values, count_icc(truth, pred), ev.settings.confidence)


def _intervals(ev: Evaluation, columns, counts, stats, candidates) -> dict:
    s = ev.settings
    if s.n_bootstrap <= 0:
        return {}
    weights = M.bootstrap_weights(len(ev.results), s.n_bootstrap, s.seed)
    intervals = M.bootstrap_counts(counts, stats, columns, weights, s.confidence)
    out = {name: iv.as_dict() for name, iv in intervals.items()}
    if candidates is not None:
        sc, lb, ci = candidates
        values = M.grouped_auc_many(sc, lb, ci, weights)
        out["lesion_auc"] = M.percentile_interval(values, M.roc_auc(sc, lb), s.confidence).as_dict()
    out["count_icc"] = _count_icc_interval(ev, weights).as_dict()
    for v in out.values():
        for key in ("estimate", "low", "high"):
            v[key] = _round(v[key])
    out["_method"] = {
        "kind": "percentile bootstrap over cases",
        "resamples": s.n_bootstrap,
        "seed": s.seed,
        "level": s.confidence,
        "note": "each resample draws the evaluated cases with replacement and recomputes the pooled figure; resamples in which a figure is undefined are left out (n_valid)",
    }
    return out
