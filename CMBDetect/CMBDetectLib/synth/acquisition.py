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

from ..io import Geometry
from .anatomy import BRAIN_Z_RANGE_MNI
from .susceptibility import highpass_phase, phase_mask

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
# as a fraction of the matrix; gamma and wm_level: the intensity curve out = level*(x/x_wm)^gamma.
VENDOR_STYLE: dict[str, dict[str, tuple[float, float]]] = {
    "Siemens": {"power": (4, 4), "highpass": (0.12, 0.15), "gamma": (0.95, 1.05), "wm_level": (350, 520)},
    "Philips": {"power": (3, 5), "highpass": (0.11, 0.14), "gamma": (0.82, 0.97), "wm_level": (300, 450)},
    "GE": {"power": (3, 4), "highpass": (0.13, 0.18), "gamma": (1.03, 1.2), "wm_level": (420, 600)},
}

OVERRIDABLE = (
    "field_strength_t", "te_ms", "matrix", "slice_thickness_mm", "n_slices", "snr", "vendor",
    "fov_mm", "slab_centre_mni_z",
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
    contrast_gamma: float
    wm_level: float
    bias_amplitude: float
    slab_centre_mni_z: float
    fov_offset_mm: tuple[float, float]

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

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["matrix"] = list(self.matrix)
        d["spacing_mm"] = [round(s, 5) for s in self.spacing_ijk]
        d["pixel_spacing_mm"] = [round(s, 5) for s in self.pixel_spacing_mm]
        d["fov_mm"] = [round(self.matrix[0] * self.pixel_spacing_mm[0], 2), round(self.matrix[1] * self.pixel_spacing_mm[1], 2)]
        for key in ("te_ms", "tr_ms", "flip_deg", "snr", "highpass_fraction", "contrast_gamma", "wm_level",
                    "bias_amplitude", "slab_centre_mni_z", "slice_thickness_mm"):
            d[key] = round(float(d[key]), 4)
        d["fov_offset_mm"] = [round(v, 3) for v in self.fov_offset_mm]
        return d


def _weighted_choice(rng: np.random.Generator, weights: list[float]) -> int:
    p = np.asarray(weights, dtype=float)
    return int(rng.choice(len(p), p=p / p.sum()))


def sample_acquisition(rng: np.random.Generator, overrides: dict[str, object]) -> Acquisition:
    """Draw one protocol. Every draw happens whatever the overrides, so that overriding one
    parameter leaves the others as they would have been."""
    model, vendor, _, field = SCANNERS[_weighted_choice(rng, [s[2] for s in SCANNERS])]
    dual_is_15 = rng.random() < DUAL_FIELD_P_15T
    field_strength = field if field is not None else (1.5 if dual_is_15 else 3.0)
    rows, cols, _ = MATRICES[_weighted_choice(rng, [m[2] for m in MATRICES])]
    u = rng.random(12)  # the remaining draws, fixed in number

    if "vendor" in overrides:
        vendor = str(overrides["vendor"])
        model = next(s[0] for s in SCANNERS if s[1] == vendor)
    field_strength = float(overrides.get("field_strength_t", field_strength))
    high = field_strength > 2.0
    te = (16.0 + 14.0 * u[0]) if high else (30.0 + 20.0 * u[0])
    tr = (25.0 + 15.0 * u[1]) if high else (45.0 + 15.0 * u[1])
    flip = (10.0 + 10.0 * u[2]) if high else (15.0 + 10.0 * u[2])
    thickness = round((1.0 + 1.5 * u[3]) if high else (1.5 + 1.5 * u[3]), 1)
    te = float(overrides.get("te_ms", te))
    thickness = float(overrides.get("slice_thickness_mm", thickness))
    if "matrix" in overrides:
        rows, cols = (int(v) for v in overrides["matrix"])  # type: ignore[union-attr]

    # Field of view: 210-240 mm anterior-posterior; left-right at least 175 mm (the head with
    # its scalp), with square pixels in most protocols and rectangular ones in some.
    fov_ap = float(overrides.get("fov_mm", 210.0 + 30.0 * u[4]))
    row_spacing = fov_ap / rows
    aspect = 1.0 if u[5] < 0.7 else 1.0 + 0.25 * u[6]
    col_spacing = max(row_spacing * aspect, 175.0 / cols)
    coverage = 90.0 + 60.0 * u[7]
    n_slices = int(overrides.get("n_slices", int(np.clip(round(coverage / thickness), 16, 192))))

    voxel = row_spacing * col_spacing * thickness
    # SNR of white matter: a base level that rises with B0 (exponent chosen so 3 T / 1.5 T is
    # about 1.6 at equal voxels) and weakly with voxel volume (scanners average more for small
    # voxels). Our estimate.
    snr = (20.0 + 25.0 * u[8]) * (field_strength / 3.0) ** 0.65 * voxel ** 0.3
    snr = float(overrides.get("snr", float(np.clip(snr, 8.0, 80.0))))

    style = VENDOR_STYLE[vendor]
    lo, hi = (int(v) for v in style["power"])
    power = min(hi, lo + int(u[9] * (hi - lo + 1)))
    highpass = style["highpass"][0] + (style["highpass"][1] - style["highpass"][0]) * u[10]
    gamma = style["gamma"][0] + (style["gamma"][1] - style["gamma"][0]) * rng.random()
    level = style["wm_level"][0] + (style["wm_level"][1] - style["wm_level"][0]) * rng.random()
    bias = (0.10 + 0.20 * u[11]) if high else (0.05 + 0.10 * u[11])

    # Slab placement: a full-brain slab is centred; a shorter one lies anywhere along the brain.
    length = n_slices * thickness
    z_lo, z_hi = BRAIN_Z_RANGE_MNI
    spare = (z_hi - z_lo) - length
    centre_z = (z_lo + z_hi) / 2.0 + (rng.uniform(-0.5, 0.5) * spare if spare > 0 else rng.uniform(-5, 5))
    centre_z = float(overrides.get("slab_centre_mni_z", centre_z))
    offset = (float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8)))
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
        contrast_gamma=gamma,
        wm_level=level,
        bias_amplitude=bias,
        slab_centre_mni_z=centre_z,
        fov_offset_mm=offset,
    )


def validate_overrides(overrides: dict[str, object]) -> None:
    """Clear errors for impossible protocol overrides."""
    if "field_strength_t" in overrides and float(overrides["field_strength_t"]) not in (1.5, 3.0):  # type: ignore[arg-type]
        raise ValueError(f"field_strength_t must be 1.5 or 3.0, not {overrides['field_strength_t']}")
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


def reconstruct_swi(signal: np.ndarray, acq: Acquisition) -> tuple[np.ndarray, np.ndarray]:
    """SWI as the scanner makes it: magnitude times the high-pass phase mask to a power.
    Returns the SWI magnitude (before the vendor curve) and the high-pass phase (rad)."""
    phase = highpass_phase(signal, acq.highpass_fraction)
    swi = np.abs(signal)
    swi *= phase_mask(phase, acq.phase_mask_power)
    return swi, phase


def vendor_curve(swi: np.ndarray, acq: Acquisition, wm_signal: float) -> np.ndarray:
    """The vendor's intensity scaling: white matter lands at `wm_level` scanner units, with a
    mild power-law contrast curve; values stay positive."""
    out = swi * np.float32(1.0 / wm_signal)
    np.maximum(out, 0.0, out=out)
    if abs(acq.contrast_gamma - 1.0) > 1e-6:
        out **= np.float32(acq.contrast_gamma)
    out *= np.float32(acq.wm_level)
    return out
