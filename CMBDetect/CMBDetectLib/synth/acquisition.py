"""The scanner side: protocol parameters drawn over the paper's Table 1, the acquisition grid,
and what the scanner adds to the ideal signal (coil bias, noise, SWI reconstruction, the
vendor's intensity scaling).

From Fan et al. 2022, Table 1 (training + validation counts): the scanner models and vendors,
field strength (208 scans at 1.5 T, 1,407 at 3 T) and the 18 in-plane matrices from 224 x 256
to 768 x 624. The paper does not give TE, TR, flip angle or slice thickness; we draw them from
the ranges of common clinical SWI protocols (our estimates): TE 16-30 ms at 3 T and 30-50 ms at
1.5 T, slice thickness 1-3 mm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.fft as sfft

from ..io import Geometry
from .anatomy import BRAIN_Z_RANGE_MNI
from .space import CONTRAST_CURVES, DEFAULT_SPACE, Space
from .susceptibility import FFT_WORKERS, highpass_phase, phase_mask

# (model, vendor, count in Table 1, field strength or None for "either").
SCANNERS: tuple[tuple[str, str, int, float | None], ...] = (
    ("Verio", "Siemens", 114, 3.0),
    ("Ingenia", "Philips", 545, 3.0),
    ("Achieva", "Philips", 90, None),
    ("Trio Tim", "Siemens", 143, 3.0),
    ("Signa HDxt", "GE", 81, None),
    ("DISCOVERY MR750", "GE", 275, 3.0),
    ("Ingenia CX", "Philips", 166, 3.0),
    ("Skyra", "Siemens", 18, 3.0),
    ("Avanto", "Siemens", 118, 1.5),
    ("Aera", "Siemens", 49, 1.5),
    ("SIGNA Explorer", "GE", 14, 1.5),
    ("Prisma", "Siemens", 2, 3.0),
)
# Avanto, Aera and SIGNA Explorer give 181 of the 208 scans at 1.5 T; the other 27 must come from
# the two models sold at both field strengths (Achieva, Signa HDxt: 171 scans).
DUAL_FIELD_P_15T = 27.0 / 171.0

# In-plane matrices (rows x columns) and their counts in Table 1.
MATRICES: tuple[tuple[int, int, int], ...] = (
    (512, 384, 111), (432, 432, 616), (512, 512, 386), (256, 192, 230), (256, 232, 77),
    (480, 480, 28), (768, 624, 12), (256, 224, 51), (224, 256, 12), (320, 320, 10),
    (384, 264, 3), (320, 260, 21), (640, 520, 15), (310, 320, 1), (352, 352, 10),
    (256, 256, 29), (260, 320, 1), (560, 560, 2),
)

# Vendor reconstruction styles: stylised, our estimates (vendors do not publish them all).
# power: SWI phase-mask power (Haacke recommends 4); highpass: width of the homodyne low-pass
# as a fraction of the matrix; wm_level: where white matter lands in scanner units. The
# intensity curve itself is drawn per case from CONTRAST_CURVES (space.py), whatever the vendor.
VENDOR_STYLE: dict[str, dict[str, tuple[float, float]]] = {
    "Siemens": {"power": (4, 4), "highpass": (0.12, 0.15), "wm_level": (350, 520)},
    "Philips": {"power": (3, 5), "highpass": (0.11, 0.14), "wm_level": (300, 450)},
    "GE": {"power": (3, 4), "highpass": (0.13, 0.18), "wm_level": (420, 600)},
}
# 7 T research and clinical systems (not in the paper's Table 1).
SCANNERS_7T: dict[str, str] = {"Siemens": "MAGNETOM Terra", "Philips": "Achieva 7T", "GE": "SIGNA 7.0T"}
FIELD_STRENGTHS = (1.5, 3.0, 7.0)

OVERRIDABLE = (
    "field_strength_t", "te_ms", "matrix", "slice_thickness_mm", "n_slices", "snr", "vendor",
    "fov_mm", "slab_centre_mni_z", "contrast_curve", "noise_type", "oblique",
)


@dataclass
class Acquisition:
    vendor: str
    scanner_model: str
    field_strength_t: float
    te_ms: float
    tr_ms: float
    flip_deg: float
    matrix: tuple[int, int]  # rows (j, anterior-posterior) x columns (i, left-right)
    pixel_spacing_mm: tuple[float, float]  # (row spacing along j, column spacing along i)
    slice_thickness_mm: float
    n_slices: int
    snr: float  # white-matter signal over the noise standard deviation, before SWI processing
    phase_mask_power: int
    highpass_fraction: float
    contrast_curve: str
    curve_params: dict[str, float]
    wm_level: float
    bias_amplitude: float
    slab_centre_mni_z: float
    fov_offset_mm: tuple[float, float]
    noise_type: str = "rician"
    coils: int = 1
    kspace_fraction: tuple[float, float] = (1.0, 1.0)  # acquired share of k-space along j, i
    window_alpha: float = 0.0  # Tukey taper of the acquired k-space (0: sharp cut)
    motion: dict[str, float] | None = None  # ghosting: axis, amplitude_rad, period_lines, phase_rad
    oblique: dict[str, object] | None = None  # resampling onto another grid (see resample.py)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_slices, self.matrix[0], self.matrix[1])

    @property
    def spacing_ijk(self) -> tuple[float, float, float]:
        return (self.pixel_spacing_mm[1], self.pixel_spacing_mm[0], self.slice_thickness_mm)

    @property
    def spacing_kji(self) -> tuple[float, float, float]:
        return self.spacing_ijk[::-1]

    @property
    def t1_weighting(self) -> float:
        """Relative T1 weighting of the spoiled GRE (flip angle over TR, against 15 deg / 30 ms)."""
        return float((self.flip_deg / 15.0) * (30.0 / self.tr_ms)) ** 0.5

    @property
    def b0_te(self) -> float:
        """B0 x TE (T ms): what the held-out band of the domain split is drawn on."""
        return float(self.field_strength_t * self.te_ms)

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["matrix"] = list(self.matrix)
        d["spacing_mm"] = [round(s, 5) for s in self.spacing_ijk]
        d["pixel_spacing_mm"] = [round(s, 5) for s in self.pixel_spacing_mm]
        d["fov_mm"] = [round(self.matrix[0] * self.pixel_spacing_mm[0], 2), round(self.matrix[1] * self.pixel_spacing_mm[1], 2)]
        for key in ("te_ms", "tr_ms", "flip_deg", "snr", "highpass_fraction", "wm_level",
                    "bias_amplitude", "slab_centre_mni_z", "slice_thickness_mm", "window_alpha"):
            d[key] = round(float(d[key]), 4)
        d["b0_te_t_ms"] = round(self.b0_te, 3)
        d["curve_params"] = {k: round(float(v), 4) for k, v in self.curve_params.items()}
        d["kspace_fraction"] = [round(float(v), 4) for v in self.kspace_fraction]
        d["fov_offset_mm"] = [round(v, 3) for v in self.fov_offset_mm]
        if self.motion is not None:
            d["motion"] = {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in self.motion.items()}
        return d


def _weighted_choice(rng: np.random.Generator, weights: list[float]) -> int:
    p = np.asarray(weights, dtype=float)
    return int(rng.choice(len(p), p=p / p.sum()))


def _within(u: float, lo: float, hi: float) -> float:
    return lo + (hi - lo) * u


def _te_range(space: Space, field_strength: float) -> tuple[float, float]:
    """The echo times a field strength may draw, cut to the space's B0 x TE band (empty:
    lo > hi)."""
    lo, hi = {1.5: space.te_ms_15t, 3.0: space.te_ms_3t, 7.0: space.te_ms_7t}[field_strength]
    return max(lo, space.b0_te_band[0] / field_strength), min(hi, space.b0_te_band[1] / field_strength)


def sample_curve(rng: np.random.Generator, space: Space) -> tuple[str, dict[str, float]]:
    """A vendor-like intensity curve and its parameters (see `apply_curve`)."""
    u = rng.random(3)
    name = space.contrast_curves[min(int(u[0] * len(space.contrast_curves)), len(space.contrast_curves) - 1)]
    if name == "gamma":
        params = {"gamma": _within(u[1], 0.75, 1.3)}
    elif name == "log":
        params = {"a": float(np.exp(_within(u[1], np.log(0.5), np.log(5.0))))}
    elif name == "sigmoid":
        params = {"k": _within(u[1], 2.0, 6.0), "centre": _within(u[2], 0.55, 1.15)}
    elif name == "knee":
        params = {"knee": _within(u[1], 0.6, 1.3), "upper_slope": _within(u[2], 0.25, 0.8)}
    else:  # offset: a black level subtracted and the rest stretched
        params = {"offset": _within(u[1], 0.03, 0.3)}
    return name, params


def apply_curve(x: np.ndarray, name: str, params: dict[str, float]) -> np.ndarray:
    """The curve on x = SWI / white matter (>= 0), normalised so that x = 1 maps to 1: white
    matter keeps its level whatever the curve; in place where possible (float32)."""
    x = np.maximum(x, 0.0, out=x)
    if name == "gamma":
        if abs(params["gamma"] - 1.0) > 1e-6:
            x **= np.float32(params["gamma"])
        return x
    if name == "log":
        a = np.float32(params["a"])
        x *= a
        np.log1p(x, out=x)
        x *= np.float32(1.0 / np.log1p(params["a"]))
        return x
    if name == "sigmoid":
        k, c = params["k"], params["centre"]
        lo = 1.0 / (1.0 + np.exp(k * c))
        one = 1.0 / (1.0 + np.exp(-k * (1.0 - c)))
        x -= np.float32(c)
        x *= np.float32(-k)
        np.exp(x, out=x)
        x += np.float32(1.0)
        np.reciprocal(x, out=x)
        x -= np.float32(lo)
        x *= np.float32(1.0 / (one - lo))
        return x
    if name == "knee":
        knee, s2 = params["knee"], params["upper_slope"]
        # slope 1 below the knee, s2 above, rescaled so that 1 -> 1
        at_one = min(1.0, knee) + s2 * max(0.0, 1.0 - knee)
        over = np.maximum(x - np.float32(knee), 0.0)
        np.minimum(x, np.float32(knee), out=x)
        over *= np.float32(s2)
        x += over
        x *= np.float32(1.0 / at_one)
        return x
    if name == "offset":
        o = params["offset"]
        x -= np.float32(o)
        np.maximum(x, 0.0, out=x)
        x *= np.float32(1.0 / (1.0 - o))
        return x
    raise ValueError(f"unknown contrast curve {name!r}")


def curve_slope_at_wm(name: str, params: dict[str, float]) -> float:
    """d curve / dx at x = 1 (white matter), numerically: how the curve scales noise there."""
    x = np.array([0.99, 1.01], np.float32)
    y = apply_curve(x.copy(), name, params)
    return float((y[1] - y[0]) / 0.02)


def sample_acquisition(rng: np.random.Generator, overrides: dict[str, object], space: Space = DEFAULT_SPACE) -> Acquisition:
    """Draw one protocol. Every draw happens whatever the overrides, so that overriding one
    parameter leaves the others as they would have been."""
    model, vendor, _, field = SCANNERS[_weighted_choice(rng, [s[2] for s in SCANNERS])]
    dual_is_15 = rng.random() < DUAL_FIELD_P_15T
    field_strength = field if field is not None else (1.5 if dual_is_15 else 3.0)
    rows, cols, _ = MATRICES[_weighted_choice(rng, [m[2] for m in MATRICES])]
    u = rng.random(16)  # the remaining draws, fixed in number

    if u[12] < space.p_7t:
        field_strength, model = 7.0, SCANNERS_7T[vendor]
    if "vendor" in overrides:
        vendor = str(overrides["vendor"])
        model = SCANNERS_7T[vendor] if field_strength == 7.0 else next(s[0] for s in SCANNERS if s[1] == vendor)
    if "field_strength_t" in overrides:
        field_strength = float(overrides["field_strength_t"])  # type: ignore[arg-type]
        if field_strength == 7.0:
            model = SCANNERS_7T[vendor]
        elif not any(s[0] == model and (s[3] is None or s[3] == field_strength) for s in SCANNERS):
            model = next(s[0] for s in SCANNERS if s[1] == vendor and s[3] in (None, field_strength))
    elif "te_ms" not in overrides:
        # The domain's B0 x TE band may rule this field strength out: move to the nearest one
        # that reaches the band (1.5 T can never reach a long-TE band; 7 T always can).
        lo, hi = _te_range(space, field_strength)
        if lo > hi:
            reachable = [b for b in FIELD_STRENGTHS if _te_range(space, b)[0] <= _te_range(space, b)[1]]
            if not reachable:
                raise ValueError(f"no field strength reaches the B0 x TE band {space.b0_te_band}")
            field_strength = reachable[min(int(u[13] * len(reachable)), len(reachable) - 1)]
            model = SCANNERS_7T[vendor] if field_strength == 7.0 else next(
                s[0] for s in SCANNERS if s[1] == vendor and s[3] in (None, field_strength))
    high = field_strength > 2.0
    te_lo, te_hi = _te_range(space, field_strength)
    te = _within(u[0], te_lo, max(te_lo, te_hi))
    tr = (25.0 + 15.0 * u[1]) if high else (45.0 + 15.0 * u[1])
    flip = (10.0 + 10.0 * u[2]) if high else (15.0 + 10.0 * u[2])
    thick_range = {1.5: space.thickness_mm_15t, 3.0: space.thickness_mm_3t, 7.0: space.thickness_mm_7t}[field_strength]
    thickness = round(_within(u[3], *thick_range), 1)
    te = float(overrides.get("te_ms", te))  # type: ignore[arg-type]
    thickness = float(overrides.get("slice_thickness_mm", thickness))  # type: ignore[arg-type]
    if "matrix" in overrides:
        rows, cols = (int(v) for v in overrides["matrix"])  # type: ignore[union-attr]

    # Field of view: anterior-posterior from the space; left-right at least `min_fov_lr_mm`
    # (below about 175 mm the sides of the head are cut), with square pixels in most protocols
    # and rectangular ones in some.
    fov_ap = float(overrides.get("fov_mm", _within(u[4], *space.fov_ap_mm)))  # type: ignore[arg-type]
    row_spacing = fov_ap / rows
    aspect = 1.0 if u[5] < 0.7 else 1.0 + 0.25 * u[6]
    col_spacing = max(row_spacing * aspect, space.min_fov_lr_mm / cols)
    coverage = _within(u[7], *space.coverage_mm)
    n_slices = int(overrides.get("n_slices", int(np.clip(round(coverage / thickness), 16, 192))))  # type: ignore[arg-type]

    voxel = row_spacing * col_spacing * thickness
    # SNR of white matter: a base level that rises with B0 (exponent chosen so 3 T / 1.5 T is
    # about 1.6 at equal voxels) and weakly with voxel volume (scanners average more for small
    # voxels), times the space's spread. Our estimate.
    snr = (20.0 + 25.0 * u[8]) * (field_strength / 3.0) ** 0.65 * voxel ** 0.3 * _within(u[14], *space.snr_scale)
    snr = float(overrides.get("snr", float(np.clip(snr, 6.0, 100.0))))  # type: ignore[arg-type]

    style = VENDOR_STYLE[vendor]
    lo, hi = (int(v) for v in style["power"])
    power = min(hi, lo + int(u[9] * (hi - lo + 1)))
    highpass = style["highpass"][0] + (style["highpass"][1] - style["highpass"][0]) * u[10]
    level = style["wm_level"][0] + (style["wm_level"][1] - style["wm_level"][0]) * rng.random()
    bias = _within(u[11], *space.bias_amplitude) * (1.0 if high else 0.6)  # less coil bias at 1.5 T

    # Slab placement: a full-brain slab is centred; a shorter one lies anywhere along the brain,
    # and may reach beyond it (the brain cut at the top or bottom of the slab).
    length = n_slices * thickness
    z_lo, z_hi = BRAIN_Z_RANGE_MNI
    spare = (z_hi - z_lo) - length
    centre_z = (z_lo + z_hi) / 2.0 + (rng.uniform(-0.6, 0.6) * spare if spare > 0 else rng.uniform(-10, 10))
    centre_z = float(overrides.get("slab_centre_mni_z", centre_z))  # type: ignore[arg-type]
    offset = (float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8)))

    # The scanner side, drawn in a fixed order.
    curve, params = sample_curve(rng, space)
    if "contrast_curve" in overrides:
        curve = str(overrides["contrast_curve"])
        params = sample_curve(np.random.default_rng(int(u[15] * 2**31)), Space(contrast_curves=(curve,)))[1]
    v = rng.random(12)
    noise_type = space.noise_types[min(int(v[0] * len(space.noise_types)), len(space.noise_types) - 1)]
    noise_type = str(overrides.get("noise_type", noise_type))
    coils = int(round(_within(v[1], *space.coils))) if noise_type == "noncentral_chi" else 1
    if v[2] < space.p_full_kspace:
        fraction = (1.0, 1.0)
    else:
        fraction = (_within(v[3], *space.kspace_fraction), _within(v[4], *space.kspace_fraction))
    # The taper belongs to a truncated acquisition: a fully sampled k-space is left as it is.
    alpha = _within(v[5], *space.window_alpha) if fraction != (1.0, 1.0) else 0.0
    motion = None
    if v[6] < space.p_motion:
        lo_p, hi_p = space.motion_period_lines
        motion = {"axis": "j" if v[7] < 0.7 else "i", "amplitude_rad": _within(v[8], *space.motion_rad),
                  "period_lines": int(lo_p + int(v[9] * (hi_p - lo_p + 1)) if hi_p > lo_p else lo_p),
                  "phase_rad": float(2 * np.pi * v[10])}
    oblique = None
    if v[11] < space.p_oblique:
        w = rng.random(6)
        axis = rng.normal(size=3)
        oblique = {
            "axis": [float(a) for a in axis / max(np.linalg.norm(axis), 1e-9)],
            "angle_deg": _within(w[0], *space.oblique_deg),
            "spacing_mm": _within(w[1], *space.resample_spacing_mm),
            "aspect": 1.0 if w[2] < 0.6 else _within(w[3], 1.0, 1.3),
            "thickness_mm": _within(w[4], *space.resample_thickness_mm),
        }
    else:
        rng.random(6)
        rng.normal(size=3)
    if "oblique" in overrides:
        oblique = overrides["oblique"] if overrides["oblique"] else None  # type: ignore[assignment]
    return Acquisition(
        vendor=vendor,
        scanner_model=model,
        field_strength_t=field_strength,
        te_ms=te,
        tr_ms=tr,
        flip_deg=flip,
        matrix=(rows, cols),
        pixel_spacing_mm=(row_spacing, col_spacing),
        slice_thickness_mm=thickness,
        n_slices=n_slices,
        snr=snr,
        phase_mask_power=power,
        highpass_fraction=highpass,
        contrast_curve=curve,
        curve_params=params,
        wm_level=level,
        bias_amplitude=bias,
        slab_centre_mni_z=centre_z,
        fov_offset_mm=offset,
        noise_type=noise_type,
        coils=coils,
        kspace_fraction=fraction,
        window_alpha=alpha,
        motion=motion,
        oblique=oblique,  # type: ignore[arg-type]
    )


def validate_overrides(overrides: dict[str, object]) -> None:
    """Clear errors for impossible protocol overrides."""
    if "field_strength_t" in overrides and float(overrides["field_strength_t"]) not in FIELD_STRENGTHS:  # type: ignore[arg-type]
        raise ValueError(f"field_strength_t must be 1.5, 3.0 or 7.0, not {overrides['field_strength_t']}")
    if "contrast_curve" in overrides and overrides["contrast_curve"] not in CONTRAST_CURVES:
        raise ValueError(f"contrast_curve must be one of {list(CONTRAST_CURVES)}, not {overrides['contrast_curve']!r}")
    if "noise_type" in overrides and overrides["noise_type"] not in DEFAULT_SPACE.noise_types:
        raise ValueError(f"noise_type must be one of {list(DEFAULT_SPACE.noise_types)}, not {overrides['noise_type']!r}")
    if "oblique" in overrides and overrides["oblique"]:
        o = overrides["oblique"]
        keys = {"axis", "angle_deg", "spacing_mm", "aspect", "thickness_mm"}
        if not isinstance(o, dict) or set(o) != keys:
            raise ValueError(f"oblique must be False or a dict with keys {sorted(keys)}, not {o!r}")
    if "te_ms" in overrides and not 2.0 <= float(overrides["te_ms"]) <= 80.0:  # type: ignore[arg-type]
        raise ValueError(f"te_ms must lie in 2-80 ms, not {overrides['te_ms']}")
    if "matrix" in overrides:
        m = overrides["matrix"]
        if not (isinstance(m, (tuple, list)) and len(m) == 2 and all(int(v) == v and 32 <= int(v) <= 1024 for v in m)):
            raise ValueError(f"matrix must be (rows, cols) with each 32-1024, not {m!r}")
    if "slice_thickness_mm" in overrides and not 0.5 <= float(overrides["slice_thickness_mm"]) <= 5.0:  # type: ignore[arg-type]
        raise ValueError(f"slice_thickness_mm must lie in 0.5-5 mm, not {overrides['slice_thickness_mm']}")
    if "n_slices" in overrides and not (int(overrides["n_slices"]) == overrides["n_slices"] and 4 <= int(overrides["n_slices"]) <= 400):  # type: ignore[arg-type]
        raise ValueError(f"n_slices must be an integer 4-400, not {overrides['n_slices']}")
    if "snr" in overrides and not 1.0 <= float(overrides["snr"]) <= 1000.0:  # type: ignore[arg-type]
        raise ValueError(f"snr must lie in 1-1000, not {overrides['snr']}")
    if "vendor" in overrides and overrides["vendor"] not in VENDOR_STYLE:
        raise ValueError(f"vendor must be one of {sorted(VENDOR_STYLE)}, not {overrides['vendor']!r}")
    if "fov_mm" in overrides and not 100.0 <= float(overrides["fov_mm"]) <= 300.0:  # type: ignore[arg-type]
        raise ValueError(f"fov_mm must lie in 100-300 mm, not {overrides['fov_mm']}")
    if "slab_centre_mni_z" in overrides and not -100.0 <= float(overrides["slab_centre_mni_z"]) <= 120.0:  # type: ignore[arg-type]
        raise ValueError(f"slab_centre_mni_z must lie in -100..120 mm, not {overrides['slab_centre_mni_z']}")


def acquisition_geometry(acq: Acquisition, slab_centre_lps: np.ndarray) -> Geometry:
    """Axial slices in scanner LPS (identity direction), slice axis k inferior to superior,
    the grid centred on `slab_centre_lps` (x, y, z)."""
    spacing = np.array(acq.spacing_ijk)
    n = np.array([acq.matrix[1], acq.matrix[0], acq.n_slices], dtype=float)
    origin = np.asarray(slab_centre_lps, dtype=float) - (n - 1) / 2.0 * spacing
    return Geometry(tuple(float(s) for s in spacing), tuple(float(o) for o in origin))


def bias_field(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    amplitude: float,
    at: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """A smooth multiplicative receive-coil bias: exp of a random quadratic polynomial over the
    field of view, scaled so its 5-95 % range spans about 2 * amplitude. `at` gives the (k, j,
    i) voxel positions to evaluate it on (default: every voxel of `shape`)."""
    c = rng.normal(0.0, 1.0, 10)
    positions = at if at is not None else tuple(np.arange(n) for n in shape)
    z, y, x = (
        (np.asarray(p, dtype=np.float32) / max(n - 1, 1) * 2.0 - 1.0).astype(np.float32)
        for p, n in zip(positions, shape)
    )
    log = np.zeros((len(z), len(y), len(x)), np.float32)
    log += (c[0] * z + c[1] * z * z)[:, None, None]
    log += (c[2] * y + c[3] * y * y)[None, :, None]
    log += (c[4] * x + c[5] * x * x)[None, None, :]
    log += (c[6] * np.outer(y, x))[None, :, :]
    log += (c[7] * np.outer(z, x))[:, None, :]
    log += (c[8] * np.outer(z, y))[:, :, None]
    sub = log[:: max(1, len(z) // 8), :: max(1, len(y) // 16), :: max(1, len(x) // 16)]
    lo, hi = np.percentile(sub, [5, 95])
    log -= np.float32((lo + hi) / 2.0)
    log *= np.float32(2.0 * amplitude / max(hi - lo, 1e-6))
    return np.exp(log, out=log)


def add_noise(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> None:
    """Complex Gaussian noise of standard deviation sigma per channel, in place: the magnitude
    is then Rician, the phase noisy where signal is low."""
    pairs = signal.view(np.float32)  # real and imaginary parts side by side
    noise = rng.standard_normal(pairs.shape, dtype=np.float32)
    noise *= np.float32(sigma)
    pairs += noise


def noisy_magnitude(
    rng: np.random.Generator, signal: np.ndarray, clean: np.ndarray | None, sigma: float, acq: Acquisition
) -> np.ndarray:
    """The magnitude image for the case's noise type, from the noisy complex signal (which
    also gives the phase) and, for Gaussian noise, the noise-free magnitude:
    - rician: |s + n|, one receive channel (or an optimally combined, phase-preserving array);
    - gaussian: |s| + n, the magnitude noise of a high-SNR or complex-averaged reconstruction
      (can go below zero; the curve clips it);
    - noncentral_chi: root sum of squares over `coils` channels, the signal in one of them:
      sqrt(|s + n|^2 + sigma^2 * chi2 with 2 (coils - 1) degrees of freedom)."""
    magnitude = np.abs(signal)
    if acq.noise_type == "gaussian":
        assert clean is not None
        noise = rng.standard_normal(magnitude.shape, dtype=np.float32)
        noise *= np.float32(sigma)
        noise += clean
        return noise
    if acq.noise_type == "noncentral_chi" and acq.coils > 1:
        extra = rng.standard_gamma(float(acq.coils - 1), size=magnitude.shape, dtype=np.float32)
        extra *= np.float32(2.0 * sigma * sigma)  # chi2(2m) = 2 Gamma(m), per unit variance
        magnitude *= magnitude
        magnitude += extra
        np.sqrt(magnitude, out=magnitude)
    return magnitude


def _tukey(n: int, fraction: float, alpha: float) -> np.ndarray:
    """k-space weights along one axis, FFT order: 1 over the central `fraction` of k-space
    with cosine tapers on its outer `alpha` part, 0 beyond (not acquired)."""
    k = np.abs(np.fft.fftfreq(n)) * 2.0  # 0 at the centre, 1 at the edge
    w = np.zeros(n, np.float32)
    inside = k <= fraction + 1e-9
    w[inside] = 1.0
    if alpha > 0:
        start = fraction * (1.0 - alpha)
        ramp = inside & (k > start)
        w[ramp] = 0.5 * (1.0 + np.cos(np.pi * (k[ramp] - start) / max(fraction - start, 1e-9)))
    return w


def kspace_effects(signal: np.ndarray, acq: Acquisition) -> float:
    """What the acquisition does in k-space, slice by slice, in place: only the central
    `kspace_fraction` of k-space is acquired (the image is zero-filled to the matrix: lower
    resolution), the edge is tapered by a Tukey window (alpha 0 is a sharp cut: Gibbs ringing
    at every sharp edge), and with `motion`, every `period_lines`-th phase-encode line carries
    a phase error (periodic motion: ghosts along that axis). Returns the factor by which the
    noise standard deviation falls (the filter removes noise power outside the window)."""
    rows, cols = acq.matrix
    fj, fi = acq.kspace_fraction
    wj = _tukey(rows, fj, acq.window_alpha) if fj < 1.0 else np.ones(rows, np.float32)
    wi = _tukey(cols, fi, acq.window_alpha) if fi < 1.0 else np.ones(cols, np.float32)
    noise_factor = float(np.sqrt(np.mean(wj**2) * np.mean(wi**2)))
    if acq.motion is None and np.all(wj == 1.0) and np.all(wi == 1.0):
        return 1.0
    weights = np.outer(wj, wi).astype(np.complex64)
    if acq.motion is not None:
        axis = acq.motion["axis"]
        n = rows if axis == "j" else cols
        lines = np.arange(n)
        hit = (lines % int(acq.motion["period_lines"])) == 0
        # The moving head shifts the phase of the lines acquired at one point of its cycle.
        error = np.where(hit, np.exp(1j * acq.motion["amplitude_rad"] * np.cos(acq.motion["phase_rad"])), 1.0)
        weights *= (error[:, None] if axis == "j" else error[None, :]).astype(np.complex64)
    for k in range(signal.shape[0]):  # slice by slice: a 2D FFT of one slice stays small in memory
        spectrum = sfft.fft2(signal[k], workers=FFT_WORKERS)
        spectrum *= weights
        signal[k] = sfft.ifft2(spectrum, workers=FFT_WORKERS, overwrite_x=True)
    return noise_factor


def reconstruct_swi(signal: np.ndarray, acq: Acquisition, magnitude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SWI as the scanner makes it: magnitude times the high-pass phase mask to a power.
    Returns the SWI magnitude (before the vendor curve) and the high-pass phase (rad).
    `magnitude` replaces |signal| (other noise types, see noisy_magnitude)."""
    phase = highpass_phase(signal, acq.highpass_fraction)
    swi = np.abs(signal) if magnitude is None else magnitude
    swi *= phase_mask(phase, acq.phase_mask_power)
    return swi, phase


def vendor_curve(swi: np.ndarray, acq: Acquisition, wm_signal: float) -> np.ndarray:
    """The vendor's intensity curve: white matter lands at `wm_level` scanner units, the rest
    through the case's contrast curve; values stay positive."""
    out = swi * np.float32(1.0 / wm_signal)
    out = apply_curve(out, acq.contrast_curve, acq.curve_params)
    out *= np.float32(acq.wm_level)
    return out
