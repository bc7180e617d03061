"""One baseline and one follow-up, or a cohort of pairs: detect each scan (the library's batch
path, so each scan's outputs are those `detect` writes, and a scan done before is not redone),
register the follow-up to the baseline, match, grade, write `<case>_changes.csv` and
`<case>_summary.json` (the summary last: a pair is complete or absent)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..cohort.names import printable, unsafe_name_reason
from ..errors import CaseError, InputError
from ..io import atomic_path, case_name, read_volume
from ..registration.rigid import MIN_CORRELATION, RigidResult, register_rigid
from .grade import aria_h_grade
from .matching import (
    MATCHED,
    MISSED,
    NEW,
    NOT_COMPARED,
    OUTSIDE_BASELINE,
    OUTSIDE_FOLLOWUP,
    PERSISTING,
    RESOLVED,
    Change,
    Spot,
    baseline_evidence,
    in_view,
    match_radius,
    pair_lesions,
)  # fmt: skip

CHANGE_COLUMNS = [
    "status", "evidence", "centroid_r", "centroid_a", "centroid_s", "centroid_l", "centroid_p", "centroid_s_lps",
    "diameter_mm", "p_microbleed",
    # MARS location from the follow-up's lesion CSV (a resolved lesion: the baseline's); empty when not located.
    "mars_region", "mars_structure", "side",
]  # fmt: skip

NOTES = [
    "superficial siderosis is not assessed: the ARIA-H grade here counts new microbleeds only",
    "a resolved microbleed is usually a miss at one of the two time points, not a bleed that went away",
    "research software: not for clinical use, never a treatment decision",
]


# progress(stage, fraction of the pair, message), one of STAGES: the Slicer module's worker shows it.
Progress = Callable[[str, float, str], None]
STAGES = ("baseline-detection", "followup-detection", "registration", "matching")
DETECTION_SHARE = 0.45  # of a pair's time, each scan's detection (registration and matching take the rest)


def _quiet(stage: str, fraction: float, message: str) -> None:
    pass


class NotRegistered(CaseError):
    """The follow-up does not register to the baseline: the pair is refused, not graded."""


@dataclass
class Pair:
    baseline: Path
    followup: Path
    case: str  # the follow-up's case name: the outputs' prefix
    problem: str = ""  # why the pairs list's row cannot run (an empty cell, a case named twice)


@dataclass
class PairOutcome:
    case: str
    ok: bool
    status: str  # "done", "skipped" (same parameters done before), "refused" (cannot register) or "failed"
    error: str = ""
    summary: dict = field(default_factory=dict)


@dataclass
class LongitudinalParams:
    model: str | None = None
    candidate_model: str | None = None
    operating_point: str = "count"  # what is counted; the review point's cut is the evidence of "seen at baseline"
    min_correlation: float = MIN_CORRELATION
    device: str = "auto"
    regions: bool = True  # each scan's MARS locations (anatomy/); off for speed runs


def read_pairs_csv(path: Path) -> list[Pair]:
    """Pairs from a CSV with `baseline`, `followup` and (optional) `case` columns; relative paths
    are relative to the CSV. Raises InputError when the list cannot be used at all."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the pairs list {path}: {exc}") from None
    missing = [c for c in ("baseline", "followup") if c not in columns]
    if missing:
        raise InputError(f"pairs list {path} needs the columns baseline and followup (missing: {', '.join(missing)})")
    if not rows:
        raise InputError(f"pairs list {path} has no rows below its header")
    pairs: list[Pair] = []
    rows_of: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):  # row 1 is the header, as a spreadsheet counts
        cells = {k: (row.get(k) or "").strip() for k in ("baseline", "followup")}
        b, f = (Path(cells[k]) for k in ("baseline", "followup"))
        b, f = (p if p.is_absolute() else path.parent / p for p in (b, f))
        case = (row.get("case") or "").strip() or (case_name(f) if cells["followup"] else f"row {number}")
        empty = [k for k, v in cells.items() if not v]
        problem = ""
        if empty:  # Path("") is the list's own folder: it would be read as a DICOM series
            problem = f"row {number} of {path.name}: the {' and '.join(empty)} cell is empty"
        elif case in rows_of:  # the second would overwrite the first's results
            problem = f"row {number} of {path.name}: case {case} is also row {rows_of[case]}'s; give each pair its own case"
        else:
            rows_of[case] = number
        pairs.append(Pair(b, f, case, problem))
    return pairs


def _parameters(pair: Pair, params: LongitudinalParams) -> dict:
    return {
        "baseline": str(pair.baseline.absolute()), "followup": str(pair.followup.absolute()),
        **{k: v for k, v in asdict(params).items() if k != "device"}, "cmbdetect_version": __version__,
    }  # fmt: skip


def _spots(lesions_csv: Path) -> list[Spot]:
    with open(lesions_csv, newline="") as f:
        return [
            Spot(np.array([float(r["centroid_l"]), float(r["centroid_p"]), float(r["centroid_s_lps"])]), float(r["diameter_mm"]),
                 float(r["p_microbleed"]) if r.get("p_microbleed") else None,
                 (r.get("mars_region") or "", r.get("mars_structure") or "", r.get("side") or ""))
            for r in csv.DictReader(f)
        ]  # fmt: skip


def _review_cut(detection_params, summary: dict) -> float:
    """The review point's cut on P(microbleed), from the classifier's card; the counted cut when
    the card has no review point (or the pipeline has one stage)."""
    from ..detection.inference import select_device
    from ..detection.pipeline import get_model, stage_two_classifier

    classifier = stage_two_classifier(detection_params, get_model(detection_params.model, select_device("cpu")))
    if classifier is not None and "review" in classifier.card.get("operating_points", {}):
        return classifier.keep_at("review", phase_used=False)
    return float(summary["threshold"])


class Detected:
    """Each scan detected once, whatever the number of pairs it is in, under a name of its own.

    A scan's outputs are named by its case name, as `detect` names them; a cohort laid out as
    sub-01/m0.nii.gz, sub-02/m0.nii.gz gives every baseline one name, and detect's resume,
    which knows the model but not the input, would serve the first subject's lesions for
    every other. So each name is claimed by one scan (OUT/scans.json, kept across runs) and a
    second scan of that name gets the name with a short hash of its path."""

    def __init__(self, out: Path, params: LongitudinalParams) -> None:
        from ..detection.pipeline import DetectionParams

        self.out = out
        self.detection = DetectionParams(model=params.model, candidate_model=params.candidate_model,
                                         operating_point=params.operating_point, device=params.device, regions=params.regions)  # fmt: skip
        self.claims_path = out / "scans.json"
        try:
            self.claims: dict[str, dict[str, str]] = json.loads(self.claims_path.read_text())
        except (OSError, ValueError):
            self.claims = {}
        self.done: set[tuple[str, str]] = set()  # (role, case) detected in this run

    def name(self, role: str, path: Path) -> str:
        source = str(path.absolute())
        claims = self.claims.setdefault(role, {})
        for case, claimed in claims.items():
            if claimed == source:
                return case
        case = case_name(path)
        if case in claims:
            case = f"{case}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
        return case

    def __call__(self, role: str, path: Path, pair_case: str, progress: Callable[[float, str], None] | None = None) -> str:
        from ..cohort.batch import detect_batch

        case = self.name(role, path)
        if (role, case) in self.done:
            return case
        with tempfile.TemporaryDirectory() as folder:
            listing = Path(folder) / "cases.csv"
            with open(listing, "w", newline="") as f:
                csv.writer(f).writerows([["image", "case"], [str(path.absolute()), case]])
            outcomes = detect_batch([listing], self.out / role, self.detection, show_progress=False, log=io.StringIO(),
                                    progress=(lambda _case, f, m: progress(f, m)) if progress else None)  # fmt: skip
        if not outcomes or not outcomes[0].ok:
            raise CaseError(pair_case, f"{role} {path}: detection failed: {outcomes[0].error if outcomes else 'no case found'}")
        self.claims[role][case] = str(path.absolute())
        with atomic_path(self.claims_path) as tmp:
            tmp.write_text(json.dumps(self.claims, indent=2) + "\n")
        self.done.add((role, case))
        return case


def _earlier(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def compare_pair(pair: Pair, out: Path, params: LongitudinalParams, detected: Detected, force: bool = False,
                 progress: Progress | None = None) -> tuple[dict, bool]:  # fmt: skip
    """Everything for one pair; returns its summary, and whether it was done before with the
    same parameters and the same detections (then nothing is redone unless `force`). Raises
    CaseError (naming the pair) when a scan cannot be read or detected, or the follow-up does
    not register to the baseline."""
    say = progress or _quiet
    started = time.perf_counter()
    share = DETECTION_SHARE
    say(STAGES[0], 0.0, "detecting the baseline")
    base_case = detected("baseline", pair.baseline, pair.case, lambda f, m: say(STAGES[0], share * f, f"baseline: {m}"))
    say(STAGES[1], share, "detecting the follow-up")
    follow_case = detected("followup", pair.followup, pair.case, lambda f, m: say(STAGES[1], share * (1 + f), f"follow-up: {m}"))
    base_dir, follow_dir = out / "baseline", out / "followup"
    base_summary = json.loads((base_dir / f"{base_case}_summary.json").read_text())
    follow_summary = json.loads((follow_dir / f"{follow_case}_summary.json").read_text())
    # The scans' detections enter the parameters: detect's resume redoes a scan whose model
    # changed (even at the same path), and then the pair must be redone too.
    parameters = {
        **_parameters(pair, params),
        "baseline_detection": base_summary.get("params_fingerprint"), "followup_detection": follow_summary.get("params_fingerprint"),
    }  # fmt: skip
    earlier = {} if force else _earlier(out / f"{pair.case}_summary.json")
    if earlier.get("parameters") == parameters:
        return earlier, True
    baseline, followup = (read_volume(pair.baseline, base_case), read_volume(pair.followup, follow_case))
    read = time.perf_counter()
    say(STAGES[2], 2 * share, "registering the follow-up to the baseline")
    try:
        reg: RigidResult = register_rigid(baseline, followup)
    except RuntimeError as exc:
        raise NotRegistered(pair.case, f"the follow-up {pair.followup} cannot be registered to the baseline {pair.baseline}: "
                                   f"{str(exc).strip().splitlines()[-1]}; not graded") from None  # fmt: skip
    if not reg.correlation >= params.min_correlation:
        raise NotRegistered(pair.case, f"the follow-up {pair.followup} does not register to the baseline {pair.baseline} "
                                   f"(correlation {reg.correlation:.2f} after rigid registration, below {params.min_correlation}): "
                                   "not the same head, or too different to compare; not graded")  # fmt: skip
    if not reg.pose_ok:
        raise NotRegistered(pair.case, f"the registration of the follow-up {pair.followup} to the baseline {pair.baseline} failed its "
                                   f"pose check, even after a restart: the scans' edges fit better after a "
                                   f"{reg.pose['better_neighbour']} (edge correlation {reg.pose['edge_correlation']:.2f} "
                                   f"+{reg.pose['better_by']:.2f}); not graded")  # fmt: skip
    registered = time.perf_counter()
    say(STAGES[3], 2 * share + 0.05, "matching the lesions of the two scans")
    base_spots, follow_spots = (_spots(base_dir / f"{base_case}_lesions.csv"), _spots(follow_dir / f"{follow_case}_lesions.csv"))
    mapped = [replace(s, lps=reg.to_moving(s.lps)[0]) for s in base_spots]
    matched = pair_lesions(mapped, follow_spots)
    review_cut = _review_cut(detected.detection, base_summary)
    probability = read_volume(base_dir / f"{base_case}_prob.nii.gz", base_case).array
    changes: list[Change] = []
    followed = {j for _, j in matched}
    for j, f in enumerate(follow_spots):
        if j in followed:
            changes.append(Change(PERSISTING, MATCHED, f.lps, f.diameter_mm, f.p_microbleed, f.location))
            continue
        at_baseline = reg.to_fixed(f.lps)[0]
        if not in_view(baseline, at_baseline):
            changes.append(Change(NOT_COMPARED, OUTSIDE_BASELINE, f.lps, f.diameter_mm, f.p_microbleed, f.location))
            continue
        evidence = baseline_evidence(baseline, probability, at_baseline, match_radius(f, f), review_cut)
        changes.append(Change(PERSISTING if evidence else NEW, evidence, f.lps, f.diameter_mm, f.p_microbleed, f.location))
    kept = {i for i, _ in matched}
    for i, s in enumerate(mapped):
        if i not in kept:
            seen = in_view(followup, s.lps)
            changes.append(Change(RESOLVED if seen else NOT_COMPARED, MISSED if seen else OUTSIDE_FOLLOWUP, s.lps, s.diameter_mm,
                                  s.p_microbleed, s.location))  # fmt: skip
    counts = {status: sum(c.status == status for c in changes) for status in (NEW, PERSISTING, RESOLVED, NOT_COMPARED)}
    summary = {
        "case": pair.case, "baseline": str(pair.baseline), "followup": str(pair.followup),
        "baseline_case": base_case, "followup_case": follow_case,
        "new_microbleeds": counts[NEW], "persisting": counts[PERSISTING], "resolved": counts[RESOLVED],
        "not_compared": counts[NOT_COMPARED],
        "persisting_seen_below_count_point": sum(c.status == PERSISTING and c.evidence not in ("", MATCHED) for c in changes),
        "aria_h": aria_h_grade(counts[NEW]),
        "aria_h_source": "ARIA-H radiographic severity, lecanemab/donanemab prescribing information: mild 1-4, moderate 5-9, severe >= 10 new microbleeds",
        "operating_point": params.operating_point, "review_cut": review_cut,
        "registration": {"method": "rigid (Euler 3D), Mattes mutual information, 4-2-1", **reg.qc(),
                         "min_correlation": params.min_correlation,
                         "matrix_4x4": [[round(float(v), 8) for v in row] for row in reg.matrix()],
                         "matrix_direction": "baseline LPS mm -> follow-up LPS mm"},
        "seconds": {"pair": round(time.perf_counter() - started, 2), "registration": round(registered - read, 2),
                    "detection_in_this_run": round(read - started, 2)},
        "notes": NOTES,
        "files": {"changes_csv": f"{pair.case}_changes.csv", "baseline": f"baseline/{base_case}_summary.json",
                  "followup": f"followup/{follow_case}_summary.json"},
        "parameters": parameters,
    }  # fmt: skip
    _write(out, pair.case, changes, summary)
    return summary, False


def _row(change: Change) -> dict:
    l_, p, s = (round(float(v), 3) for v in change.lps)
    return {
        "status": change.status, "evidence": change.evidence, "centroid_r": -l_, "centroid_a": -p, "centroid_s": s,
        "centroid_l": l_, "centroid_p": p, "centroid_s_lps": s, "diameter_mm": change.diameter_mm,
        "p_microbleed": "" if change.p_microbleed is None else change.p_microbleed,
        **dict(zip(("mars_region", "mars_structure", "side"), change.location)),
    }  # fmt: skip


def _write(out: Path, case: str, changes: list[Change], summary: dict) -> None:
    try:
        with atomic_path(out / f"{case}_changes.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CHANGE_COLUMNS)
            writer.writeheader()
            writer.writerows(_row(c) for c in changes)
        with atomic_path(out / f"{case}_summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        raise CaseError(case, f"cannot write its results in {out}: {exc.strerror or exc}") from None


def run_pairs(pairs: list[Pair], out: Path, params: LongitudinalParams | None = None, force: bool = False,
              on_pair: Callable[[PairOutcome], None] | None = None, progress: Progress | None = None) -> list[PairOutcome]:  # fmt: skip
    """Every pair, in order; a pair that fails is reported and the others go on. A pair whose
    summary exists with the same parameters and detections is skipped unless `force` (its
    scans' detections are redone only when their own parameters changed, as `detect` resumes).
    `progress` hears each pair's stages, from 0 to 1 for every pair."""
    params = params or LongitudinalParams()
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    detected = Detected(out, params)
    outcomes = []
    for pair in pairs:
        unsafe = unsafe_name_reason(pair.case)  # the case becomes file names in OUT: never outside it
        if unsafe:
            pair = replace(pair, case=printable(pair.case), problem=unsafe)
        if pair.problem:
            outcomes.append(PairOutcome(pair.case, False, "refused", error=f"{pair.case}: {pair.problem}"))
            if on_pair:
                on_pair(outcomes[-1])
            continue
        try:
            summary, skipped = compare_pair(pair, out, params, detected, force, progress)
            outcome = PairOutcome(pair.case, True, "skipped" if skipped else "done", summary=summary)
        except CaseError as exc:
            outcome = PairOutcome(pair.case, False, "refused" if isinstance(exc, NotRegistered) else "failed", error=str(exc))
        outcomes.append(outcome)
        if on_pair:
            on_pair(outcome)
    return outcomes
