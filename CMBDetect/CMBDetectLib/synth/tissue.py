"""MR properties of the tissues and the per-case tissue maps: GRE magnitude and susceptibility.

Each template channel (grey and white matter, CSF, iron, air, bone, marrow, scalp) gets an
effective proton density (already T1-weighted by the SWI's short TR and small flip angle), an
R2* at the field strength, and a susceptibility. The magnitude at echo time TE is
PD_eff * exp(-TE * R2*); iron adds R2* and paramagnetic susceptibility in proportion to its load.

Sources for the orders of magnitude (the exact numbers are our estimates, varied per case):
- R2* of white matter about 20 s^-1 and of cortical grey matter about 15-17 s^-1 at 3 T, roughly
  in proportion to B0; the globus pallidus reaches about 40-50 s^-1 at 3 T.
- Susceptibility differences (ppm, SI) relative to white matter: grey matter +0.02 to +0.05,
  pallidum and nigra +0.1 to +0.2, deoxygenated venous blood about +0.45, air +9.4.
- Venous blood: R2* 45-70 s^-1 at 3 T, 12-25 s^-1 at 1.5 T (oxygen saturation 55-70 %).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .anatomy import CHANNELS

AIR_TISSUE_CHI_PPM = 9.4  # air (+0.36 ppm) against tissue (about -9.05 ppm), SI


@dataclass(frozen=True)
class TissueProperties:
    """Per-case MR properties; PD relative to white matter, R2* in 1/s, chi in ppm (SI)."""

    pd: dict[str, float]
    r2s: dict[str, float]
    chi: dict[str, float]
    iron_r2s: float  # extra R2* at iron load 1 (globus pallidus)
    iron_chi: float  # extra chi at iron load 1
    blood_pd: float
    blood_r2s: float
    vein_chi: float  # deoxygenated blood against tissue
    notes: dict[str, float] = field(default_factory=dict)

    def signal(self, name: str, te_ms: float) -> float:
        return self.pd[name] * float(np.exp(-te_ms * 1e-3 * self.r2s[name]))

    def as_dict(self) -> dict[str, object]:
        return {
            "pd_relative": {k: round(v, 4) for k, v in self.pd.items()},
            "r2star_per_s": {k: round(v, 2) for k, v in self.r2s.items()},
            "chi_ppm": {k: round(v, 4) for k, v in self.chi.items()},
            "iron_r2star_per_s": round(self.iron_r2s, 2),
            "iron_chi_ppm": round(self.iron_chi, 4),
            "venous_blood": {
                "pd_relative": round(self.blood_pd, 3),
                "r2star_per_s": round(self.blood_r2s, 2),
                "chi_ppm": round(self.vein_chi, 4),
            },
        }


def sample_tissue(rng: np.random.Generator, field_strength_t: float, t1_weighting: float) -> TissueProperties:
    """Draw tissue properties for one case.

    `t1_weighting` (about 0.7-1.4) is how strongly TR and flip angle favour short-T1 tissue:
    more of it darkens CSF and grey matter against white matter."""
    b = field_strength_t / 3.0
    w = t1_weighting
    # PD_eff values are chosen so that, at the usual TE, white matter is 5-15 % brighter than
    # cortex and CSF is brighter than white matter, as on clinical SWI magnitude images.
    pd = {
        "wm": 1.0,
        "gm": rng.uniform(0.80, 0.86) * w ** -0.1,
        "csf": rng.uniform(0.6, 0.78) * w ** -0.5,
        "iron": 0.0,
        "air": 0.0,
        "bone": rng.uniform(0.03, 0.08),
        "marrow": rng.uniform(0.55, 0.8),
        "scalp": rng.uniform(0.85, 1.15),
    }
    r2s = {
        "wm": rng.uniform(19.0, 22.0) * b ** 0.9,
        "gm": rng.uniform(14.5, 17.0) * b ** 0.9,
        "csf": 2.0 * b,
        "iron": 0.0,
        "air": 0.0,
        "bone": 400.0 * b,
        "marrow": 60.0 * b,
        "scalp": 30.0 * b,
    }
    chi = {
        "wm": rng.uniform(-0.035, -0.02),
        "gm": rng.uniform(0.0, 0.015),
        "csf": 0.0,
        "iron": 0.0,
        "air": AIR_TISSUE_CHI_PPM,
        "bone": 0.0,  # left out: its field is smooth inside the brain and SWI filters it away
        "marrow": 0.0,
        "scalp": 0.0,
    }
    saturation = rng.uniform(0.55, 0.70)  # venous oxygen saturation
    # 3.39 ppm (SI) between fully deoxygenated and oxygenated blood, haematocrit about 0.42.
    vein_chi = 3.39 * rng.uniform(0.38, 0.45) * (1.0 - saturation)
    return TissueProperties(
        pd=pd,
        r2s=r2s,
        chi=chi,
        iron_r2s=rng.uniform(26.0, 34.0) * b,
        iron_chi=rng.uniform(0.14, 0.2),
        blood_pd=0.9,
        # 45-70 s^-1 at 3 T, rising about in proportion to B0 above it (7 T: 105-165)
        blood_r2s=(rng.uniform(45.0, 70.0) * max(1.0, field_strength_t / 3.0) if field_strength_t > 2
                   else rng.uniform(12.0, 25.0)),
        vein_chi=float(vein_chi),
        notes={"venous_saturation": float(saturation), "t1_weighting": float(w)},
    )


def tissue_maps(
    channels: np.ndarray, props: TissueProperties, te_ms: float,
    iron_scale: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude at TE and susceptibility (ppm) on a template-space crop.

    `channels` is a (len(CHANNELS), ...) uint8 stack of fractions * 255; `iron_scale`
    (optional: flat indices and multipliers) scales the iron load there (the case's iron per
    nucleus)."""
    te = te_ms * 1e-3
    scale = np.float32(1.0 / 255.0)
    magnitude = np.zeros(channels.shape[1:], np.float32)
    chi = np.zeros(channels.shape[1:], np.float32)
    for index, name in enumerate(CHANNELS):
        if name == "iron":
            continue
        s = props.signal(name, te_ms)
        if s:
            magnitude += channels[index] * np.float32(s * scale)
        if props.chi[name]:
            chi += channels[index] * np.float32(props.chi[name] * scale)
    iron = channels[CHANNELS.index("iron")] * scale
    if iron_scale is not None:
        flat, factor = iron_scale
        iron.ravel()[flat] *= factor
    magnitude *= np.exp(-te * props.iron_r2s * iron)
    chi += iron * np.float32(props.iron_chi)
    return magnitude, chi
