"""The anatomy stage: each lesion's MARS region, structure and side, and the case's counts.

Registration (register.py) takes a lesion centroid (LPS mm) into the template, where the atlas
(atlas.py) names its location. When the registration fails QC every lesion is `unknown`, and
the counts say so: a wrong region is worse than none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..io import Volume
from .atlas import MARS_REGIONS, SIDES, UNKNOWN, UNKNOWN_LOCATION, Location, load_atlas
from .register import TemplateRegistration, register_to_template

# The pattern a clinician reads from the supratentorial counts (Boston criteria v2.0 and MARS
# speak of strictly lobar, strictly deep and mixed); infratentorial bleeds are counted apart.
PATTERNS = ("none", "strictly_lobar", "strictly_deep", "mixed")


@dataclass
class AnatomyResult:
    locations: list[Location]  # one per lesion, in the order given
    registration: TemplateRegistration
    atlas_version: str

    @property
    def ok(self) -> bool:
        return self.registration is not None and self.registration.ok


def locate_lesions(volume: Volume, centroids_lps: Sequence[Sequence[float]], registration: TemplateRegistration | None = None) -> AnatomyResult:
    """Register `volume` to the template (unless `registration` is given) and locate each
    centroid. RuntimeError only when the shipped atlas cannot be read."""
    atlas = load_atlas()
    registration = registration or register_to_template(volume, atlas)
    points = np.reshape(np.asarray(centroids_lps, float), (-1, 3))
    if not registration.ok or not len(points):
        return AnatomyResult([UNKNOWN_LOCATION] * len(points), registration, atlas.version)
    return AnatomyResult(atlas.locate(registration.to_template(points)), registration, atlas.version)


def location_counts(locations: Sequence[Location]) -> dict[str, object]:
    """Counts per MARS category and side, and the pattern (counts only, never a diagnosis)."""
    regions = {r: sum(l.mars_region == r for l in locations) for r in (*MARS_REGIONS, UNKNOWN)}
    sides = {s: sum(l.side == s for l in locations) for s in (*SIDES, UNKNOWN)}
    by_region_side = {f"{r}_{s}": sum(l.mars_region == r and l.side == s for l in locations) for r in MARS_REGIONS for s in SIDES}
    lobar, deep = regions["lobar"], regions["deep"]
    pattern = "none" if not lobar and not deep else ("mixed" if lobar and deep else ("strictly_lobar" if lobar else "strictly_deep"))
    return {
        "n_lobar": lobar, "n_deep": deep, "n_infratentorial": regions["infratentorial"], "n_region_unknown": regions[UNKNOWN],
        "n_left": sides["left"], "n_right": sides["right"], "n_midline": sides["midline"],
        "by_region_and_side": by_region_side,
        # Over supratentorial bleeds whose region is known: a case with unknown regions has none.
        "pattern": pattern if not regions[UNKNOWN] else UNKNOWN,
    }  # fmt: skip


def locations_from_summary(regions: object, centroids_lps: Sequence[Sequence[float]]) -> list[Location] | None:
    """Locations of lesions re-extracted after the run (the Slicer module, the live threshold),
    through the transform the run's summary keeps (`regions.to_template`); every lesion unknown
    when that registration failed QC; None when the run had no regions (--no-regions)."""
    if not isinstance(regions, dict):
        return None
    points = np.reshape(np.asarray(centroids_lps, float), (-1, 3))
    matrix = regions.get("to_template")
    passed = isinstance(regions.get("registration"), dict) and regions["registration"].get("passed")
    if not passed or matrix is None or not len(points):
        return [UNKNOWN_LOCATION] * len(points)
    m = np.asarray(matrix, float)
    return load_atlas().locate(points @ m[:3, :3].T + m[:3, 3])


def with_counts(regions: dict, locations: Sequence[Location]) -> dict[str, object]:
    """A run's regions block with its counts and pattern recomputed for other lesions."""
    return {**regions, **location_counts(locations)}
