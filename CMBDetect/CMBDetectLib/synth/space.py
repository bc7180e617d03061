"""The randomisation space of the synthetic engine, and its domains.

Every factor a case draws beyond the anatomy template lives here as a range (or a set of
choices), in one frozen dataclass, `Space`. The defaults are the widened space of generator
2.0 (issue 11): vendor-like contrast curves, bias fields, noise types and levels, k-space
resolution and Gibbs ringing, motion ghosts, 7 T and long echo times, thick and thin slices,
oblique resampled grids, vein density, calibre and tortuosity, calcification shapes and sizes,
iron levels of the deep nuclei, lobulated bleeds, bleeds touching veins or the cortex, partial
coverage. Any range can be overridden per call (`generate_case(..., space={...})`), and a
*domain* restricts the space so that a model can be trained on one part and tested on a part
it never saw:

- ``all``: the whole space (the default);
- ``train``: every contrast curve but the held-out one, and B0 x TE at most ``band_split`` - 0.5;
- ``shifted``: only the held-out contrast curve, and B0 x TE at least ``band_split`` + 0.5 (3 T
  with a long TE, or 7 T): both held-out parameters at once.

B0 x TE (tesla x ms) is what sets the phase a given susceptibility leaves (phase per ppm =
gamma B0 TE), and so how strongly veins, bleeds and air edges bloom: the natural axis along
which a scanner "not seen" differs. The two domains never overlap in either held-out
parameter (tested).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

DOMAINS = ("all", "train", "shifted")
# The two domains keep this gap (T ms) around the split, half on each side, so that rounding
# in the metadata (TE to 0.001 ms) never puts a case on the wrong side.
BAND_GAP = 1.0

# Vendor-like nonlinear intensity curves applied to x = SWI / white matter (white matter -> 1).
CONTRAST_CURVES = ("gamma", "log", "sigmoid", "knee", "offset")


@dataclass(frozen=True)
class Space:
    """Ranges (lo, hi) and choices of every randomised factor. Probabilities are per case."""

    # Protocol (acquisition.py)
    p_7t: float = 0.08  # share of 7 T scans (the rest follow Table 1's 1.5 T / 3 T mix)
    te_ms_15t: tuple[float, float] = (25.0, 55.0)
    te_ms_3t: tuple[float, float] = (12.0, 40.0)
    te_ms_7t: tuple[float, float] = (8.0, 25.0)
    b0_te_band: tuple[float, float] = (0.0, 1000.0)  # allowed B0 x TE, T ms (domains narrow it)
    thickness_mm_15t: tuple[float, float] = (1.2, 4.0)
    thickness_mm_3t: tuple[float, float] = (0.8, 3.0)
    thickness_mm_7t: tuple[float, float] = (0.5, 2.0)
    fov_ap_mm: tuple[float, float] = (185.0, 250.0)
    min_fov_lr_mm: float = 150.0  # below about 175 mm the sides of the head are cut
    coverage_mm: tuple[float, float] = (30.0, 160.0)  # slab length: partial coverage when short
    snr_scale: tuple[float, float] = (0.55, 1.6)  # times the protocol's white-matter SNR
    # Scanner side
    contrast_curves: tuple[str, ...] = CONTRAST_CURVES
    bias_amplitude: tuple[float, float] = (0.0, 0.45)
    noise_types: tuple[str, ...] = ("rician", "gaussian", "noncentral_chi")
    coils: tuple[int, int] = (2, 16)  # receive channels, for non-central chi noise
    p_full_kspace: float = 0.35  # otherwise only a fraction of k-space is acquired
    kspace_fraction: tuple[float, float] = (0.7, 1.0)  # per in-plane axis
    window_alpha: tuple[float, float] = (0.0, 1.0)  # Tukey taper of a truncated k-space; 0 = sharp cut: most Gibbs ringing, 1 = Hann
    p_motion: float = 0.35
    motion_rad: tuple[float, float] = (0.05, 0.6)  # phase error of the ghosting k-space lines
    motion_period_lines: tuple[int, int] = (2, 16)
    p_oblique: float = 0.3  # resampled onto an oblique / other-spacing grid after reconstruction
    oblique_deg: tuple[float, float] = (3.0, 20.0)
    resample_spacing_mm: tuple[float, float] = (0.45, 1.2)  # in-plane of the resampled grid
    resample_thickness_mm: tuple[float, float] = (0.8, 3.0)
    # Anatomy side
    vein_density: tuple[float, float] = (0.6, 1.6)
    vein_calibre: tuple[float, float] = (0.7, 1.5)
    vein_tortuosity: tuple[float, float] = (0.5, 2.0)
    iron_scale: tuple[float, float] = (0.6, 1.5)  # all nuclei (age)
    iron_nucleus: tuple[float, float] = (0.7, 1.3)  # each nucleus on top
    calcification_size: tuple[float, float] = (0.6, 1.6)  # times the site's diameter range
    calcification_rate: tuple[float, float] = (0.5, 1.5)  # times the site's prevalence
    p_calcification_lobulated: float = 0.4
    # Microbleeds
    bleed_shapes: tuple[tuple[str, float], ...] = (("sphere", 0.4), ("ellipsoid", 0.35), ("lobulated", 0.25))
    p_bleed_on_vein: float = 0.12  # placed touching a vein
    p_bleed_on_cortex: float = 0.12  # placed at the cortical surface (tissue meets CSF)
    # Domain split
    held_out_curve: str = "sigmoid"
    band_split: float = 100.0  # B0 x TE, T ms

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


DEFAULT_SPACE = Space()


def _as_range(name: str, value: object) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"space override {name} must be a (lo, hi) pair, not {value!r}")
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise ValueError(f"space override {name}: lo {lo} is above hi {hi}")
    return (lo, hi)


def space_for(domain: str = "all", overrides: dict[str, object] | None = None) -> Space:
    """The space of a domain, with range overrides applied first (so a domain can be drawn
    from an overridden space, e.g. another held-out curve)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {list(DOMAINS)}, not {domain!r}")
    space = DEFAULT_SPACE
    if overrides:
        known = {f.name: f for f in fields(Space)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"unknown space override(s) {unknown}; known: {sorted(known)}")
        changes: dict[str, object] = {}
        for name, value in overrides.items():
            default = getattr(DEFAULT_SPACE, name)
            if name in ("contrast_curves", "noise_types"):
                allowed = CONTRAST_CURVES if name == "contrast_curves" else DEFAULT_SPACE.noise_types
                chosen = tuple(str(v) for v in (value if isinstance(value, (tuple, list)) else [value]))
                bad = [v for v in chosen if v not in allowed]
                if not chosen or bad:
                    raise ValueError(f"space override {name}: choose from {list(allowed)}, not {list(chosen)}")
                changes[name] = chosen
            elif name == "bleed_shapes":
                changes[name] = tuple((str(a), float(b)) for a, b in value)  # type: ignore[union-attr]
            elif name == "held_out_curve":
                if value not in CONTRAST_CURVES:
                    raise ValueError(f"held_out_curve must be one of {list(CONTRAST_CURVES)}, not {value!r}")
                changes[name] = str(value)
            elif isinstance(default, tuple):
                lo, hi = _as_range(name, value)
                changes[name] = (int(lo), int(hi)) if isinstance(default[0], int) else (lo, hi)
            else:
                v = float(value)  # type: ignore[arg-type]
                if name.startswith("p_") and not 0.0 <= v <= 1.0:
                    raise ValueError(f"space override {name} is a probability (0-1), not {v}")
                changes[name] = v
        space = replace(space, **changes)  # type: ignore[arg-type]
    if domain == "train":
        curves = tuple(c for c in space.contrast_curves if c != space.held_out_curve)
        band = (space.b0_te_band[0], min(space.b0_te_band[1], space.band_split - BAND_GAP / 2))
        space = replace(space, contrast_curves=curves, b0_te_band=band)
    elif domain == "shifted":
        band = (max(space.b0_te_band[0], space.band_split + BAND_GAP / 2), space.b0_te_band[1])
        space = replace(space, contrast_curves=(space.held_out_curve,), b0_te_band=band)
    if not space.contrast_curves:
        raise ValueError(f"domain {domain!r} leaves no contrast curve to draw from")
    if space.b0_te_band[0] >= space.b0_te_band[1]:
        raise ValueError(f"domain {domain!r} leaves an empty B0 x TE band {space.b0_te_band}")
    return space


def in_domain(meta: dict[str, object], domain: str, space: Space = DEFAULT_SPACE) -> bool:
    """Whether a generated case's held-out parameters lie in `domain` (for checks)."""
    curve = meta["vendor_curve"]["curve"]  # type: ignore[index]
    b0_te = float(meta["field_strength_t"]) * float(meta["te_ms"])  # type: ignore[arg-type]
    if domain == "train":
        return curve != space.held_out_curve and b0_te <= space.band_split
    if domain == "shifted":
        return curve == space.held_out_curve and b0_te > space.band_split
    return True
