"""Brain anatomy for synthetic SWI: the MNI ICBM152 2009 template and what we build on it.

The template T1 and its grey- and white-matter probability maps ship inside the nilearn
package (1 mm, 197 x 233 x 189, skull-stripped). We read the files directly with SimpleITK,
without importing nilearn, so nothing can be fetched from the network.

From them, once per process, we derive tissue fractions in template space:
- CSF: inside the brain mask, whatever is neither grey nor white matter, plus a thin
  subarachnoid layer around the brain;
- a stylised head around the brain: skull (with a marrow-filled diploe) and scalp, as
  shells at fixed distances outside a smoothed brain hull;
- iron-rich deep nuclei as soft ellipsoids at their approximate MNI coordinates (table below);
- air cavities (paranasal sinuses, mastoid and middle ear) as ellipsoids outside the brain;
- a MARS-style region map (lobar / deep / infratentorial) used to place microbleeds;
- coarse guidance fields (distance to the brain surface and to the lateral ventricles) that
  steer the veins.

Coordinates are MNI millimetres, RAS (+x towards the subject's right, +y anterior, +z
superior). Lateral structures come in mirrored pairs (+-x).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

# Template voxel (i, j, k) <-> MNI (x, y, z): x = i - 98, y = j - 134, z = k - 72 in the files.
# We add PAD_INFERIOR slices below the template (which stops at z = -72, through the medulla)
# by repeating its lowest slice, so the brainstem continues into the neck instead of ending flat.
MNI_ORIGIN_IJK = np.array([98.0, 134.0, 72.0])
PAD_INFERIOR = 24
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Centre of the head used as the pivot of pose changes (MNI mm), near the middle of the brain.
HEAD_CENTRE_MNI = np.array([0.0, -18.0, 6.0])
# Superior-inferior extent of the brain in MNI z (vertex to the lowest cerebellum) used to place
# partial-coverage slabs.
BRAIN_Z_RANGE_MNI = (-62.0, 80.0)


@dataclass(frozen=True)
class Ellipsoid:
    """A named ellipsoid in MNI space: centre (x, y, z) mm, semi-axes (mm) along x, y, z
    before a rotation of `yaw_deg` about the z axis (mirrored for the left member of a pair)."""

    name: str
    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    yaw_deg: float = 0.0
    paired: bool = True  # also place the mirror image at -x


@dataclass(frozen=True)
class Cavity(Ellipsoid):
    """An air-filled cavity; `air` is the air fraction (mastoid cells are a honeycomb of air
    and bone septa, the paranasal sinuses mostly air)."""

    air: float = 1.0


@dataclass(frozen=True)
class Nucleus(Ellipsoid):
    """An iron-rich deep nucleus; `iron` is its iron load relative to the globus pallidus."""

    iron: float = 1.0


# Iron-rich deep nuclei at approximate MNI coordinates: our reading of the ICBM152 2009 template
# (putamen, pallidum, caudate and thalamus are visible on it) and of commonly used atlas
# centroids for the small brainstem and cerebellar nuclei. Iron loads relative to the globus
# pallidus follow the post-mortem non-haem iron ratios of Hallgren & Sourander (J Neurochem
# 1958), rounded: pallidum 1, red nucleus 0.9, substantia nigra 0.85, putamen 0.6, dentate 0.5,
# caudate 0.45, thalamus 0.2.
NUCLEI: tuple[Nucleus, ...] = (
    Nucleus("globus_pallidus", (19.0, -3.0, -1.0), (3.5, 8.0, 5.0), yaw_deg=-10.0, iron=1.0),
    Nucleus("putamen", (25.0, 2.0, 1.0), (5.0, 14.0, 9.0), yaw_deg=-8.0, iron=0.6),
    Nucleus("caudate_head", (13.0, 13.0, 8.0), (4.5, 8.0, 8.0), iron=0.45),
    Nucleus("caudate_body", (16.0, -8.0, 19.0), (3.5, 10.0, 4.0), yaw_deg=-15.0, iron=0.4),
    Nucleus("thalamus", (11.0, -18.0, 7.0), (7.0, 12.0, 8.0), iron=0.2),
    Nucleus("red_nucleus", (5.0, -19.0, -8.0), (3.0, 3.5, 4.0), iron=0.9),
    Nucleus("substantia_nigra", (11.0, -16.0, -11.0), (3.0, 7.5, 3.0), yaw_deg=-30.0, iron=0.85),
    Nucleus("dentate", (14.0, -57.0, -34.0), (6.0, 8.0, 5.0), iron=0.5),
)

# Air-filled cavities next to the brain, the sources of susceptibility artefacts at the skull
# base (orbitofrontal cortex, temporal poles, inferior temporal lobes). Approximate positions.
AIR_CAVITIES: tuple[Cavity, ...] = (
    Cavity("frontal_sinus", (0.0, 77.0, -4.0), (13.0, 5.0, 9.0), paired=False, air=1.0),
    Cavity("ethmoid_cells", (0.0, 36.0, -41.0), (7.0, 14.0, 8.0), paired=False, air=0.5),
    Cavity("sphenoid_sinus", (0.0, 10.0, -44.0), (14.0, 12.0, 10.0), paired=False, air=0.9),
    Cavity("mastoid_cells", (50.0, -36.0, -46.0), (9.0, 11.0, 9.0), air=0.5),
    Cavity("middle_ear", (44.0, -18.0, -42.0), (8.0, 6.0, 5.0), air=0.8),
)
AIR_BONE_RIM_MM = 4.0  # cavities sit in bone: no scalp or marrow signal this close to them

# Where calcifications occur (physiological ones): pineal gland, choroid plexus glomus in the
# atria of the lateral ventricles, globus pallidus. Approximate positions; prevalences are our
# estimates of adult rates (pineal and choroid plexus calcification are common on CT).
CALCIFICATION_SITES: tuple[tuple[str, tuple[float, float, float], float, bool], ...] = (
    # name, MNI centre, probability per case, paired
    ("pineal", (0.0, -30.0, 2.0), 0.6, False),
    ("choroid_plexus", (27.0, -40.0, 14.0), 0.45, True),
    ("basal_ganglia", (19.0, -3.0, -1.0), 0.12, True),
)

REGIONS = ("lobar", "deep", "infratentorial")
REGION_CODE = {name: i + 1 for i, name in enumerate(REGIONS)}

# Tissue channels of the template-space stack, each a fraction 0..1 stored as uint8.
CHANNELS = ("gm", "wm", "csf", "iron", "air", "bone", "marrow", "scalp")

# Shell distances (mm) outside the smoothed brain hull for the stylised head.
CSF_SHELL_MM = 2.5
SKULL_OUTER_MM = 9.0
DIPLOE_MM = (4.5, 7.0)
SCALP_OUTER_MM = 15.0
GUIDE_STEP = 2  # guidance fields are kept at 2 mm


def template_dir() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 2009 files."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed: it provides the MNI152 template (pip install nilearn)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [f for f in TEMPLATE_FILES.values() if not (folder / f).exists()]
    if missing:
        raise RuntimeError(f"the installed nilearn lacks the MNI152 2009 template files {missing} in {folder}")
    return folder


def mni_to_index(xyz: np.ndarray) -> np.ndarray:
    """MNI mm (..., 3) to padded-template array coordinates (..., 3) in (k, j, i) order."""
    xyz = np.asarray(xyz, dtype=float)
    ijk = xyz + MNI_ORIGIN_IJK + np.array([0.0, 0.0, PAD_INFERIOR])
    return ijk[..., ::-1]


def index_to_mni(kji: np.ndarray) -> np.ndarray:
    kji = np.asarray(kji, dtype=float)
    return kji[..., ::-1] - MNI_ORIGIN_IJK - np.array([0.0, 0.0, PAD_INFERIOR])


def ellipsoid_members(e: Ellipsoid) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centre, rotation) for the ellipsoid and, if paired, its mirror image at -x."""
    out = []
    for side in (1.0, -1.0) if e.paired else (1.0,):
        c = np.array(e.centre) * np.array([side, 1.0, 1.0])
        a = np.deg2rad(e.yaw_deg) * side
        rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        out.append((c, rot))
    return out


def paint_ellipsoid(volume: np.ndarray, e: Ellipsoid, value: float, edge_mm: float = 1.0) -> None:
    """Add a soft-edged ellipsoid (1 inside, ramping to 0 over `edge_mm`) times `value` into a
    template-space volume, keeping the maximum where structures overlap."""
    semi = np.array(e.semi_axes)
    for centre, rot in ellipsoid_members(e):
        reach = semi.max() + 2 * edge_mm
        lo = np.floor(mni_to_index(centre - reach)).astype(int)
        hi = np.ceil(mni_to_index(centre + reach)).astype(int) + 1
        lo = np.maximum(np.minimum(lo, hi), 0)
        hi = np.minimum(np.maximum(lo, hi), volume.shape)
        kk, jj, ii = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
        xyz = index_to_mni(np.stack([kk, jj, ii], -1)) - centre
        local = xyz @ rot  # coordinates along the ellipsoid's own axes
        r = np.sqrt(((local / semi) ** 2).sum(-1))
        # distance to the surface, roughly, in mm: scale by the semi-axis along that direction
        depth = (1.0 - r) * np.linalg.norm(local, axis=-1) / np.maximum(r, 1e-6)
        frac = np.clip(depth / edge_mm + 0.5, 0.0, 1.0) * value
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        np.maximum(volume[sl], frac.astype(volume.dtype), out=volume[sl])


@dataclass(frozen=True)
class Template:
    """Template-space tissue stack and the maps derived from it (all arrays (k, j, i), 1 mm,
    padded below by PAD_INFERIOR slices)."""

    channels: np.ndarray  # (len(CHANNELS), K, J, I) uint8 fractions * 255
    region: np.ndarray  # (K, J, I) uint8: 0 none, 1 lobar, 2 deep, 3 infratentorial
    tissue: np.ndarray  # (K, J, I) float32: gm + wm fraction
    hull_distance: np.ndarray  # (K/2, J/2, I/2) float32 mm, positive inside the brain hull
    hull_gradient: np.ndarray  # (3, ...) unit vectors pointing into the brain (k, j, i order)
    ventricle_distance: np.ndarray  # (K/2, J/2, I/2) float32 mm from the lateral ventricles
    ventricle_gradient: np.ndarray  # (3, ...) unit vectors pointing away from the ventricles
    candidates: dict[str, np.ndarray]  # region -> flat indices of voxels where a bleed may sit

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.region.shape)  # type: ignore[return-value]

    def channel(self, name: str) -> np.ndarray:
        return self.channels[CHANNELS.index(name)]

    def sample(self, volume: np.ndarray, mni: np.ndarray, order: int = 1) -> np.ndarray:
        """Values of a template-space (1 mm) volume at MNI points (N, 3)."""
        coords = mni_to_index(np.atleast_2d(mni)).T
        return ndimage.map_coordinates(volume, coords, order=order, mode="nearest")

    def sample_guide(self, volume: np.ndarray, mni: np.ndarray) -> np.ndarray:
        """Values of a 2 mm guidance volume (or a (3, ...) vector field) at MNI points (N, 3)."""
        coords = mni_to_index(np.atleast_2d(mni)).T / GUIDE_STEP
        if volume.ndim == 4:
            return np.stack([ndimage.map_coordinates(v, coords, order=1, mode="nearest") for v in volume], -1)
        return ndimage.map_coordinates(volume, coords, order=1, mode="nearest")


def _read_template() -> dict[str, np.ndarray]:
    folder = template_dir()
    arrays = {}
    for key, name in TEMPLATE_FILES.items():
        image = sitk.ReadImage(str(folder / name))
        a = sitk.GetArrayFromImage(image).astype(np.float32)
        if a.shape != (189, 233, 197):
            raise RuntimeError(f"unexpected MNI152 template shape {a.shape} in {name}")
        # Continue the medulla into the neck by repeating the lowest slice.
        arrays[key] = np.concatenate([np.repeat(a[:1], PAD_INFERIOR, axis=0), a], axis=0)
    return arrays


def _unit_gradient(field: np.ndarray, sigma: float) -> np.ndarray:
    g = np.stack(np.gradient(ndimage.gaussian_filter(field, sigma)))
    return (g / np.maximum(np.linalg.norm(g, axis=0), 1e-6)).astype(np.float32)


def _upsample_nearest(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Back from the 2 mm guidance grid to 1 mm by repetition (for masks and labels)."""
    up = coarse
    for axis in range(3):
        up = np.repeat(up, GUIDE_STEP, axis=axis)
    up = up[: shape[0], : shape[1], : shape[2]]
    return np.pad(up, [(0, s - d) for s, d in zip(shape, up.shape)], mode="edge")


def _region_map(tissue: np.ndarray, gm: np.ndarray, deep_nuclei: np.ndarray) -> np.ndarray:
    """MARS-like regions: infratentorial (cerebellum and brainstem), deep (basal ganglia,
    thalamus, internal/external capsules, periventricular and deep white matter), lobar
    (cortex and juxtacortical white matter). Boundaries are simple geometric rules on MNI
    coordinates and on the distance to the cortical ribbon: approximations, not an atlas."""
    shape = tissue.shape
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    x = i - np.float32(MNI_ORIGIN_IJK[0])
    y = j - np.float32(MNI_ORIGIN_IJK[1])
    z = k - np.float32(MNI_ORIGIN_IJK[2] + PAD_INFERIOR)
    # The tentorium slopes down laterally; the brainstem sits in the notch.
    below_tentorium = (y < -36.0) & (z < -8.0 - 0.006 * x**2)
    brainstem = (np.abs(x) < 16.0) & (y > -46.0) & (y < -8.0) & (z < -6.0)
    infra = below_tentorium | brainstem
    s = GUIDE_STEP
    cortex = (gm[::s, ::s, ::s] > 0.5) & (deep_nuclei[::s, ::s, ::s] < 0.2) & ~infra[::s, ::s, ::s]
    d_cortex = _upsample_nearest((ndimage.distance_transform_edt(~cortex) * s).astype(np.float32), shape)
    has_tissue = tissue > 0.5
    region = np.zeros(shape, np.uint8)
    region[has_tissue] = REGION_CODE["lobar"]
    region[has_tissue & ((d_cortex > 6.0) | (deep_nuclei > 0.5))] = REGION_CODE["deep"]
    region[has_tissue & infra] = REGION_CODE["infratentorial"]
    return region


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Build the template-space anatomy once per process (a few seconds)."""
    t = _read_template()
    gm = t["gm"] * np.float32(1 / 255)
    wm = t["wm"] * np.float32(1 / 255)
    brain = t["t1"] > 0
    del t
    tissue = gm + wm
    csf_inside = np.clip(1.0 - tissue, 0.0, 1.0) * brain
    shape = brain.shape
    s = GUIDE_STEP

    # A smooth hull around the brain (at 2 mm); head shells are laid at distances outside it.
    hull = ndimage.gaussian_filter(brain[::s, ::s, ::s].astype(np.float32), 1.5) > 0.3
    hull = ndimage.binary_fill_holes(hull)
    signed_coarse = (
        ndimage.distance_transform_edt(hull) - ndimage.distance_transform_edt(~hull)
    ).astype(np.float32) * s  # mm, + inside the hull
    signed = ndimage.zoom(signed_coarse, s, order=1)[: shape[0], : shape[1], : shape[2]]
    signed = np.pad(signed, [(0, n - d) for n, d in zip(shape, signed.shape)], mode="edge")
    # Skull and scalp are not uniform: a fixed smooth random field (+-2 mm, correlated over
    # ~25 mm) varies the shells' depth, and the temporal muscles thicken the soft tissue over
    # the temporal bones. Fixed seed: this is part of the template, not of a case.
    bumps = ndimage.gaussian_filter(np.random.default_rng(152).standard_normal(signed_coarse.shape), 6.0)
    bumps *= 2.0 / max(float(bumps.std()) * 2.5, 1e-6)
    bumps = ndimage.zoom(bumps.astype(np.float32), s, order=1)[: shape[0], : shape[1], : shape[2]]
    bumps = np.pad(bumps, [(0, n - d) for n, d in zip(shape, bumps.shape)], mode="edge")
    out = -signed - bumps  # mm outside the hull, wobbled
    x_mni = np.arange(shape[2], dtype=np.float32) - np.float32(MNI_ORIGIN_IJK[0])
    z_mni = np.arange(shape[0], dtype=np.float32) - np.float32(MNI_ORIGIN_IJK[2] + PAD_INFERIOR)
    temporal = (np.clip((np.abs(x_mni) - 45.0) / 20.0, 0, 1)[None, None, :]
                * np.clip(1.0 - np.abs(z_mni - 5.0) / 40.0, 0, 1)[:, None, None]).astype(np.float32)

    def band(lo: float, hi: float) -> np.ndarray:
        # soft-edged shell lo <= d < hi (1 mm ramps) so that resampling gives clean edges
        return np.clip(np.minimum(out - (lo - 0.5), (hi + 0.5) - out), 0.0, 1.0)

    csf = np.maximum(csf_inside, band(-3.0, CSF_SHELL_MM) * ~brain)
    marrow = band(*DIPLOE_MM)
    bone = np.clip(band(CSF_SHELL_MM, SKULL_OUTER_MM) - marrow, 0.0, 1.0)
    # Scalp, thickened by up to 8 mm of temporalis muscle at the sides of the head.
    scalp = np.clip(np.minimum(out - (SKULL_OUTER_MM - 0.5), (SCALP_OUTER_MM + 0.5 + 8.0 * temporal) - out), 0.0, 1.0)

    iron = np.zeros(shape, np.float32)
    for nucleus in NUCLEI:
        paint_ellipsoid(iron, nucleus, nucleus.iron)
    iron *= tissue > 0.3  # iron sits in tissue, not in the ventricles next to the caudate
    deep_nuclei = np.zeros(shape, np.float32)
    for nucleus in NUCLEI[:5]:  # basal ganglia and thalamus count as "deep" for MARS
        paint_ellipsoid(deep_nuclei, nucleus, 1.0)

    air = np.zeros(shape, np.float32)
    for cavity in AIR_CAVITIES:
        paint_ellipsoid(air, cavity, cavity.air, edge_mm=1.5)
    air *= np.clip(1.0 - 2.0 * (tissue + csf), 0.0, 1.0)  # cavities never overlap brain or CSF
    # The cavities lie in bone: around them, scalp and marrow give way to bone, and inside
    # them whatever is not air is bone septa.
    rim = ndimage.distance_transform_edt(air[::s, ::s, ::s] < 0.25) * s < AIR_BONE_RIM_MM
    rim = _upsample_nearest(rim, shape) & (tissue + csf < 0.05)
    bone = np.where(rim, np.clip(1.0 - air, 0.0, 1.0), bone)
    marrow = np.where(rim, 0.0, marrow).astype(np.float32)
    scalp = np.where(rim, 0.0, scalp).astype(np.float32)

    # Fractions must not sum above 1: the non-brain compartments share what gm + wm leave.
    stack = np.stack([gm, wm, csf, iron, air, bone, marrow, scalp])
    del bone, marrow, scalp, csf
    others = [2, 4, 5, 6, 7]
    extra = stack[others].sum(0)
    room = 1.0 - np.minimum(tissue, 1.0)
    over = extra > room
    for c in others:
        stack[c][over] *= room[over] / extra[over]
    channels = np.empty(stack.shape, np.uint8)
    np.multiply(np.clip(stack, 0.0, 1.0), 255.0, out=stack)
    np.rint(stack, out=stack)
    channels[...] = stack
    del stack

    region = _region_map(tissue, gm, deep_nuclei)

    vent = (csf_inside[::s, ::s, ::s] > 0.7) & (signed_coarse > 12.0)
    z_coarse = np.arange(vent.shape[0])[:, None, None] * s - MNI_ORIGIN_IJK[2] - PAD_INFERIOR
    vent &= z_coarse > -2  # the bodies and atria, not the temporal horns or third ventricle
    vdist = (ndimage.distance_transform_edt(~vent) * s).astype(np.float32)

    solid = (tissue > 0.92) & (iron < 0.95)
    candidates = {
        name: np.flatnonzero(solid & (region == REGION_CODE[name])).astype(np.int64) for name in REGIONS
    }

    return Template(
        channels=channels,
        region=region,
        tissue=tissue,
        hull_distance=signed_coarse,
        hull_gradient=_unit_gradient(signed_coarse, 1.5),
        ventricle_distance=vdist,
        ventricle_gradient=_unit_gradient(vdist, 1.0),
        candidates=candidates,
    )


# Bits of the template-space mimic anatomy (see mimic_anatomy).
NUCLEUS_BITS = 0x0F  # 0 none, i + 1 inside NUCLEI[i]
AIR_BIT = 0x10  # air fraction >= 0.5 (inside a cavity)
HEAD_BIT = 0x20  # inside the head (brain, CSF, bone, marrow, scalp or a cavity)


@functools.lru_cache(maxsize=1)
def mimic_anatomy() -> np.ndarray:
    """Template-space (K, J, I) uint8 map of where the anatomical mimics are, for the mimic map:
    the deep nucleus each voxel lies in (low four bits: i + 1 for NUCLEI[i], its ellipsoid
    where there is tissue; the later one wins where two overlap), AIR_BIT in the air cavities,
    HEAD_BIT inside the head. Nearest-neighbour sampling keeps the codes intact."""
    template = load_template()
    out = np.zeros(template.shape, np.uint8)
    inside = np.zeros(template.shape, np.float32)
    for i, nucleus in enumerate(NUCLEI):
        inside[...] = 0.0
        paint_ellipsoid(inside, nucleus, 1.0)
        out[(inside >= 0.5) & (template.tissue > 0.3)] = i + 1
    del inside
    out[template.channel("air") >= 128] |= AIR_BIT
    out[template.channels.sum(0, dtype=np.uint16) >= 128] |= HEAD_BIT
    return out
