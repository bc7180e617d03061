"""Mimics other than veins: calcifications and air-tissue edges.

Calcifications are dark on SWI magnitude like microbleeds, but diamagnetic: their phase has the
opposite sign (positive along B0 above and below them, in our convention), which is how
readers and phase-aware detectors tell them apart. We place them where physiological
calcification occurs: the pineal gland, the choroid plexus glomus in each atrium, and the
globus pallidus. Each is an ellipsoid of susceptibility -0.3 to -1.2 ppm (our estimate) with
little signal of its own (low proton density, short T2*), simulated by the same sub-voxel
dipole model as the bleeds.

Air-tissue edges need no separate object: the sinuses and mastoid air cells are part of the
susceptibility map (anatomy.AIR_CAVITIES, +9.4 ppm against tissue), so their field darkens the
orbitofrontal cortex, the temporal poles and the inferior temporal lobes through the voxel's
phase ramp, more at 3 T, at long TE and in thick slices, as on real scans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from .anatomy import AIR_CAVITIES, CALCIFICATION_SITES, ellipsoid_members
from .susceptibility import Source, SourcePatch, simulate_source
from .warp import Warp, mni_to_voxel

CALCIFICATION_DIAMETER_MM = {"pineal": (3.0, 8.0), "choroid_plexus": (3.0, 8.0), "basal_ganglia": (1.5, 4.0)}
CALCIFICATION_CHI_PPM = (-1.2, -0.3)


@dataclass
class Calcification:
    site: str
    centre_kji: np.ndarray
    centre_mni: np.ndarray
    source: Source
    patch: SourcePatch


def place_calcifications(
    warp: Warp,
    origin: np.ndarray,
    spacing_ijk: np.ndarray,
    shape_kji: tuple[int, int, int],
    field_strength_t: float,
    te_ms: float,
    rng: np.random.Generator,
) -> list[Calcification]:
    spacing_kji = tuple(float(s) for s in np.asarray(spacing_ijk)[::-1])
    out = []
    for site, centre, probability, paired in CALCIFICATION_SITES:
        for side in (1.0, -1.0) if paired else (1.0,):
            draws = rng.random(4)
            jitter = rng.normal(0.0, 1.5, 3)
            rotation = Rotation.from_quat(rng.normal(size=4)).as_matrix()
            if draws[0] >= probability:
                continue
            lo, hi = CALCIFICATION_DIAMETER_MM[site]
            diameter = lo + (hi - lo) * draws[1]
            ratios = np.array([1.0, 0.6 + 0.4 * draws[2], 0.6 + 0.4 * draws[3]])
            ratios /= np.cbrt(np.prod(ratios))
            chi = float(rng.uniform(*CALCIFICATION_CHI_PPM))
            mni = np.array(centre) * [side, 1.0, 1.0] + jitter
            kji = mni_to_voxel(warp, origin, spacing_ijk, mni[None])[0]
            if np.any(kji < 0) or np.any(kji > np.array(shape_kji) - 1):
                continue
            source = Source(tuple(float(v) for v in ratios * diameter / 2.0), rotation, chi, interior_signal=0.1)
            patch = simulate_source(source, kji, spacing_kji, field_strength_t, te_ms)
            out.append(Calcification(site, kji, mni, source, patch))
    return out


def air_cavities_in_view(
    warp: Warp, origin: np.ndarray, spacing_ijk: np.ndarray, shape_kji: tuple[int, int, int]
) -> list[dict[str, object]]:
    """The air cavities whose centre lies within 15 mm of the acquired slab."""
    out = []
    for cavity in AIR_CAVITIES:
        for centre, _ in ellipsoid_members(cavity):
            kji = mni_to_voxel(warp, origin, spacing_ijk, centre[None])[0]
            margin = 15.0 / float(spacing_ijk[2])
            if -margin <= kji[0] <= shape_kji[0] - 1 + margin:
                side = "" if not cavity.paired else ("_right" if centre[0] > 0 else "_left")
                out.append({"name": cavity.name + side, "centre_kji": [round(float(v), 2) for v in kji]})
    return out
