"""Candidates: the detector's lesions plus reader-added ones, matched across readers by location.

Within a case, every detector lesion is a candidate of its own (the detector's lesions are
distinct by construction). Reader-added lesions are then taken in the order they were stored:
each joins the nearest candidate whose centroid lies within the study's match radius (mm, in
RAS) and which holds nothing yet from that reader; otherwise it starts a new candidate. The
candidate's position is that of its first member. The rule is deterministic (same store, same
candidates) and one reader contributes at most one lesion to a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DETECTOR = "detector"


@dataclass
class Candidate:
    case_id: int
    ras: tuple[float, float, float]
    detector_lesion: int | None = None  # lesion id of the detector's member, if any
    added: dict[int, int] = field(default_factory=dict)  # reader id -> lesion id they added

    @property
    def lesion_ids(self) -> list[int]:
        return ([self.detector_lesion] if self.detector_lesion is not None else []) + list(self.added.values())


def match_candidates(lesions, radius_mm: float) -> list[Candidate]:
    """`lesions`: StoredLesion-like objects (id, case_id, source, added_by, ras), any order."""
    if radius_mm < 0:
        raise ValueError(f"match radius must be >= 0 mm, not {radius_mm}")
    candidates: list[Candidate] = []
    by_case: dict[int, list[Candidate]] = {}
    for l in sorted(lesions, key=lambda l: (l.case_id, l.source != "detector", l.id)):
        pool = by_case.setdefault(l.case_id, [])
        if l.source == "detector":
            c = Candidate(l.case_id, tuple(l.ras), detector_lesion=l.id)
        else:
            free = [c for c in pool if l.added_by not in c.added]
            c = None
            if free:
                d = [float(np.linalg.norm(np.subtract(c.ras, l.ras))) for c in free]
                best = int(np.argmin(d))
                if d[best] <= radius_mm:
                    c = free[best]
            if c is None:
                c = Candidate(l.case_id, tuple(l.ras))
            else:
                c.added[l.added_by] = l.id
                continue
            c.added[l.added_by] = l.id
        pool.append(c)
        candidates.append(c)
    return candidates
