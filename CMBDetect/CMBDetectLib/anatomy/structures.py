"""The MARS structures of the atlas, and the rules that draw them on the MNI ICBM152 2009 template.

MARS (Gregoire et al., Neurology 2009) counts microbleeds in three categories: infratentorial
(brainstem, cerebellum), deep (basal ganglia, thalamus, internal and external capsule, corpus
callosum, deep and periventricular white matter) and lobar (frontal, parietal, temporal,
occipital, insula; cortex and grey-white junction, subcortical white matter). The category of a
template voxel is the synthetic engine's own region map (synth/anatomy.py: tentorium and
brainstem planes, the deep nuclei's ellipsoids, 6 mm from the cortical ribbon), except the
corpus callosum and the external capsule, which that map counts lobar (near the cingulate and
insular cortex); the structures split
each category by plane and distance rules on MNI coordinates. The generator's truth
(atlas.truth_at) reads the shipped map built from these rules, so atlas and truth never disagree
on the template itself. Approximations, not a parcellation drawn by anatomists: good to a few millimetres, which is what a registration to a template
gives anyway.

This module needs the template's tissue maps (synth.anatomy, hence nilearn): it is used only
when the shipped atlas is built (build_atlas.py), never at run time.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .atlas import SIDES, STRUCTURES

# Midline: |x| below this (mm) for the deep and infratentorial structures; the corpus callosum
# and the brainstem, which straddle the midline, within a wider band. The lobes always take a
# side: their medial surfaces face each other across the interhemispheric fissure.
MIDLINE_MM = 3.0
MIDLINE_WIDE_MM = {"corpus_callosum": 6.0, "brainstem": 6.0}
# A lobar voxel this close to the cortical ribbon (mm) is cortex / grey-white junction (the
# juxtacortical layer where lobar bleeds sit); deeper, subcortical white matter.
JUNCTION_MM = 2.0


def label_table() -> list[dict[str, object]]:
    """Every label of the atlas: value, structure, MARS category, side (0 is no brain)."""
    rows = []
    for structure, category in STRUCTURES:
        for side in SIDES:
            if side == "midline" and category == "lobar":
                continue
            rows.append({"value": len(rows) + 1, "structure": structure, "mars_region": category, "side": side})
    return rows


def _value_lookup() -> dict[tuple[str, str], int]:
    return {(str(r["structure"]), str(r["side"])): int(r["value"]) for r in label_table()}


def _lobe(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Lobe index (0 frontal, 1 parietal, 2 temporal, 3 occipital, 4 insula) by planes in MNI mm."""
    ax = np.abs(x)
    insula = (ax >= 27.0) & (ax <= 41.0) & (y > -28.0) & (y < 26.0) & (z > -12.0) & (z < 22.0)
    occipital = y < -72.0 + 0.15 * np.maximum(z, 0.0)
    temporal = ~occipital & (((z < 0.0) & (y < 22.0) & ((ax > 24.0) | (y < -30.0)))
                             | ((z < 14.0) & (ax > 46.0) & (y < -4.0)))
    # The central sulcus: from about y = -12 low on the convexity to y = -34 at the vertex.
    frontal = y > -12.0 - 0.45 * np.maximum(z - 20.0, 0.0)
    lobe = np.where(frontal, 0, 1)
    lobe = np.where(temporal, 2, lobe)
    lobe = np.where(occipital, 3, lobe)
    return np.where(insula, 4, lobe).astype(np.uint8)


def structure_map(region: np.ndarray, gm: np.ndarray, wm: np.ndarray, step: int = 2) -> np.ndarray:
    """Atlas labels (label_table values) on the padded 1 mm template grid (k, j, i).

    `region`: the generator's MARS region map (0 none, 1 lobar, 2 deep, 3 infratentorial);
    `gm`, `wm`: tissue fractions 0-1. Distances are taken on a `step` mm grid, as the region map's."""
    from ..synth.anatomy import MNI_ORIGIN_IJK, NUCLEI, PAD_INFERIOR, REGION_CODE, paint_ellipsoid

    shape = region.shape
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    x = i - np.float32(MNI_ORIGIN_IJK[0])
    y = j - np.float32(MNI_ORIGIN_IJK[1])
    z = k - np.float32(MNI_ORIGIN_IJK[2] + PAD_INFERIOR)
    ax = np.abs(x)

    def nuclei(names: tuple[str, ...]) -> np.ndarray:
        out = np.zeros(shape, np.float32)
        for nucleus in NUCLEI:
            if nucleus.name in names:
                paint_ellipsoid(out, nucleus, 1.0)
        return out >= 0.5

    def distance(mask: np.ndarray) -> np.ndarray:
        coarse = ndimage.distance_transform_edt(~mask[::step, ::step, ::step]) * step
        up = ndimage.zoom(coarse.astype(np.float32), step, order=0)[: shape[0], : shape[1], : shape[2]]
        return np.pad(up, [(0, n - d) for n, d in zip(shape, up.shape)], mode="edge")

    lentiform = nuclei(("globus_pallidus", "putamen"))
    caudate = nuclei(("caudate_head", "caudate_body"))
    thalamus = nuclei(("thalamus",))
    putamen = nuclei(("putamen",))
    lobar, deep, infra = (region == REGION_CODE[n] for n in ("lobar", "deep", "infratentorial"))
    cortex = (gm > 0.5) & lobar
    d_cortex = distance(cortex)
    d_lentiform, d_medial, d_putamen = distance(lentiform), distance(caudate | thalamus), distance(putamen)

    codes = np.zeros(shape, np.uint8)
    value = _value_lookup()
    names = {s: n for n, (s, _) in enumerate(STRUCTURES)}
    struct = np.full(shape, -1, np.int16)
    # Infratentorial: the brainstem in the tentorial notch, the cerebellum behind and beside it.
    brainstem = infra & (ax < 14.0) & (y > -44.0)
    struct[infra] = names["cerebellum"]
    struct[brainstem] = names["brainstem"]
    # Deep: nuclei first, then the white matter between and around them.
    white = deep & ~lentiform & ~caudate & ~thalamus
    struct[deep] = names["deep_white_matter"]
    # The corpus callosum is deep for MARS, though the region map's 6 mm from the cingulate
    # cortex makes most of it lobar: its white matter near the midline is taken from either.
    callosum = ((lobar | deep) & ~lentiform & ~caudate & ~thalamus & (wm > 0.5) & (gm < 0.5)
                & (ax <= 10.0) & (z > 4.0) & (z < 36.0) & (y > -42.0) & (y < 36.0))
    internal = white & ~callosum & (d_lentiform < 7.0) & (d_medial < 7.0) & (z > -10.0) & (z < 24.0)
    # The external capsule, a thin sheet just lateral to the putamen: like the corpus
    # callosum, lobar in the region map (it lies within 6 mm of the insular cortex).
    external = ((lobar | deep) & ~lentiform & ~callosum & ~internal & (wm > 0.5) & (gm < 0.5)
                & (d_putamen <= 4.0) & (ax >= 27.0))
    struct[internal] = names["internal_capsule"]
    struct[deep & (lentiform | caudate)] = names["basal_ganglia"]
    struct[deep & thalamus & ~lentiform & ~caudate] = names["thalamus"]
    # Lobar: the lobe by planes, cortex / grey-white junction within JUNCTION_MM of the ribbon.
    lobe = _lobe(x, y, z)
    layer = np.where(cortex | (d_cortex <= JUNCTION_MM), 0, 1)
    lobar_index = names["frontal_cortex"] + 2 * lobe + layer
    struct = np.where(lobar, lobar_index, struct).astype(np.int16)
    struct[callosum] = names["corpus_callosum"]
    struct[external] = names["external_capsule"]
    # Sides.
    for n, (structure, category) in enumerate(STRUCTURES):
        where = struct == n
        if not where.any():
            continue
        xs = np.broadcast_to(x, shape)[where]
        band = MIDLINE_WIDE_MM.get(structure, MIDLINE_MM)
        side = np.where(xs > 0, value[(structure, "right")], value[(structure, "left")])
        if category != "lobar":
            side = np.where(np.abs(xs) < band, value[(structure, "midline")], side)
        codes[where] = side
    return codes
