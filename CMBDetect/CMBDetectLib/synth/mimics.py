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

from scipy import ndimage

from .anatomy import AIR_CAVITIES, CALCIFICATION_SITES, NUCLEI, ellipsoid_members
from .susceptibility import Source, SourcePatch, overlap_slices, simulate_source, visibility
from .warp import Warp, mni_to_voxel

# The mimic map (uint8 on the image grid): which mimic each voxel belongs to. Written by
# `cmbdetect synth` as mimics/<case>.nii.gz; the candidate stage labels its training
# candidates from it. Where mimics overlap, the higher-priority code wins (calcification over
# vein over nucleus over air edge); microbleed labels win over all of them (code 0 there).
MIMIC_CODES: dict[str, int] = {"vein": 1, "calcification": 2, "nucleus": 3, "air_edge": 4}
MIMIC_NAMES: dict[int, str] = {code: name for name, code in MIMIC_CODES.items()}
# A vein voxel darkens the SWI image visibly once about a fifth of it is venous blood (tissue
# and blood dephase in the vein's field: at 3 T, TE 20 ms the signal falls by about 40 %).
VEIN_FRACTION_MIN = 0.2
# Iron-rich nuclei: those at least 0.4 of the globus pallidus's iron (the thalamus, at 0.2,
# is not dark on SWI and is not marked).
NUCLEUS_IRON_MIN = 0.4
# A calcification's body: the voxels it leaves at most this fraction of their SWI signal
# (the microbleed label level), connected to its darkest voxel, plus the voxel at its centre.
CALCIFICATION_BODY_LEVEL = 0.6
# Air-tissue edge: the air cavities (air fraction >= 0.5), a band AIR_EDGE_MM wide around them,
# and further out, up to AIR_ARTEFACT_MM, wherever the cavities' field ramp has taken at least a
# fifth of the signal (the dark artefact at the orbitofrontal cortex and temporal poles); all
# inside the head. The cavities sit in 4 mm of bone, so the band alone seldom reaches the brain.
AIR_EDGE_MM = 5.0
AIR_ARTEFACT_MM = 25.0

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


def calcification_body(calc: Calcification, shape_kji: tuple[int, int, int], power: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """The calcification's body on the image grid: (volume slices, bool mask over them)."""
    vol_sl, patch_sl = overlap_slices(shape_kji, calc.patch.lo, calc.patch.factor.shape)
    vis = visibility(calc.patch.factor[patch_sl], power)
    body = np.zeros(vis.shape, bool)
    if vis.size == 0:
        return vol_sl, body
    dark = vis <= CALCIFICATION_BODY_LEVEL
    darkest = np.unravel_index(int(np.argmin(vis)), vis.shape)
    if dark[darkest]:
        parts, _ = ndimage.label(dark, structure=np.ones((3, 3, 3), bool))
        body |= parts == parts[darkest]
    centre = np.rint(calc.centre_kji).astype(int) - np.array([s.start for s in vol_sl])
    if np.all(centre >= 0) and np.all(centre < np.array(body.shape)):
        body[tuple(centre)] = True
    return vol_sl, body


def mimic_map(
    vein_fraction: np.ndarray,
    nucleus_index: np.ndarray,
    air: np.ndarray,
    head: np.ndarray,
    faded: np.ndarray,
    calcifications: list[Calcification],
    labels: np.ndarray,
    spacing_kji: tuple[float, float, float],
    power: float,
    nucleus_iron: dict[str, float] | None = None,
) -> np.ndarray:
    """Which mimic each voxel belongs to (MIMIC_CODES; 0 none), on the image grid.

    vein_fraction: venous blood fraction; nucleus_index: 0 or 1 + index into NUCLEI; air: the
    cavities' voxels; head: voxels inside the head; faded: where the smooth field's ramp has
    taken at least a fifth of the signal; labels: microbleed labels, which win over every
    mimic (a bleed drawn against a vein stays a bleed). `nucleus_iron` gives the case's iron
    per nucleus (default: the anatomy's)."""
    out = np.zeros(labels.shape, np.uint8)
    # Lowest priority first; later codes overwrite.
    if air.any():
        reach = [int(np.ceil(AIR_ARTEFACT_MM / s)) + 1 for s in spacing_kji]
        box = tuple(slice(max(int(a.min()) - m, 0), int(a.max()) + m + 1) for a, m in zip(np.nonzero(air), reach))
        distance = ndimage.distance_transform_edt(~air[box], sampling=spacing_kji)
        edge = (distance <= AIR_EDGE_MM) | ((distance <= AIR_ARTEFACT_MM) & faded[box])
        out[box][edge & head[box]] = MIMIC_CODES["air_edge"]
    iron = nucleus_iron or {n.name: n.iron for n in NUCLEI}
    lookup = np.zeros(256, bool)
    for i, nucleus in enumerate(NUCLEI):
        lookup[i + 1] = iron[nucleus.name] >= NUCLEUS_IRON_MIN
    out[lookup[nucleus_index]] = MIMIC_CODES["nucleus"]
    out[vein_fraction >= VEIN_FRACTION_MIN] = MIMIC_CODES["vein"]
    for calc in calcifications:
        vol_sl, body = calcification_body(calc, labels.shape, power)
        out[vol_sl][body] = MIMIC_CODES["calcification"]
    out[labels > 0] = 0
    return out


def mimic_summary(mimics: np.ndarray) -> dict[str, int]:
    """Voxel count per mimic code name, for the case's metadata."""
    counts = np.bincount(mimics.ravel(), minlength=max(MIMIC_CODES.values()) + 1)
    return {name: int(counts[code]) for name, code in MIMIC_CODES.items()}

