"""A second visit of one synthetic subject: the head moved, the baseline's bleeds carried over,
new bleeds added (the follow-up half of `cmbdetect synth --pairs`).

The subject is the baseline's: the same seed and index, so the same anatomy, veins,
calcifications and tissue draws. What changes between visits:
- the head's pose: a rigid motion (rotation about the head centre, then a shift) applied after
  the baseline's pose and deformation. The deformation lattice is resampled through the motion
  (trilinear, on its 15 mm lattice), so anatomy follows the motion to a fraction of a millimetre;
  bleeds follow it exactly (their centres are mapped, their sources rotated);
- coil bias and noise (another scan), and, on request, the protocol (another acquisition draw);
- new bleeds, placed only where the baseline also has image (so that a reader could compare).

Bleeds persist (haemosiderin stays): a baseline bleed is never removed at follow-up. One that
the follow-up's slab misses, or that is too faint to outline on its protocol, is still there
physically and is recorded as not labelled at follow-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy.spatial.transform import Rotation

from ..io import Geometry
from .microbleeds import Microbleed, outline
from .susceptibility import SourcePatch, Source, overlap_slices, simulate_source, visibility
from .warp import LATTICE_HALF_EXTENT_MM, LATTICE_SPACING_MM, Warp

MAX_ROTATION_DEG = 10.0
MAX_SHIFT_MM = 10.0
# New bleeds keep this far (voxels, k j i) inside the baseline's grid, so a reader sees the place at baseline.
BASELINE_MARGIN_VOXELS = np.array([1.0, 3.0, 3.0])


@dataclass(frozen=True)
class Motion:
    """Rigid head motion between visits, in the scanner's LPS millimetres:
    x_followup = R (x_baseline - c) + c + shift, c the head centre at baseline."""

    rotation: np.ndarray  # 3x3
    shift_mm: np.ndarray  # (3,)
    centre_lps: np.ndarray  # (3,)
    angle_deg: float
    axis: np.ndarray  # unit rotation axis (LPS)

    def matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix taking baseline LPS points to follow-up LPS points."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.centre_lps + self.shift_mm - self.rotation @ self.centre_lps
        return m

    def apply(self, points_lps: np.ndarray) -> np.ndarray:
        m = self.matrix()
        return np.atleast_2d(points_lps) @ m[:3, :3].T + m[:3, 3]

    def inverse_apply(self, points_lps: np.ndarray) -> np.ndarray:
        m = np.linalg.inv(self.matrix())
        return np.atleast_2d(points_lps) @ m[:3, :3].T + m[:3, 3]

    def about(self, centre_lps: np.ndarray) -> "Motion":
        return replace(self, centre_lps=np.asarray(centre_lps, float))

    def as_dict(self) -> dict[str, object]:
        return {
            "matrix_4x4": [[round(float(v), 8) for v in row] for row in self.matrix()],
            "direction": "baseline LPS mm -> follow-up LPS mm (x_f = M x_b); the direction of the "
                         "registration's transform in `cmbdetect longitudinal` (fixed baseline -> moving follow-up)",
            "rotation_deg": round(self.angle_deg, 4),
            "rotation_axis_lps": [round(float(v), 6) for v in self.axis],
            "rotation_centre_lps": [round(float(v), 4) for v in self.centre_lps],
            "shift_mm": [round(float(v), 4) for v in self.shift_mm],
            "shift_norm_mm": round(float(np.linalg.norm(self.shift_mm)), 4),
        }


def sample_motion(rng: np.random.Generator, max_rotation_deg: float = MAX_ROTATION_DEG,
                  max_shift_mm: float = MAX_SHIFT_MM) -> Motion:
    """A rotation of 0-max degrees about a random axis and a shift of 0-max mm in a random
    direction (centre set later, with `about`)."""
    axis = rng.normal(size=3)
    axis /= max(float(np.linalg.norm(axis)), 1e-9)
    angle = float(rng.uniform(0.0, max_rotation_deg))
    direction = rng.normal(size=3)
    direction /= max(float(np.linalg.norm(direction)), 1e-9)
    shift = direction * float(rng.uniform(0.0, max_shift_mm))
    rotation = Rotation.from_rotvec(np.deg2rad(angle) * axis).as_matrix()
    return Motion(rotation, shift, np.zeros(3), angle, axis)


def moved_warp(warp: Warp, motion: Motion) -> Warp:
    """The baseline's warp seen after `motion` (centred on the warp's head centre): the pose
    composed with the motion, the displacement field carried through it."""
    motion = motion.about(warp.translation)
    translation = warp.translation + motion.shift_mm
    origin = translation - LATTICE_HALF_EXTENT_MM
    nz, ny, nx = warp.displacement.shape[1:]
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    nodes = origin + LATTICE_SPACING_MM * np.stack([x.ravel(), y.ravel(), z.ravel()], -1)
    # u'(y') = u(M^-1 y'): the same tissue displacement where the moved tissue now is.
    values = warp.displacement_at(motion.inverse_apply(nodes))
    displacement = values.T.reshape(3, nz, ny, nx).astype(np.float32)
    return Warp(motion.rotation @ warp.rotation, warp.scale, translation, origin, displacement, warp.angles_deg)


@dataclass(frozen=True)
class CarriedBleed:
    """A baseline bleed, as the follow-up needs it: where it is (baseline LPS), what it is."""

    bleed: int  # the bleed's id in the baseline's acquisition (before any oblique resampling)
    centre_lps: np.ndarray
    centre_mni: np.ndarray
    source: Source
    region: str
    shape: str
    target_class: str
    placement: str
    extras: dict[str, float] = field(default_factory=dict)


def carried_bleeds(bleeds: list[Microbleed], geometry: Geometry) -> list[CarriedBleed]:
    """The baseline's bleeds (on its acquisition grid `geometry`) in physical terms."""
    return [CarriedBleed(b.id, geometry.index_to_lps(b.centre_kji[::-1]), b.centre_mni, b.source, b.region, b.shape,
                         b.target_class, b.placement, dict(b.extras)) for b in bleeds]


@dataclass
class Visit:
    """What makes a case a follow-up: passed to generate_case(visit=...)."""

    motion: Motion
    carried: list[CarriedBleed]
    n_new: int
    baseline_geometry: Geometry  # the baseline as written (after any oblique resampling)
    baseline_shape: tuple[int, int, int]
    new_protocol: bool = False
    number: int = 1  # the visit's number: its own noise, bias, new bleeds (and protocol when new)


def rotated_source(source: Source, rotation: np.ndarray) -> Source:
    lobes = tuple((*(rotation @ np.asarray(lobe[:3])).tolist(), lobe[3]) for lobe in source.lobes)
    return replace(source, rotation=rotation @ source.rotation, lobes=lobes)  # type: ignore[arg-type]


@dataclass
class Carried:
    """The carried bleeds on the follow-up's grid."""

    labelled: list[Microbleed]  # ids 1..n in the follow-up's acquisition; extras["baseline_bleed"]
    unlabelled_patches: list[SourcePatch]  # present but not outlined: their signal still applies
    not_labelled: dict[int, str]  # baseline bleed id -> why it has no follow-up label


def carry_bleeds(
    carried: list[CarriedBleed], motion: Motion, origin: np.ndarray, spacing_ijk: np.ndarray,
    shape_kji: tuple[int, int, int], field_strength_t: float, te_ms: float, power: float,
) -> Carried:
    """Each baseline bleed at its moved place on the follow-up's acquisition grid, its source
    rotated with the head, simulated and outlined on the follow-up's protocol (the label rule
    of microbleeds.py)."""
    spacing_kji = tuple(float(s) for s in np.asarray(spacing_ijk)[::-1])
    shape = np.asarray(shape_kji)
    out = Carried([], [], {})
    for c in carried:
        lps = motion.apply(c.centre_lps)[0]
        kji = ((lps - np.asarray(origin)) / np.asarray(spacing_ijk))[::-1]
        if np.any(kji < -0.5) or np.any(kji > shape - 0.5):
            out.not_labelled[c.bleed] = "outside the follow-up's slab"
            continue
        source = rotated_source(c.source, motion.rotation)
        patch = simulate_source(source, kji, spacing_kji, field_strength_t, te_ms)  # type: ignore[arg-type]
        vol_sl, patch_sl = overlap_slices(shape_kji, patch.lo, patch.factor.shape)
        result = outline(visibility(patch.factor[patch_sl], power), spacing_kji)  # type: ignore[arg-type]
        if result is None:
            out.unlabelled_patches.append(patch)
            out.not_labelled[c.bleed] = "too faint to outline on the follow-up's protocol"
            continue
        mask, level = result
        out.labelled.append(Microbleed(
            id=len(out.labelled) + 1, centre_kji=kji, centre_mni=np.asarray(c.centre_mni, float), region=c.region,
            shape=c.shape, source=source, patch=patch, label_slices=vol_sl, label_mask=mask, label_level=level,
            target_class=c.target_class, extras={**c.extras, "baseline_bleed": float(c.bleed)}, placement=c.placement,
        ))  # fmt: skip
    return out


def outside_baseline(visit: Visit, origin: np.ndarray, spacing_ijk: np.ndarray, shape_kji: tuple[int, int, int]) -> np.ndarray:
    """Bool volume on the follow-up's acquisition grid: where the baseline has no image (with a
    margin), so that no new bleed is placed there."""
    to_index = np.linalg.inv(visit.baseline_geometry.ijk_to_lps()) @ np.linalg.inv(visit.motion.matrix())
    margin = BASELINE_MARGIN_VOXELS[::-1]
    upper = np.asarray(visit.baseline_shape[::-1]) - 1 - margin
    jj, ii = np.meshgrid(np.arange(shape_kji[1]), np.arange(shape_kji[2]), indexing="ij")
    out = np.ones(shape_kji, bool)
    for k in range(shape_kji[0]):  # a slice at a time: a 384 x 384 x 100 grid at once is 350 MB of points
        lps = np.asarray(origin) + np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)], -1) * np.asarray(spacing_ijk)
        ijk = lps @ to_index[:3, :3].T + to_index[:3, 3]
        out[k] = ~np.all((ijk >= margin) & (ijk <= upper), axis=1).reshape(ii.shape)
    return out
