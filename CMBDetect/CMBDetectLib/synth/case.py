"""One synthetic SWI case, from seed to image, labels and metadata.

The order of work follows the physics:
1. protocol (acquisition.py) and head pose (warp.py);
2. tissue magnitude and susceptibility from the template (anatomy.py, tissue.py), pulled back
   onto the acquisition grid (at about 1.2 mm in-plane, then interpolated to the matrix);
3. veins drawn with their partial volume (veins.py);
4. the field of all that susceptibility on the acquisition grid (a few slices of padding
   above and below), the phase at TE, the signal loss from the field's ramp across voxels;
   vein voxels as two compartments (tissue and blood);
5. calcifications and microbleeds as sub-voxel dipole simulations multiplied into the complex
   signal (mimics.py, microbleeds.py), and the bleeds' outlines as labels;
6. coil bias, complex noise, SWI reconstruction (high-pass phase mask to a power) and the
   vendor's intensity curve (acquisition.py).

Every random draw comes from a numpy Generator seeded by (seed, index, control, component),
one stream per component, so a case is a pure function of its arguments, and overriding one
protocol parameter leaves the anatomy, veins and bleed sites as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.interpolate import interp1d

from ..io import Geometry, Volume
from ..detection.lesions import equivalent_diameter_mm, size_class
from .acquisition import (
    OVERRIDABLE,
    Acquisition,
    acquisition_geometry,
    add_noise,
    bias_field,
    curve_slope_at_wm,
    kspace_effects,
    noisy_magnitude,
    reconstruct_swi,
    sample_acquisition,
    validate_overrides,
    vendor_curve,
)
from .anatomy import (
    AIR_BIT,
    HEAD_BIT,
    HEAD_CENTRE_MNI,
    NUCLEI,
    NUCLEUS_BITS,
    iron_voxels,
    load_template,
    mimic_anatomy,
)
from .microbleeds import LABEL_LEVEL, Microbleed, place_microbleeds, sample_count
from .mimics import (
    MIMIC_CODES,
    Calcification,
    air_cavities_in_view,
    mimic_map,
    mimic_summary,
    place_calcifications,
)
from .susceptibility import (
    apply_patch,
    field_ppm,
    gradient_dephasing,
    phase_per_ppm,
    shim,
    visibility,
)
from .resample import oblique_geometry, resample, tidy_labels
from .space import Space, space_for
from .timing import stage
from .tissue import TissueProperties, sample_tissue, tissue_maps
from .veins import rasterise, sample_veins, summarise
from .followup import Visit, carry_bleeds, moved_warp, outside_baseline
from .warp import sample_warp

GENERATOR_VERSION = "cmbdetect-synth 2.0"
INTERMEDIATE_SPACING_MM = 1.2  # the template has 1 mm detail; finer grids only interpolate
CHI_SPACING_MM = 2.0
EXTRA_OVERRIDES = ("n_microbleeds", "vein_density", "deformation_mm", "keep_maps", "domain", "space")
STREAMS = {"acquisition": 1, "pose": 2, "tissue": 3, "veins": 4, "calcifications": 5, "microbleeds": 6,
           "bias": 7, "noise": 8, "anatomy_variation": 9, "resample": 10}
LABEL_RULE = (
    "A voxel is labelled when the microbleed leaves its noise-free SWI signal at most 60 % of "
    "what it would be without the bleed (magnitude loss from intravoxel dephasing times the SWI "
    "phase mask of the bleed's own phase), 26-connected to the darkest voxel; the level is "
    "raised (up to 0.85) or lowered (down to 0.2) in 0.025 steps only when needed to keep the "
    "outline within 2-10 mm equivalent diameter. size_class comes from the outline's diameter."
)


@dataclass
class SynthCase:
    """A generated case: SWI magnitude (float32, scanner units), label map (uint16, one id per
    microbleed), mimic map (uint8, MIMIC_CODES), metadata. `maps` holds extra volumes when asked for (keep_maps=True):
    the high-pass phase (rad) and the venous blood fraction."""

    name: str
    image: Volume
    labels: np.ndarray
    meta: dict[str, object]
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    # uint8, which mimic each voxel belongs to (MIMIC_CODES: 1 vein, 2 calcification,
    # 3 iron-rich nucleus, 4 air-tissue edge; 0 none, and 0 wherever a microbleed is labelled)
    mimics: np.ndarray | None = None
    # The bleeds as placed on the acquisition grid (`acquisition_geometry`), and each one's id in
    # `labels` (a bleed lost in oblique resampling has none): what a follow-up visit carries over.
    bleeds: list[Microbleed] = field(default_factory=list)
    acquisition_geometry: Geometry | None = None
    label_of_bleed: dict[int, int] = field(default_factory=dict)


def case_name(seed: int, index: int, control: bool = False) -> str:
    return f"synth-s{seed}-ctl-{index:03d}" if control else f"synth-s{seed}-{index:03d}"


def _rng(seed: int, index: int, control: bool, stream: str, visit: int = 0) -> np.random.Generator:
    # Visit 0 (a single case, a baseline) keeps the key it always had.
    return np.random.default_rng([seed, index, int(control), STREAMS[stream]] + ([visit] if visit else []))


def _check_arguments(seed: int, index: int, overrides: dict[str, object]) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative integer, not {index!r}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE) - set(EXTRA_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; known: {sorted(OVERRIDABLE + EXTRA_OVERRIDES)}")
    validate_overrides(overrides)
    if "n_microbleeds" in overrides:
        n = overrides["n_microbleeds"]
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= 200:
            raise ValueError(f"n_microbleeds must be an integer 0-200, not {n!r}")
    if "vein_density" in overrides and not 0.0 <= float(overrides["vein_density"]) <= 5.0:  # type: ignore[arg-type]
        raise ValueError(f"vein_density must lie in 0-5 (1 = normal), not {overrides['vein_density']}")
    if "deformation_mm" in overrides and not 0.0 <= float(overrides["deformation_mm"]) <= 10.0:  # type: ignore[arg-type]
        raise ValueError(f"deformation_mm must lie in 0-10 mm, not {overrides['deformation_mm']}")
    if "space" in overrides and not isinstance(overrides["space"], dict):
        raise ValueError(f"space must be a dict of range overrides, not {overrides['space']!r}")
    space_for(str(overrides.get("domain", "all")), overrides.get("space"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class AnatomyVariation:
    """A case's draws on the anatomy side of the space (stream "anatomy_variation")."""

    vein_density: float
    vein_calibre: float
    vein_tortuosity: float
    iron: dict[str, float]  # relative iron per nucleus (globus pallidus of the template = 1)
    calcification_size: float
    calcification_rate: float

    def as_dict(self) -> dict[str, object]:
        return {"vein_density": _r(self.vein_density), "vein_calibre": _r(self.vein_calibre),
                "vein_tortuosity": _r(self.vein_tortuosity), "iron_relative": {k: _r(v) for k, v in self.iron.items()},
                "calcification_size_scale": _r(self.calcification_size),
                "calcification_rate_scale": _r(self.calcification_rate)}


def sample_anatomy_variation(rng: np.random.Generator, space: Space) -> AnatomyVariation:
    u = rng.random(6)
    per_nucleus = rng.random(len(NUCLEI))

    def within(x: float, r: tuple[float, float]) -> float:
        return float(r[0] + (r[1] - r[0]) * x)

    scale = within(u[3], space.iron_scale)
    iron = {n.name: n.iron * scale * within(x, space.iron_nucleus) for n, x in zip(NUCLEI, per_nucleus)}
    return AnatomyVariation(
        vein_density=within(u[0], space.vein_density),
        vein_calibre=within(u[1], space.vein_calibre),
        vein_tortuosity=within(u[2], space.vein_tortuosity),
        iron=iron,
        calcification_size=within(u[4], space.calcification_size),
        calcification_rate=within(u[5], space.calcification_rate),
    )


def _iron_scale_template(variation: AnatomyVariation) -> tuple[np.ndarray, np.ndarray]:
    """Where the template has iron (flat indices) and the case's multiplier there: each
    nucleus's case iron over its template iron."""
    lookup = np.ones(NUCLEUS_BITS + 1, np.float32)
    for i, nucleus in enumerate(NUCLEI):
        lookup[i + 1] = variation.iron[nucleus.name] / nucleus.iron
    # Outside the nuclei's cores (their soft edges), the mean of the case's scale.
    lookup[0] = float(np.mean(lookup[1 : len(NUCLEI) + 1]))
    flat, nucleus = iron_voxels()
    return flat, lookup[nucleus]


def _upsample_axis(a: np.ndarray, coarse: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Linear interpolation along one axis from samples at integer positions `coarse`
    (increasing, first 0, last n - 1) to all positions 0..n-1."""
    if len(coarse) == n:
        return a
    up = interp1d(coarse, a, axis=axis, assume_sorted=True, copy=False)(np.arange(n))
    return up.astype(np.float32, copy=False)


def _coarse_axis(n: int, spacing: float, target_mm: float = INTERMEDIATE_SPACING_MM) -> np.ndarray:
    step = max(1, int(round(target_mm / spacing)))
    axis = np.arange(0, n, step)
    return axis if axis[-1] == n - 1 else np.append(axis, n - 1)


def _sample_template(
    volume: np.ndarray, warp, geometry: Geometry, k_axis: np.ndarray, j_axis: np.ndarray, i_axis: np.ndarray,
    order: int = 1,
) -> np.ndarray:
    """Samples of a template-space volume at acquisition grid points (0 outside), trilinear
    (order 1) or nearest (order 0, for codes)."""
    coords = warp.template_coordinates(np.array(geometry.origin), np.array(geometry.spacing), k_axis, j_axis, i_axis)
    if order == 0:
        return ndimage.map_coordinates(volume, coords, order=0, mode="constant", cval=0)
    return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0, output=np.float32)


def _nearest_axis(a: np.ndarray, coarse: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Nearest-neighbour counterpart of _upsample_axis (for codes)."""
    if len(coarse) == n:
        return a
    nearest = np.abs(np.arange(n)[:, None] - coarse[None, :]).argmin(1)
    return np.take(a, nearest, axis=axis)


@dataclass
class _Grid:
    """Tissue and mimic anatomy on the acquisition grid."""

    magnitude: np.ndarray  # (K, J, I) noise-free magnitude, coil bias included
    chi: np.ndarray  # (K + 2 pad, J, I) susceptibility, ppm
    anatomy: np.ndarray  # (K, J, I) uint8 mimic anatomy bits (anatomy.mimic_anatomy)


def _tissue_on_grid(
    acq: Acquisition, geometry: Geometry, warp, props: TissueProperties, pad: int, bias_rng: np.random.Generator,
    iron_scale: tuple[np.ndarray, np.ndarray] | None = None,
) -> _Grid:
    """Magnitude (K, J, I, coil bias included), susceptibility (K + 2 pad, J, I) and the mimic
    anatomy on the acquisition grid. The magnitude and anatomy are sampled from the template at
    about 1.2 mm in-plane, the susceptibility (whose field is smooth at that scale) at about
    2 mm; all are then interpolated to the matrix."""
    template = load_template()
    rows, cols = acq.matrix
    k_axis = np.arange(acq.n_slices)
    j_axis = _coarse_axis(rows, acq.pixel_spacing_mm[0])
    i_axis = _coarse_axis(cols, acq.pixel_spacing_mm[1])
    j_chi = _coarse_axis(rows, acq.pixel_spacing_mm[0], CHI_SPACING_MM)
    i_chi = _coarse_axis(cols, acq.pixel_spacing_mm[1], CHI_SPACING_MM)
    magnitude_t, chi_t = tissue_maps(template.channels, props, acq.te_ms, iron_scale)
    magnitude_c = _sample_template(magnitude_t, warp, geometry, k_axis, j_axis, i_axis)
    chi_c = _sample_template(chi_t, warp, geometry, np.arange(-pad, acq.n_slices + pad), j_chi, i_chi)
    del magnitude_t, chi_t
    anatomy_c = _sample_template(mimic_anatomy(), warp, geometry, k_axis, j_axis, i_axis, order=0)
    # The coil bias multiplies every later factor of the signal, so it can enter here, on the
    # coarse grid, before noise is added.
    magnitude_c *= bias_field(bias_rng, acq.shape, acq.bias_amplitude, at=(k_axis, j_axis, i_axis))
    magnitude = _upsample_axis(_upsample_axis(magnitude_c, i_axis, cols, axis=2), j_axis, rows, axis=1)
    chi = _upsample_axis(_upsample_axis(chi_c, i_chi, cols, axis=2), j_chi, rows, axis=1)
    anatomy = _nearest_axis(_nearest_axis(anatomy_c, i_axis, cols, axis=2), j_axis, rows, axis=1)
    return _Grid(magnitude, chi, anatomy)


def generate_case(seed: int, index: int, control: bool = False, *, visit: Visit | None = None,
                  **overrides: object) -> SynthCase:
    """Generate one synthetic SWI case; a pure function of (seed, index, control, overrides).

    Overrides: field_strength_t (1.5 | 3.0 | 7.0), te_ms, matrix (rows, cols), slice_thickness_mm,
    n_slices, snr, vendor (Siemens | Philips | GE), fov_mm, slab_centre_mni_z, contrast_curve,
    noise_type, oblique (False, or the dict of resample.oblique_geometry), n_microbleeds,
    vein_density (1 = normal), deformation_mm (RMS), keep_maps (bool), domain (all | train |
    shifted, space.py) and space (a dict of range overrides of space.Space).

    `visit` (followup.Visit) makes the case a later visit of the subject (seed, index): the
    head moved, the baseline's bleeds carried over, new ones added, its own noise and bias."""
    _check_arguments(seed, index, overrides)
    control = bool(control)
    keep_maps = bool(overrides.get("keep_maps", False))
    domain = str(overrides.get("domain", "all"))
    space = space_for(domain, overrides.get("space"))  # type: ignore[arg-type]
    with stage("template"):
        template = load_template()

    with stage("protocol_and_pose"):
        protocol_visit = visit.number if visit is not None and visit.new_protocol else 0
        acq = sample_acquisition(_rng(seed, index, control, "acquisition", protocol_visit), overrides, space)
        variation = sample_anatomy_variation(_rng(seed, index, control, "anatomy_variation"), space)
        pose_rng = _rng(seed, index, control, "pose")
        head_offset = np.array([pose_rng.uniform(-5, 5), pose_rng.uniform(-5, 5), 0.0])
        deformation = overrides.get("deformation_mm")
        warp = sample_warp(pose_rng, head_offset, None if deformation is None else float(deformation))  # type: ignore[arg-type]
        head_centre = warp.translation
        if visit is not None:
            # The technologist centres the field of view on the head where it now lies.
            warp = moved_warp(warp, visit.motion)
            head_offset = head_offset + visit.motion.shift_mm * np.array([1.0, 1.0, 0.0])
        slab_point = np.array([[HEAD_CENTRE_MNI[0], HEAD_CENTRE_MNI[1], acq.slab_centre_mni_z]])
        slab_z = float(warp.mni_to_scanner(slab_point)[0, 2])
        centre = np.array([head_offset[0] + acq.fov_offset_mm[1], head_offset[1] + acq.fov_offset_mm[0], slab_z])
        geometry = acquisition_geometry(acq, centre)
    origin = np.array(geometry.origin)
    spacing_ijk = np.array(geometry.spacing)
    shape = acq.shape
    spacing_kji = acq.spacing_kji
    b0, te = acq.field_strength_t, acq.te_ms
    rad = phase_per_ppm(b0, te)
    visit_number = 0 if visit is None else visit.number

    with stage("tissue"):
        props = sample_tissue(_rng(seed, index, control, "tissue"), b0, acq.t1_weighting)
        pad = int(np.clip(np.ceil(15.0 / acq.slice_thickness_mm), 3, 16))
        grid = _tissue_on_grid(acq, geometry, warp, props, pad, _rng(seed, index, control, "bias", visit_number),
                               _iron_scale_template(variation))
        magnitude, chi, anatomy = grid.magnitude, grid.chi, grid.anatomy
        del grid

    with stage("veins"):
        vein_rng = _rng(seed, index, control, "veins")
        density = float(overrides.get("vein_density", variation.vein_density))  # type: ignore[arg-type]
        veins = sample_veins(template, vein_rng, density, variation.vein_calibre, variation.vein_tortuosity)
        raster = rasterise(veins, warp, origin, spacing_ijk, shape)
        chi[pad : pad + shape[0]] += raster.fraction * np.float32(props.vein_chi)

    with stage("field"):
        field = np.ascontiguousarray(field_ppm(chi, spacing_kji)[pad : pad + shape[0]])
        del chi
        # The scanner shims B0 over the brain (second order), which takes out the smooth part
        # of the air cavities' field but not its steep edges.
        field, _ = shim(field, (magnitude > 0.4 * props.signal("wm", te)).astype(np.float32))
        dephasing = gradient_dephasing(field, rad)
        # Where the field's ramp (air-tissue edges) has wiped out half the signal nobody could
        # see, or outline, a bleed: they are not placed there.
        clear = dephasing >= 0.8
        faded = ~clear  # for the mimic map's air-tissue edge
        signal_mag = dephasing * magnitude
        del dephasing
        field *= np.float32(-rad)  # now the phase
        signal = np.empty(shape, np.complex64)
        np.cos(field, out=signal.real)
        np.sin(field, out=signal.imag)
        signal *= signal_mag
        del signal_mag, field

    with stage("vein_compartments"):
        # Vein voxels: tissue and blood compartments. Around a vein the tissue dephases in the
        # vein's own field (static-dephasing regime: loss ~ fraction * dw * TE, dw the field
        # amplitude at the vessel wall, with sin^2 of the angle to B0); inside, blood has its own
        # T2* and a phase offset (chi / 2)(cos^2 - 1/3).
        flat = np.flatnonzero(raster.fraction.ravel() > 0)
        if flat.size:
            f = raster.fraction.ravel()[flat]
            c2 = raster.cos2.ravel()[flat]
            m = magnitude.ravel()[flat]
            dw_te = rad * props.vein_chi * (1.0 - c2) / 2.0
            inside_phase = -rad * props.vein_chi * (c2 - 1.0 / 3.0) / 2.0
            blood = props.blood_pd * np.exp(-te * 1e-3 * props.blood_r2s)
            two = (1.0 - f) * m * np.exp(-f * dw_te) + f * (blood * m) * np.exp(1j * inside_phase)
            scale = np.where(m > 1e-6, two / np.maximum(m, 1e-6), 1.0)  # no tissue, no vein signal
            signal.ravel()[flat] *= scale.astype(np.complex64)
        del magnitude

    with stage("calcifications"):
        occupied = np.zeros(shape, bool)
        calcs = place_calcifications(warp, origin, spacing_ijk, shape, b0, te,
                                     _rng(seed, index, control, "calcifications"), variation.calcification_size,
                                     variation.calcification_rate, space.p_calcification_lobulated)
        for calc in calcs:
            vol_sl, patch_sl = apply_patch(signal, calc.patch)
            dark = visibility(calc.patch.factor[patch_sl], acq.phase_mask_power) < 0.85
            occupied[vol_sl] |= ndimage.binary_dilation(dark, iterations=2)

    with stage("microbleeds"):
        bleed_rng = _rng(seed, index, control, "microbleeds", visit_number)
        n_drawn = sample_count(bleed_rng)
        n_wanted = 0 if control else int(overrides.get("n_microbleeds", n_drawn))  # type: ignore[arg-type]
        carried = None
        if visit is not None:
            carried = carry_bleeds(visit.carried, visit.motion.about(head_centre), origin, spacing_ijk, shape, b0, te,
                                   acq.phase_mask_power)
            for bleed in carried.labelled:
                _reserve(occupied, bleed, shape)
            n_wanted = visit.n_new
            free = occupied | outside_baseline(visit, origin, spacing_ijk, shape)
            new = place_microbleeds(n_wanted, template, warp, origin, spacing_ijk, shape, b0, te, acq.phase_mask_power,
                                    free, bleed_rng, clear, space.bleed_shapes, space.p_bleed_on_vein,
                                    space.p_bleed_on_cortex, raster.fraction)
            del free
            for k, bleed in enumerate(new):
                bleed.id = len(carried.labelled) + k + 1
            for patch in carried.unlabelled_patches:
                apply_patch(signal, patch)
            bleeds = carried.labelled + new
        else:
            bleeds = place_microbleeds(n_wanted, template, warp, origin, spacing_ijk, shape, b0, te,
                                       acq.phase_mask_power, occupied, bleed_rng, clear, space.bleed_shapes,
                                       space.p_bleed_on_vein, space.p_bleed_on_cortex, raster.fraction)
        del clear
        labels = np.zeros(shape, np.uint16)
        for bleed in bleeds:
            apply_patch(signal, bleed.patch)
            # A carried bleed's outline may meet another's on the follow-up's grid: the first keeps the voxel.
            box = labels[bleed.label_slices]
            box[bleed.label_mask & (box == 0)] = bleed.id

    with stage("mimic_map"):
        mimics = mimic_map(raster.fraction, anatomy & NUCLEUS_BITS, (anatomy & AIR_BIT) > 0,
                           (anatomy & HEAD_BIT) > 0, faded, calcs, labels, spacing_kji, acq.phase_mask_power,
                           variation.iron)
        del anatomy, faded

    with stage("noise_and_swi"):
        wm_signal = props.signal("wm", te)
        sigma = wm_signal / acq.snr
        noise_rng = _rng(seed, index, control, "noise", visit_number)
        if acq.noise_type == "gaussian":
            # Magnitude noise added to the (k-space filtered) noise-free magnitude; the complex
            # noise only feeds the phase.
            noise_factor = kspace_effects(signal, acq)
            clean = np.abs(signal)
            add_noise(noise_rng, signal, sigma * noise_factor)
            magnitude_out = noisy_magnitude(noise_rng, signal, clean, sigma * noise_factor, acq)
            del clean
        else:
            # Noise enters in k-space with the signal: the k-space window filters both.
            add_noise(noise_rng, signal, sigma)
            noise_factor = kspace_effects(signal, acq)
            magnitude_out = noisy_magnitude(noise_rng, signal, None, sigma * noise_factor, acq)
        swi, hp_phase = reconstruct_swi(signal, acq, magnitude_out)
        del signal, magnitude_out
        image = vendor_curve(swi, acq, wm_signal)
        del swi

    name = case_name(seed, index, control)
    meta = _meta(name, seed, index, control, overrides, acq, geometry, props, warp, veins, raster, calcs, bleeds,
                 n_wanted, sigma, wm_signal, variation.iron)
    meta["acquisition"]["noise_sd_factor_kspace"] = _r(noise_factor)  # type: ignore[index]
    meta["randomisation"] = {"domain": domain, "anatomy": variation.as_dict(), "space": space.as_dict(),
                             "bleed_placement": [b.placement for b in bleeds]}
    if visit is not None and carried is not None:
        for lesion, bleed in zip(meta["lesions"], bleeds):  # type: ignore[call-overload]
            baseline_bleed = bleed.extras.get("baseline_bleed")
            lesion["status"] = "new" if baseline_bleed is None else "persisting"
            lesion["baseline_bleed"] = None if baseline_bleed is None else int(baseline_bleed)
        meta["visit"] = {"number": visit.number, "motion": visit.motion.about(head_centre).as_dict(),
                         "protocol": "another draw" if visit.new_protocol else "the baseline's",
                         "new_requested": visit.n_new, "baseline_bleeds_not_labelled": {
                             str(k): v for k, v in sorted(carried.not_labelled.items())}}
        meta["n_lesions_requested"] = len(carried.labelled) + visit.n_new
    grid_acquired = geometry
    label_of_bleed = {b.id: b.id for b in bleeds}
    maps = {"phase": hp_phase, "vein_fraction": raster.fraction} if keep_maps else {}
    vein_fraction = raster.fraction
    del raster
    if acq.oblique is not None:
        with stage("resample"):
            matrix = overrides.get("matrix")
            fixed = (overrides.get("n_slices"), *(matrix if matrix is not None else (None, None)))  # type: ignore[misc]
            geometry, image, labels, mimics, maps, label_of_bleed = _resample_case(
                meta, geometry, image, labels, mimics, maps, acq.oblique, fixed)
    del vein_fraction
    meta["mimics"]["map_codes"] = dict(MIMIC_CODES)  # type: ignore[index]
    meta["mimics"]["map_voxels"] = mimic_summary(mimics)  # type: ignore[index]
    return SynthCase(name=name, image=Volume(image, geometry), labels=labels, meta=meta, maps=maps, mimics=mimics,
                     bleeds=bleeds, acquisition_geometry=grid_acquired, label_of_bleed=label_of_bleed)


def _reserve(occupied: np.ndarray, bleed: Microbleed, shape_kji: tuple[int, int, int]) -> None:
    """Mark a bleed's outline and a one-voxel rim as taken (as place_microbleeds does)."""
    rim = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(bleed.label_slices, shape_kji))
    local = np.zeros(tuple(s.stop - s.start for s in rim), bool)
    local[tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(bleed.label_slices, rim))] = bleed.label_mask
    occupied[rim] |= ndimage.binary_dilation(local, np.ones((3, 3, 3), bool))


def _resample_case(
    meta: dict[str, object], geometry: Geometry, image: np.ndarray, labels: np.ndarray, mimics: np.ndarray,
    maps: dict[str, np.ndarray], oblique: dict[str, object], fixed_kji: tuple[int | None, int | None, int | None],
) -> tuple[Geometry, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray], dict[int, int]]:
    """The reconstructed case on its oblique / resampled grid (resample.py), with the sizes the
    user fixed (`fixed_kji`: --slices, --matrix); the metadata's matrix, shape, geometry and
    lesion entries are brought up to date (the acquisition's stay under "acquisition"). Also
    returns each acquisition id's new label id."""
    grid, shape = oblique_geometry(geometry, image.shape, oblique, fixed_kji)
    image = resample(image, geometry, grid, shape, nearest=False)
    moved = resample(labels, geometry, grid, shape, nearest=True)
    mimics = resample(mimics, geometry, grid, shape, nearest=True)
    maps = {k: resample(v.astype(np.float32, copy=False), geometry, grid, shape, nearest=False) for k, v in maps.items()}
    to_index = np.linalg.inv(grid.ijk_to_lps())
    lesions = meta["lesions"]  # type: ignore[assignment]
    centres = {}
    for lesion in lesions:  # type: ignore[union-attr]
        ijk = to_index[:3, :3] @ np.asarray(lesion["centre_lps"]) + to_index[:3, 3]
        centres[int(lesion["id"])] = ijk[::-1]
    labels, mapping = tidy_labels(moved, centres)
    mimics[labels > 0] = 0
    counts = np.bincount(labels.ravel(), minlength=len(mapping) + 1)
    kept = []
    for lesion in lesions:  # type: ignore[union-attr]
        old = int(lesion["id"])
        if old not in mapping:
            continue
        new = mapping[old]
        n = int(counts[new])
        d_app = float(equivalent_diameter_mm(n, grid.spacing))
        lesion.update({"id": new, "centre_ijk": [_r(v, 3) for v in centres[old][::-1]], "n_voxels": n,
                       "apparent_diameter_mm": _r(d_app), "size_class": size_class(d_app)})
        kept.append(lesion)
    meta["lesions_lost_in_resampling"] = len(lesions) - len(kept)  # type: ignore[arg-type]
    meta["lesions"] = kept
    meta["n_lesions"] = len(kept)
    meta["shape_kji"] = list(shape)
    meta["matrix"] = list(shape[1:])
    meta["spacing_mm"] = [_r(v, 5) for v in grid.spacing]
    meta["geometry"] = {"origin_lps": [_r(v, 4) for v in grid.origin], "spacing_mm": [_r(v, 5) for v in grid.spacing],
                        "direction": [_r(v, 8) for v in grid.direction],
                        "slice_axis": "k (array axis 0), oblique: resampled after reconstruction",
                        "b0_direction": "scanner z (the acquisition grid's k axis)",
                        "acquisition_grid": meta["geometry"]}
    meta["oblique"] = {k: ([_r(x, 5) for x in v] if isinstance(v, list) else _r(v)) for k, v in oblique.items()}  # type: ignore[arg-type]
    return grid, image, labels, mimics, maps, mapping


def _r(v: float, n: int = 4) -> float:
    return round(float(v), n)


def _lesion_entry(bleed: Microbleed, geometry: Geometry, truth: dict[str, str]) -> dict[str, object]:
    ijk = bleed.centre_kji[::-1]
    lps = geometry.index_to_lps(ijk)
    d_app = float(equivalent_diameter_mm(bleed.n_voxels, geometry.spacing))
    return {
        "id": bleed.id,
        "centre_ijk": [_r(v, 3) for v in ijk],
        "centre_lps": [_r(v, 3) for v in lps],
        "centre_mni_approx": [_r(v, 1) for v in bleed.centre_mni],
        "true_diameter_mm": _r(bleed.source.equivalent_diameter_mm),
        "apparent_diameter_mm": _r(d_app),
        "size_class": size_class(d_app),
        "target_class": bleed.target_class,
        "region": bleed.region,  # where it was drawn (the region map); the MARS truth follows
        # The MARS truth at the bleed's centre from the shipped structure map (anatomy/atlas.py).
        **truth,
        "shape": bleed.shape,
        "semi_axes_mm": [_r(v) for v in bleed.source.semi_axes_mm],
        "susceptibility_ppm": _r(bleed.source.chi_ppm),
        "n_voxels": bleed.n_voxels,
        "label_level": _r(bleed.label_level, 3),
        "lobes": len(bleed.source.lobes),
        "lobes_mm": [[_r(v, 3) for v in lobe] for lobe in bleed.source.lobes],  # x, y, z offset, radius
        "placement": bleed.placement,
    }


def _mars_truth(bleeds: list[Microbleed]) -> list[dict[str, str]]:
    if not bleeds:
        return []
    from ..anatomy.atlas import truth_at

    return truth_at(np.array([b.centre_mni for b in bleeds]))


def _meta(
    name: str, seed: int, index: int, control: bool, overrides: dict[str, object], acq: Acquisition,
    geometry: Geometry, props: TissueProperties, warp, veins, raster, calcs: list[Calcification],
    bleeds: list[Microbleed], n_wanted: int, sigma: float, wm_signal: float, iron: dict[str, float],
) -> dict[str, object]:
    acquisition = acq.as_dict()
    acquisition["noise_sigma_relative"] = _r(sigma, 6)
    acquisition["wm_signal_relative"] = _r(wm_signal, 6)
    calc_entries = []
    for c in calcs:
        ijk = c.centre_kji[::-1]
        calc_entries.append({
            "site": c.site,
            "centre_ijk": [_r(v, 3) for v in ijk],
            "centre_lps": [_r(v, 3) for v in geometry.index_to_lps(ijk)],
            "diameter_mm": _r(c.source.equivalent_diameter_mm),
            "susceptibility_ppm": _r(c.source.chi_ppm),
            "lobes": len(c.source.lobes),
            "lobes_mm": [[_r(v, 3) for v in lobe] for lobe in c.source.lobes],
        })
    shape = acq.shape
    origin = np.array(geometry.origin)
    spacing = np.array(geometry.spacing)
    return {
        "case": name,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "index": int(index),
        "control": control,
        "overrides": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(overrides.items())
                      if k != "keep_maps"},  # keep_maps changes what is returned, not the case
        "field_strength_t": acq.field_strength_t,
        "te_ms": _r(acq.te_ms, 3),
        "matrix": list(acq.matrix),
        "shape_kji": list(shape),
        "spacing_mm": [_r(s, 5) for s in geometry.spacing],
        "slice_thickness_mm": acq.slice_thickness_mm,
        "snr": _r(acq.snr, 3),
        "vendor": acq.vendor,
        "vendor_curve": {"curve": acq.contrast_curve, "params": {k: _r(v) for k, v in acq.curve_params.items()},
                         "slope_at_wm": _r(curve_slope_at_wm(acq.contrast_curve, acq.curve_params)),
                         "wm_level": _r(acq.wm_level, 2),
                         "phase_mask_power": acq.phase_mask_power, "highpass_fraction": _r(acq.highpass_fraction)},
        "noise": {"type": acq.noise_type, "coils": acq.coils},
        "acquisition": acquisition,
        "geometry": {"origin_lps": [_r(v, 4) for v in geometry.origin], "spacing_mm": [_r(s, 5) for s in geometry.spacing],
                     "direction": list(geometry.direction), "slice_axis": "k (array axis 0), inferior to superior",
                     "b0_direction": "k"},
        "pose": {"rotation_deg": [_r(a, 3) for a in warp.angles_deg], "scale": [_r(s) for s in warp.scale],
                 "deformation_rms_mm": _r(float(np.sqrt((warp.displacement**2).sum(0).mean())), 3)},
        "tissue": props.as_dict(),
        "label_rule": LABEL_RULE,
        "label_level_default": LABEL_LEVEL,
        "n_lesions": len(bleeds),
        "n_lesions_requested": n_wanted,
        "lesions": [_lesion_entry(b, geometry, t) for b, t in zip(bleeds, _mars_truth(bleeds))],
        "mimics": {
            "veins": summarise(veins),
            "vein_voxels_over_half_blood": int((raster.fraction > 0.5).sum()),
            "calcifications": calc_entries,
            "air_cavities_near_slab": air_cavities_in_view(warp, origin, spacing, shape),
            "iron_nuclei": [{"name": n.name, "iron_relative": _r(iron[n.name]), "centre_mni": list(n.centre),
                             "semi_axes_mm": list(n.semi_axes)} for n in NUCLEI],
        },
    }
