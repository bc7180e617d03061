"""From the store's current view to every statistic of the report, as one plain dict.

Ratings. Each candidate (matching.py) gets, from each rater, 1 (a microbleed) or 0 (not one):
- the detector rates its own lesions 1 and reader-added candidates 0;
- a reader rates 1 a candidate holding a lesion they added, or a detector lesion they judged
  correct (definite or possible); 0 a detector lesion they judged incorrect, or another reader's
  added lesion they did not add themselves in a case they reviewed;
- a reader who has not reviewed the candidate (no verdict on that detector lesion, or the case
  not reviewed) gives no rating: the candidate is left out of the kappas needing that reader.
A reader has reviewed a case when they completed its reading, or judged every detector lesion
of it (and it has at least one).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from . import statistics as S
from .matching import Candidate, match_candidates
from .store import MIMIC_REASONS, Study


def _reviewed_cases(study: Study, reader_id: int, verdicts: dict, detector_by_case: dict[int, list[int]]) -> set[int]:
    done = study.completed_cases(reader_id)
    for case_id, ids in detector_by_case.items():
        if ids and all((reader_id, i) in verdicts for i in ids):
            done.add(case_id)
    return done


def ratings(study: Study) -> tuple[list[Candidate], dict[int, str], np.ndarray, np.ndarray, dict]:
    """Candidates, readers, detector ratings (n), reader ratings (n x m, NaN = not rated), context."""
    readers = study.readers()
    lesions = study.lesions()
    candidates = match_candidates(lesions, study.match_radius_mm)
    verdicts = {(v.reader_id, v.lesion_id): v for v in study.current_verdicts() if v.verdict != "withdrawn"}
    detector_by_case: dict[int, list[int]] = {c.id: [] for c in study.cases()}
    for l in lesions:
        if l.source == "detector":
            detector_by_case[l.case_id].append(l.id)
    reviewed = {r: _reviewed_cases(study, r, verdicts, detector_by_case) for r in readers}
    det = np.array([1 if c.detector_lesion is not None else 0 for c in candidates], int)
    rat = np.full((len(candidates), len(readers)), np.nan)
    for n, c in enumerate(candidates):
        for m, r in enumerate(readers):
            if r in c.added:
                rat[n, m] = 1
            elif c.detector_lesion is not None and (r, c.detector_lesion) in verdicts:
                rat[n, m] = 1 if verdicts[(r, c.detector_lesion)].verdict == "correct" else 0
            elif c.detector_lesion is None and c.case_id in reviewed[r]:
                rat[n, m] = 0
    context = {"verdicts": verdicts, "reviewed": reviewed, "detector_by_case": detector_by_case, "lesions": lesions}
    return candidates, readers, det, rat, context


def table4(study: Study, context: dict) -> dict[str, S.Table4Row]:
    verdicts, lesions = context["verdicts"], context["lesions"]
    detector_ids = [l.id for l in lesions if l.source == "detector"]
    rows = {}
    for r, name in study.readers().items():
        mine = [verdicts.get((r, i)) for i in detector_ids]
        added = [l for l in lesions if l.source == "reader" and l.added_by == r]
        added_possible = sum(verdicts.get((r, l.id)) is not None and verdicts[(r, l.id)].certainty == "possible" for l in added)
        rows[name] = S.Table4Row(
            correct=sum(v is not None and v.verdict == "correct" for v in mine),
            incorrect=sum(v is not None and v.verdict == "incorrect" for v in mine),
            missed=len(added),
            pending=sum(v is None for v in mine),
            possible=sum(v is not None and v.verdict == "correct" and v.certainty == "possible" for v in mine) + added_possible,
        )
    return rows


def analyse(study: Study, n_boot: int = S.FLEISS_BOOTSTRAP, seed: int = 0) -> dict:
    candidates, readers, det, rat, ctx = ratings(study)
    names = list(readers.values())
    cases = {c.id: c for c in study.cases()}
    t4 = table4(study, ctx)
    average = S.table4_average(list(t4.values()))

    reasons = {
        readers[r]: dict(Counter(v.reason for (rr, _), v in ctx["verdicts"].items() if rr == r and v.verdict == "incorrect"))
        for r in readers
    }
    for d in reasons.values():
        for reason in MIMIC_REASONS:
            d.setdefault(reason, 0)

    # Lesion level: over candidates; each figure says how many cases its candidates come from.
    case_of = np.array([c.case_id for c in candidates], int)
    n_cases = lambda ok: int(np.unique(case_of[ok]).size)  # noqa: E731
    vs_detector = {}
    for m, name in enumerate(names):
        ok = ~np.isnan(rat[:, m])
        vs_detector[name] = S.cohen(rat[ok, m].astype(int), det[ok], 2)
        # Candidates this reader and the detector both call "no": the agreed negatives this kappa has.
        vs_detector[name].update(cases=n_cases(ok), agreed_no=int(np.sum((det == 0) & (rat[:, m] == 0))))
    complete = ~np.isnan(rat).any(axis=1) if names else np.zeros(len(candidates), bool)
    fleiss_lesions = {**S.fleiss(rat[complete].astype(int), 2, n_boot, seed), "cases": n_cases(complete)}
    pairwise = {}
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            ok = ~np.isnan(rat[:, a]) & ~np.isnan(rat[:, b])
            pairwise[f"{names[a]} vs {names[b]}"] = {**S.cohen(rat[ok, a].astype(int), rat[ok, b].astype(int), 2), "cases": n_cases(ok)}

    # Case level: each rater's count per case, over the cases they reviewed.
    case_rows = []
    counts = np.full((len(cases), len(names)), np.nan)
    det_counts = np.zeros(len(cases), int)
    seconds = study.reading_seconds()
    for n, (cid, case) in enumerate(cases.items()):
        det_counts[n] = len(ctx["detector_by_case"][cid])
        row = {"case": case.name, "detector_lesions": int(det_counts[n]), "detector_seconds": case.detector_seconds, "readers": {}}
        for m, (r, name) in enumerate(readers.items()):
            in_case = [k for k, c in enumerate(candidates) if c.case_id == cid]
            mine = [ctx["verdicts"].get((r, i)) for i in ctx["detector_by_case"][cid]]
            reviewed = cid in ctx["reviewed"][r]
            positive = int(np.nansum(rat[in_case, m])) if in_case else 0
            if reviewed:
                counts[n, m] = positive
            row["readers"][name] = {
                "reviewed": reviewed,
                "correct": sum(v is not None and v.verdict == "correct" for v in mine),
                "incorrect": sum(v is not None and v.verdict == "incorrect" for v in mine),
                "missed": sum(1 for c in (candidates[k] for k in in_case) if r in c.added),
                "pending": sum(v is None for v in mine),
                "microbleeds": positive if reviewed else None,
                "category": S.COUNT_CATEGORIES[S.count_category(positive)] if reviewed else None,
                "seconds": seconds.get((cid, r)),
            }
        row["detector_category"] = S.COUNT_CATEGORIES[S.count_category(int(det_counts[n]))]
        case_rows.append(row)

    def case_agreement(transform, n_cat: int) -> dict:
        by_reader = {}
        for m, name in enumerate(names):
            ok = ~np.isnan(counts[:, m])
            by_reader[name] = {**S.cohen(transform(counts[ok, m]), transform(det_counts[ok]), n_cat), "cases": int(ok.sum())}
        complete_cases = ~np.isnan(counts).any(axis=1) if names else np.zeros(len(cases), bool)
        fleiss = S.fleiss(transform(counts[complete_cases]).reshape(int(complete_cases.sum()), len(names)), n_cat, n_boot, seed)
        return {"reader_vs_detector": by_reader, "fleiss_readers": {**fleiss, "cases": int(complete_cases.sum())}}

    presence = lambda x: (np.asarray(x) > 0).astype(int)  # noqa: E731
    category = lambda x: np.vectorize(S.count_category, otypes=[int])(np.asarray(x, int)) if np.size(x) else np.asarray(x, int)  # noqa: E731

    reading = {
        "detector": S.reading_time([c.detector_seconds for c in cases.values() if c.detector_seconds is not None]),
        "readers": {name: S.reading_time([s for (cid, rr), s in seconds.items() if rr == r]) for r, name in readers.items()},
    }
    reader_means = [v["mean_s"] for v in reading["readers"].values() if v["mean_s"] is not None]
    reading["readers_mean_s"] = float(np.mean(reader_means)) if reader_means else None
    if reading["readers_mean_s"] and reading["detector"]["mean_s"]:
        reading["reader_to_detector_ratio"] = reading["readers_mean_s"] / reading["detector"]["mean_s"]

    labels = {l.id: l.detector_label for l in ctx["lesions"] if l.source == "detector"}
    # The cases each Table 4 column rests on: those where the reader has a label counted there.
    case_of_lesion = {l.id: l.case_id for l in ctx["lesions"]}
    labelled = {
        name: {case_of_lesion[i] for (rr, i), v in ctx["verdicts"].items() if rr == r and i in case_of_lesion and v.verdict in ("correct", "incorrect")}
        for r, name in readers.items()
    }
    t4_cases = {name: len(c) for name, c in labelled.items()}
    if average:
        t4_cases["average"] = len(set().union(*labelled.values()))
    return {
        "study": study.summary(),
        "settings": {"match_radius_mm": study.match_radius_mm, "fleiss_bootstrap": n_boot, "seed": seed, "alpha": S.ALPHA},
        "readers": names,
        "table4": {k: {**v.as_dict(), "cases": t4_cases[k]} for k, v in [*t4.items(), *([("average", average)] if average else [])]},
        "incorrect_reasons": reasons,
        "lesion_agreement": {
            "candidates": len(candidates),
            "candidates_rated_by_all": int(complete.sum()),
            "reader_vs_detector": vs_detector,
            "fleiss_readers": fleiss_lesions,
            "pairwise_readers": pairwise,
            "mean_reader_vs_detector_kappa": _mean([v["kappa"] for v in vs_detector.values()]),
        },
        "case_agreement": {
            "presence": case_agreement(presence, 2),
            "count_category": {"categories": list(S.COUNT_CATEGORIES), **case_agreement(category, len(S.COUNT_CATEGORIES))},
        },
        "reading_time": reading,
        "cases": case_rows,
        "candidates": [
            {
                "case": cases[c.case_id].name,
                "ras": [round(v, 2) for v in c.ras],
                "detector_lesion": labels.get(c.detector_lesion),
                "detector": int(det[n]),
                "ratings": {name: (None if np.isnan(rat[n, m]) else int(rat[n, m])) for m, name in enumerate(names)},
            }
            for n, c in enumerate(candidates)
        ],
    }


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None
