"""Lesions of two time points in one space: matched, new, persisting, resolved.

A follow-up lesion with no baseline lesion near it is new only when the baseline shows nothing
there either, the way a reader judges: the baseline's own P(microbleed) at that place (a
candidate the count point turned down) or a dark spot in its image makes it persisting,
seen at baseline below the count point. A baseline lesion with no follow-up lesion near it is
resolved; microbleeds rarely resolve, so that is usually a miss at one of the two time points.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..io import Volume

MATCH_MM = 3.0  # the least distance two detections of one bleed may lie apart (registration, centroid noise)
# A spot darker than this fraction of its surroundings' median (the local white-matter level)
# is a dark spot. Tissue around a bleed is about uniform on SWI; the bleed is far darker.
DARK_FRACTION = 0.5
SURROUND_MM = 8.0  # half-width of the box whose median is the local tissue level

NEW, PERSISTING, RESOLVED = "new", "persisting", "resolved"
# A lesion where the other scan has no image: neither new nor resolved, and never graded.
NOT_COMPARED = "not_compared"
OUTSIDE_BASELINE = "outside the baseline's field of view"
OUTSIDE_FOLLOWUP = "outside the follow-up's field of view"
MATCHED = "matched at baseline"
BELOW_COUNT = "seen at baseline below the count point"
DARK_AT_BASELINE = "seen at baseline below the count point (dark spot)"
MISSED = "not detected at follow-up (usually a miss at one time point)"


@dataclass
class Spot:
    """One detected lesion: where (LPS mm, in the space it is compared in), its size and P."""

    lps: np.ndarray
    diameter_mm: float
    p_microbleed: float | None
    # MARS region, structure and side from its scan's lesion CSV; "" where that scan had none.
    location: tuple[str, str, str] = ("", "", "")


@dataclass
class Change:
    status: str
    evidence: str
    lps: np.ndarray  # in the follow-up's space
    diameter_mm: float
    p_microbleed: float | None
    location: tuple[str, str, str] = ("", "", "")  # the follow-up's; for a resolved lesion, the baseline's


def match_radius(a: Spot, b: Spot) -> float:
    return max(MATCH_MM, a.diameter_mm / 2, b.diameter_mm / 2)


def pair_lesions(baseline: list[Spot], followup: list[Spot]) -> list[tuple[int, int]]:
    """(baseline index, follow-up index) pairs, nearest first, each lesion used once, each pair
    within its match radius. `baseline` positions must already be in the follow-up's space."""
    return nearest_first(
        (float(np.linalg.norm(b.lps - f.lps)), i, j)
        for i, b in enumerate(baseline) for j, f in enumerate(followup)
        if np.linalg.norm(b.lps - f.lps) <= match_radius(b, f)
    )  # fmt: skip


def nearest_first(candidates: Iterable[tuple[float, int, int]]) -> list[tuple[int, int]]:
    """(i, j) pairs from (distance, i, j) candidates, nearest first, each i and each j used once."""
    used_i: set[int] = set()
    used_j: set[int] = set()
    pairs = []
    for _, i, j in sorted(candidates):
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            pairs.append((i, j))
    return pairs


def in_view(volume: Volume, lps: np.ndarray) -> bool:
    """Whether an LPS point lies inside the volume's grid (within half a voxel of its edge)."""
    ijk = np.linalg.solve(volume.geometry.ijk_to_lps(), np.append(lps, 1.0))[:3]
    return bool(np.all(ijk >= -0.5) and np.all(ijk <= np.asarray(volume.array.shape[::-1]) - 0.5))


def _ball(volume: Volume, lps: np.ndarray, radius_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """The box of voxels around an LPS point, and the mask of those within `radius_mm` of it."""
    g = volume.geometry
    ijk = np.linalg.solve(g.ijk_to_lps(), np.append(lps, 1.0))[:3]
    half = np.ceil(radius_mm / np.asarray(g.spacing)).astype(int)
    shape_ijk = volume.array.shape[::-1]
    lo = np.clip(np.floor(ijk).astype(int) - half, 0, np.asarray(shape_ijk) - 1)
    hi = np.clip(np.ceil(ijk).astype(int) + half + 1, 1, shape_ijk)
    if np.any(hi <= lo) or np.any(ijk < -0.5) or np.any(ijk > np.asarray(shape_ijk) - 0.5):
        return (slice(0, 0),) * 3, np.zeros((0, 0, 0), bool)  # outside the baseline's field of view
    kk, jj, ii = np.mgrid[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
    points = g.index_to_lps(np.stack([ii, jj, kk], axis=-1))
    inside = np.linalg.norm(points - lps, axis=-1) <= radius_mm
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])), inside


def baseline_evidence(image: Volume, probability: np.ndarray, lps: np.ndarray, radius_mm: float, review_cut: float) -> str:
    """What the baseline shows at `lps` (its own space): BELOW_COUNT when its P(microbleed)
    map reaches the review point's cut there, DARK_AT_BASELINE when its image has a spot far
    darker than the tissue around it, else ''."""
    box, ball = _ball(image, lps, radius_mm)
    if not ball.any():
        return ""
    if float(probability[box][ball].max()) >= review_cut:
        return BELOW_COUNT
    surround_box, surround = _ball(image, lps, SURROUND_MM)
    level = float(np.median(image.array[surround_box][surround]))
    if level > 0 and float(image.array[box][ball].min()) < DARK_FRACTION * level:
        return DARK_AT_BASELINE
    return ""
