"""Scoring `cmbdetect longitudinal` on synthetic pairs (`cmbdetect evaluate-pairs`): new-bleed
sensitivity and false new bleeds per pair, ARIA-H grade agreement, registration error, seconds
per pair. The truth is `cmbdetect synth --pairs`' layout (pairs.csv, truth/<case>.json).

Matching: a call `new` in OUT/<case>_changes.csv is matched to the nearest true follow-up lesion
(new or persisting) whose centre lies within DISTANCE_MM, each lesion used once, nearest pairs
first (the centre rule of `cmbdetect evaluate`). A call on a true new bleed is a hit; on a
persisting bleed, or on nothing, a false new bleed. A pair that `longitudinal` refused (no
summary) counts as every new bleed missed and its grade wrong, and is listed; it enters no kappa.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..longitudinal.grade import GRADES
from ..longitudinal.matching import nearest_first
from .metrics import bootstrap_weights, percentile_interval

DISTANCE_MM = 5.0
KAPPA_WEIGHTS = "linear"
HEAD_POINTS = 200_000  # baseline head voxels sampled for the registration error
GRADE_NAMES = [name for name, _ in GRADES]


@dataclass
class PairScore:
    case: str
    graded: bool
    true_new: int
    hits: int = 0
    false_new: int = 0
    false_new_on_persisting: int = 0
    true_grade: str = ""
    grade: str = ""  # "" when not graded
    registration_mean_mm: float | None = None
    registration_max_mm: float | None = None
    seconds: float | None = None
    missed: list[list[float]] = field(default_factory=list)  # LPS of true new bleeds not called new

    def row(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "missed"} | {"missed_new_lps": self.missed}


def _lps(row: dict) -> np.ndarray:
    return np.array([float(row["centroid_l"]), float(row["centroid_p"]), float(row["centroid_s_lps"])])


def _match(calls: list[np.ndarray], truth: list[np.ndarray], max_mm: float) -> list[tuple[int, int]]:
    return nearest_first((float(np.linalg.norm(c - t)), i, j) for i, c in enumerate(calls) for j, t in enumerate(truth)
                         if np.linalg.norm(c - t) <= max_mm)  # fmt: skip


def head_points(baseline_image: Path) -> np.ndarray:
    """LPS points of the baseline's head (Otsu's threshold), at most HEAD_POINTS of them."""
    import SimpleITK as sitk

    from ..io import read_volume, to_sitk

    volume = read_volume(baseline_image)
    head = sitk.GetArrayFromImage(sitk.OtsuThreshold(to_sitk(volume.array.astype(np.float32), volume.geometry), 0, 1)).astype(bool)
    kji = np.argwhere(head)
    if len(kji) > HEAD_POINTS:
        kji = kji[np.random.default_rng(0).choice(len(kji), HEAD_POINTS, replace=False)]
    return volume.geometry.index_to_lps(kji[:, ::-1].astype(float))


def registration_error(found: np.ndarray, truth: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    """Mean and largest distance (mm) between where two 4x4 transforms take the points."""
    moved = points @ (found[:3, :3] - truth[:3, :3]).T + (found[:3, 3] - truth[:3, 3])
    d = np.linalg.norm(moved, axis=1)
    return float(d.mean()), float(d.max())


def score_pair(case: str, truth: dict, out: Path, truth_dir: Path, distance_mm: float = DISTANCE_MM) -> PairScore:
    new_truth = [x for x in truth["lesions"] if x["status"] == "new"]
    score = PairScore(case, False, len(new_truth), true_grade=truth["aria_h"])
    summary_path = out / f"{case}_summary.json"
    if not summary_path.is_file():
        score.missed = [list(map(float, x["centre_lps"])) for x in new_truth]
        return score
    summary = json.loads(summary_path.read_text())
    with open(out / summary["files"]["changes_csv"], newline="") as f:
        calls = [_lps(r) for r in csv.DictReader(f) if r["status"] == "new"]
    lesions = truth["lesions"]
    matched = _match(calls, [np.asarray(x["centre_lps"], float) for x in lesions], distance_mm)
    hit_truth = {j for _, j in matched if lesions[j]["status"] == "new"}
    score.graded = True
    score.grade = summary["aria_h"]
    score.hits = len(hit_truth)
    score.false_new_on_persisting = sum(1 for _, j in matched if lesions[j]["status"] != "new")
    score.false_new = len(calls) - score.hits
    score.missed = [list(map(float, x["centre_lps"])) for j, x in enumerate(lesions) if x["status"] == "new" and j not in hit_truth]
    found = summary.get("registration", {}).get("matrix_4x4")
    if found is not None:
        mean, largest = registration_error(np.asarray(found), np.asarray(truth["motion"]["matrix_4x4"]),
                                           head_points(truth_dir / truth["baseline"]))  # fmt: skip
        score.registration_mean_mm, score.registration_max_mm = round(mean, 3), round(largest, 3)
    seconds = summary.get("seconds", {}).get("pair")
    score.seconds = None if seconds is None else float(seconds)
    return score


def read_truth(truth_dir: Path) -> dict[str, dict]:
    listing = truth_dir / "pairs.csv"
    if not listing.is_file():
        raise InputError(f"{truth_dir} is not a pairs folder of `cmbdetect synth --pairs`: no pairs.csv")
    with open(listing, newline="") as f:
        cases = [r["case"] for r in csv.DictReader(f)]
    truths = {}
    for case in cases:
        path = truth_dir / "truth" / f"{case}.json"
        try:
            truths[case] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{case}: cannot read its truth {path}: {exc}") from None
    if not truths:
        raise InputError(f"{listing} lists no pairs")
    return truths


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.maximum(b, 1), np.nan)


def evaluate_pairs(out: str | Path, truth_dir: str | Path, n_bootstrap: int = 1000, seed: int = 0,
                   distance_mm: float = DISTANCE_MM) -> dict:  # fmt: skip
    """Every pair of the truth folder scored against `longitudinal`'s OUT; the summary dict."""
    from sklearn.metrics import cohen_kappa_score

    out, truth_dir = Path(out), Path(truth_dir)
    scores = [score_pair(case, truth, out, truth_dir, distance_mm) for case, truth in read_truth(truth_dir).items()]
    hits = np.array([s.hits for s in scores], float)
    true_new = np.array([s.true_new for s in scores], float)
    false_new = np.array([s.false_new for s in scores], float)
    graded = [s for s in scores if s.graded]
    interval: dict[str, object] = {}
    if n_bootstrap > 0:
        w = bootstrap_weights(len(scores), n_bootstrap, seed)
        interval = {
            "sensitivity": percentile_interval(_ratio(w @ hits, w @ true_new), None).as_dict(),
            "false_new_per_pair": percentile_interval((w @ false_new) / len(scores), None).as_dict(),
            "kind": f"percentile bootstrap over pairs, {n_bootstrap} resamples, seed {seed}, 95 %",
        }
    kappa = None
    if len(graded) >= 2:
        kappa = cohen_kappa_score([s.true_grade for s in graded], [s.grade for s in graded], labels=GRADE_NAMES, weights=KAPPA_WEIGHTS)
        kappa = None if not np.isfinite(kappa) else round(float(kappa), 4)
    registration = [s for s in graded if s.registration_mean_mm is not None]
    seconds = [s.seconds for s in graded if s.seconds is not None]
    sensitivity = float(hits.sum() / true_new.sum()) if true_new.sum() else None
    confusion = {t: {p: sum(1 for s in graded if s.true_grade == t and s.grade == p) for p in GRADE_NAMES} for t in GRADE_NAMES}
    return {
        "pairs": len(scores), "graded": len(graded), "not_graded": [s.case for s in scores if not s.graded],
        "new_bleeds": {"true": int(true_new.sum()), "found": int(hits.sum()),
                       "sensitivity": None if sensitivity is None else round(sensitivity, 4),
                       "false_new": int(false_new.sum()), "false_new_per_pair": round(float(false_new.mean()), 4),
                       "false_new_on_persisting_bleeds": int(sum(s.false_new_on_persisting for s in scores)),
                       "matching": f"centre rule: a call within {distance_mm:g} mm of a true lesion's centre, nearest first",
                       "intervals": interval},
        "grade": {"exact": round(sum(1 for s in graded if s.grade == s.true_grade) / len(scores), 4),
                  "exact_over": "all pairs (a pair not graded counts as wrong)",
                  "weighted_kappa": kappa, "kappa_weights": KAPPA_WEIGHTS,
                  "kappa_over": "graded pairs; scikit-learn cohen_kappa_score, grades ordered none < mild < moderate < severe",
                  "confusion_true_by_found": confusion},
        "registration_error_mm": None if not registration else {
            "mean": round(float(np.mean([s.registration_mean_mm for s in registration])), 3),
            "max": round(float(np.max([s.registration_max_mm for s in registration])), 3),
            "over": "the baseline's head (Otsu), distance between the estimated and the true transform; mean over pairs of "
                    "each pair's mean, and the largest of any pair"},
        "seconds_per_pair": None if not seconds else {
            "median": round(float(np.median(seconds)), 2), "mean": round(float(np.mean(seconds)), 2), "n": len(seconds),
            "note": "the pair's wall time in `longitudinal` (its scans' detection included when done in that run)"},
        "per_pair": [s.row() for s in scores],
    }  # fmt: skip


def summary_table(result: dict) -> str:
    nb, g = result["new_bleeds"], result["grade"]
    ci = nb["intervals"].get("sensitivity", {}) if nb["intervals"] else {}
    ci_text = f" (95% CI {ci['low']:.2f}-{ci['high']:.2f})" if ci.get("low") is not None else ""
    sens = "n/a" if nb["sensitivity"] is None else f"{nb['sensitivity']:.3f}"
    reg = result["registration_error_mm"]
    sec = result["seconds_per_pair"]
    lines = [
        f"pairs                      {result['pairs']} ({result['graded']} graded)",
        f"new-bleed sensitivity      {sens}{ci_text}  [{nb['found']}/{nb['true']}]",
        f"false new bleeds per pair  {nb['false_new_per_pair']:.2f}  [{nb['false_new']}, {nb['false_new_on_persisting_bleeds']} on persisting bleeds]",
        f"grade exact                {g['exact']:.3f}",
        f"grade kappa ({g['kappa_weights']})".ljust(27) + ("n/a" if g["weighted_kappa"] is None else f"{g['weighted_kappa']:.3f}"),
        "registration error (mm)    " + ("n/a" if reg is None else f"mean {reg['mean']:.2f}, max {reg['max']:.2f}"),
        "seconds per pair           " + ("n/a" if sec is None else f"median {sec['median']:.1f}"),
    ]
    if result["not_graded"]:
        lines.append(f"not graded                 {', '.join(result['not_graded'])}")
    return "\n".join(lines)
