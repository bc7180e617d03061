"""Veins: the commonest microbleed mimic. Tortuous tubes generated in MNI space, then drawn on
the acquisition grid with their partial volume.

Four families, as on clinical SWI:
- pial (cortical) veins, 1-2 mm wide, running over the brain surface and draining up towards
  the superior sagittal sinus or down and back towards the transverse sinuses: dense near the
  cortex;
- deep medullary veins, 0.5-1 mm wide, running radially from the walls of the lateral
  ventricles out through the white matter;
- named deep veins (internal cerebral veins, vein of Galen, basal veins of Rosenthal,
  thalamostriate veins) at their approximate MNI course;
- dural sinuses (superior sagittal, straight, transverse and sigmoid), 5-9 mm across.

Each vein is a centreline with a radius per point. Pial and medullary veins are random walks
steered by the template's distance fields (distance to the brain surface, to the ventricles)
with a smoothly turning direction, which gives tortuosity; every step is 0.8 mm, so a vein
crossing slices is continuous from slice to slice.

Drawing: the tube is filled with sample points (discs of points spread by a sunflower spiral
across each cross-section, one disc per step along the centreline, each point carrying its
share of the tube's volume), and the points' volumes are binned into voxels. The result is the
blood volume fraction of each voxel, exact up to sampling, for any voxel shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import make_interp_spline

from .anatomy import GUIDE_STEP, Template, index_to_mni
from .warp import Warp

GOLDEN_ANGLE = np.pi * (3.0 - np.sqrt(5.0))
STEP_MM = 0.8


@dataclass
class Vein:
    kind: str  # pial | medullary | deep | sinus
    name: str
    points_mni: np.ndarray  # (N, 3)
    radius_mm: np.ndarray  # (N,)

    @property
    def length_mm(self) -> float:
        return float(np.linalg.norm(np.diff(self.points_mni, axis=0), axis=1).sum())


# Named deep veins and sinuses: control points (MNI mm) and radius (mm). Approximate courses.
# Paired entries are mirrored to -x. Sinus points are then pushed onto the brain's outer
# surface (they lie in the dura, outside the brain).
NAMED_VEINS: tuple[tuple[str, str, tuple[tuple[float, float, float], ...], float, bool], ...] = (
    ("deep", "internal_cerebral_vein", ((2.5, 2, 14), (2.5, -10, 14), (2.5, -22, 12), (2.0, -32, 8), (0.5, -39, 4)), 1.1, True),
    ("deep", "vein_of_galen", ((0, -37, 5), (0, -42, 5), (0, -46, 3)), 2.0, False),
    ("deep", "thalamostriate_vein", ((16, -14, 21), (11, -3, 17), (4, 2, 14)), 0.8, True),
    ("deep", "basal_vein_of_rosenthal", ((20, 4, -14), (22, -10, -10), (18, -25, -4), (10, -35, 2), (3, -40, 4)), 1.0, True),
    ("sinus", "straight_sinus", ((0, -46, 3), (0, -60, -1), (0, -76, -3), (0, -92, -2)), 2.6, False),
    ("sinus", "transverse_sigmoid_sinus", ((2, -98, -2), (20, -99, -6), (40, -90, -14), (52, -72, -24), (50, -52, -32), (44, -38, -44)), 3.0, True),
)


def _smooth_curve(control: np.ndarray, step: float = 0.5) -> np.ndarray:
    """A smooth curve through control points, resampled every `step` mm."""
    seg = np.linalg.norm(np.diff(control, axis=0), axis=1)
    t = np.concatenate([[0.0], np.cumsum(seg)])
    spline = make_interp_spline(t, control, k=min(3, len(control) - 1))
    return spline(np.linspace(0.0, t[-1], max(2, int(t[-1] / step) + 1)))


def _snap_to_depth(
    template: Template, points: np.ndarray, depth_mm: float | np.ndarray, iterations: int = 4
) -> np.ndarray:
    """Move points along the surface normal until they sit `depth_mm` inside the brain hull
    (negative: outside it)."""
    for _ in range(iterations):
        d = template.sample_guide(template.hull_distance, points)
        n = _ijk_to_xyz(template.sample_guide(template.hull_gradient, points))
        points = points + (depth_mm - d)[:, None] * n
    return points


def _ijk_to_xyz(v: np.ndarray) -> np.ndarray:
    """Vectors in template array order (k, j, i) to MNI (x, y, z): same axes, reversed."""
    return v[..., ::-1]


def _superior_sagittal_sinus(template: Template, rng: np.random.Generator) -> Vein:
    # Along the midline over the convexity, from the frontal pole to the torcula.
    angles = np.deg2rad(np.linspace(-8.0, 175.0, 40))
    centre = np.array([0.0, -15.0, 5.0])
    rays = np.stack([np.zeros_like(angles), np.cos(angles), np.sin(angles)], -1)
    pts = centre + rays * 60.0
    pts = _snap_to_depth(template, pts, -3.0, iterations=8)
    pts[:, 0] = 0.0
    pts = _smooth_curve(pts[::3] + rng.normal(0, 0.5, pts[::3].shape) * [0, 1, 1])
    radius = np.linspace(2.0, 4.5, len(pts)) * rng.uniform(0.85, 1.15)  # grows towards the torcula
    return Vein("sinus", "superior_sagittal_sinus", pts, radius)


def named_veins(template: Template, rng: np.random.Generator) -> list[Vein]:
    veins = [_superior_sagittal_sinus(template, rng)]
    for kind, name, control, radius, paired in NAMED_VEINS:
        for side in (1.0, -1.0) if paired else (1.0,):
            c = np.array(control, dtype=float) * [side, 1.0, 1.0]
            c = c + rng.normal(0.0, 1.0, c.shape)
            if kind == "sinus":
                c = _snap_to_depth(template, c, -2.0)
            pts = _smooth_curve(c)
            r = np.full(len(pts), radius * rng.uniform(0.85, 1.15))
            veins.append(Vein(kind, name, pts, r))
    return veins


def _walk(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    n_steps: np.ndarray,
    steer,
    stop,
    turn: float,
) -> list[np.ndarray]:
    """Random walks of many veins at once. `steer(pos, dir)` returns the corrected direction,
    `stop(pos)` a boolean per vein; the direction turns by a smoothly varying random amount."""
    pos = start.copy()
    d = direction / np.linalg.norm(direction, axis=1, keepdims=True)
    drift = np.zeros_like(d)
    paths = [pos.copy()]
    alive = np.ones(len(pos), bool)
    for step in range(int(n_steps.max())):
        # Smoothly varying turning (an Ornstein-Uhlenbeck process on the bend direction).
        drift = 0.8 * drift + turn * rng.standard_normal(d.shape)
        d = steer(pos, d + drift)
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
        new = pos + STEP_MM * d
        alive &= (step < n_steps) & ~stop(new)
        pos = np.where(alive[:, None], new, pos)
        paths.append(np.where(alive[:, None], pos, np.nan))
    stacked = np.stack(paths, 1)  # (n, steps, 3)
    return [p[~np.isnan(p[:, 0])] for p in stacked]


def pial_veins(template: Template, rng: np.random.Generator, count: int, calibre: float = 1.0,
               tortuosity: float = 1.0) -> list[Vein]:
    """Cortical veins over the brain surface, draining up to the vertex or down and back."""
    if count <= 0:
        return []
    g = template.hull_distance
    mni = template_guide_to_mni(np.argwhere((g > 1.0) & (g < 4.0)))
    mni = mni[mni[:, 2] > -25.0]
    depth = rng.uniform(0.8, 2.5, count)
    pick = mni[rng.choice(len(mni), size=count, replace=len(mni) < count)] + rng.uniform(-1, 1, (count, 3))
    pick = _snap_to_depth(template, pick, depth)
    # Superior veins head up towards the superior sagittal sinus; the others down and back
    # towards the transverse sinuses.
    up = pick[:, 2] > 5.0
    heading = np.where(up[:, None], [0.0, 0.0, 1.0], [0.0, -0.7, -0.7])
    start_dir = heading + rng.normal(0, 0.8, (count, 3))

    def steer(pos: np.ndarray, d: np.ndarray) -> np.ndarray:
        n = _ijk_to_xyz(template.sample_guide(template.hull_gradient, pos))  # points inwards
        dist = template.sample_guide(template.hull_distance, pos)
        goal = heading.copy()
        near_vertex = up & (pos[:, 2] > 40.0)
        goal[near_vertex] = np.stack(
            [-np.sign(pos[near_vertex, 0]), np.zeros(near_vertex.sum()), np.full(near_vertex.sum(), 0.5)], -1
        )
        d = d + 0.15 * goal
        d = d - (d * n).sum(1, keepdims=True) * n  # stay tangent to the surface
        return d - 0.3 * (dist - depth)[:, None] * n  # and at the chosen depth

    def stop(pos: np.ndarray) -> np.ndarray:
        dist = template.sample_guide(template.hull_distance, pos)
        return (dist < -2.0) | (dist > 8.0) | (np.abs(pos[:, 0]) < 3.0) | (pos[:, 2] < -45.0)

    lengths = rng.uniform(20.0, 70.0, count)
    paths = _walk(rng, pick, start_dir, lengths / STEP_MM, steer, stop, turn=0.12 * tortuosity)
    veins = []
    for p in paths:
        if len(p) < 6:
            continue
        r = calibre * rng.uniform(0.45, 0.95) * np.linspace(0.75, 1.05, len(p))  # widening downstream
        veins.append(Vein("pial", "pial_vein", p, r))
    return veins


def medullary_veins(template: Template, rng: np.random.Generator, count: int, calibre: float = 1.0,
                    tortuosity: float = 1.0) -> list[Vein]:
    """Deep medullary veins: straight-ish, radial from the lateral ventricles through white
    matter towards the cortex."""
    if count <= 0:
        return []
    vd = template.ventricle_distance
    seeds = np.argwhere((vd > 1.5) & (vd < 4.5))
    mni = template_guide_to_mni(seeds)
    tissue_ok = template.sample(template.channel("wm"), mni) > 140
    mni = mni[tissue_ok]
    pick = mni[rng.choice(len(mni), size=count, replace=len(mni) < count)] + rng.uniform(-1, 1, (count, 3))
    start_dir = _ijk_to_xyz(template.sample_guide(template.ventricle_gradient, pick))

    def steer(pos: np.ndarray, d: np.ndarray) -> np.ndarray:
        away = _ijk_to_xyz(template.sample_guide(template.ventricle_gradient, pos))
        return d + 0.35 * away

    def stop(pos: np.ndarray) -> np.ndarray:
        return template.sample_guide(template.hull_distance, pos) < 5.0

    lengths = rng.uniform(12.0, 40.0, count)
    paths = _walk(rng, pick, start_dir, lengths / STEP_MM, steer, stop, turn=0.08 * tortuosity)
    veins = []
    for p in paths:
        if len(p) < 8:
            continue
        r = calibre * rng.uniform(0.25, 0.5) * np.linspace(1.15, 0.85, len(p))  # wider near the ventricle
        veins.append(Vein("medullary", "medullary_vein", p, r))
    return veins


def template_guide_to_mni(kji: np.ndarray) -> np.ndarray:
    """Indices of the 2 mm guidance grid to MNI mm."""
    return index_to_mni(kji * float(GUIDE_STEP))


def sample_veins(template: Template, rng: np.random.Generator, density: float = 1.0, calibre: float = 1.0,
                 tortuosity: float = 1.0) -> list[Vein]:
    """All veins of a case; `density` scales the number of pial and medullary veins (0: only
    the named deep veins and the sinuses), `calibre` their radii, `tortuosity` how much their
    course turns."""
    n_pial = int(round(rng.uniform(90, 150) * density))
    n_medullary = int(round(rng.uniform(70, 140) * density))
    return (
        named_veins(template, rng)
        + pial_veins(template, rng, n_pial, calibre, tortuosity)
        + medullary_veins(template, rng, n_medullary, calibre, tortuosity)
    )


@dataclass
class VeinRaster:
    fraction: np.ndarray  # (K, J, I) float32 blood volume fraction
    cos2: np.ndarray  # (K, J, I) float32 squared cosine between the vein and B0 (where fraction > 0)


def rasterise(
    veins: list[Vein],
    warp: Warp,
    origin: np.ndarray,
    spacing_ijk: np.ndarray,
    shape_kji: tuple[int, int, int],
) -> VeinRaster:
    """Blood volume fraction of each acquisition voxel and the mean squared cosine between the
    veins in it and B0."""
    spacing_ijk = np.asarray(spacing_ijk, dtype=float)
    origin = np.asarray(origin, dtype=float)
    step = float(min(spacing_ijk.min() / 2.0, 0.4))
    scale = float(np.cbrt(np.prod(warp.scale)))
    n_vox = int(np.prod(shape_kji))
    upper = np.array(shape_kji[::-1])
    # One push-forward for all centrelines.
    counts = [len(v.points_mni) for v in veins]
    all_lps = warp.mni_to_scanner(np.concatenate([v.points_mni for v in veins])) if veins else np.empty((0, 3))
    flats, volumes, weighted = [], [], []
    for vein, lps in zip(veins, np.split(all_lps, np.cumsum(counts)[:-1])):
        # Skip veins whose whole course misses the slab.
        k = (lps[:, 2] - origin[2]) / spacing_ijk[2]
        reach = (vein.radius_mm.max() * scale) / spacing_ijk[2] + 1
        if k.max() < -reach or k.min() > shape_kji[0] - 1 + reach:
            continue
        seg = np.linalg.norm(np.diff(lps, axis=0), axis=1)
        t = np.concatenate([[0.0], np.cumsum(seg)])
        if t[-1] <= 0:
            continue
        s = np.arange(0.0, t[-1], step)
        pts = np.stack([np.interp(s, t, lps[:, a]) for a in range(3)], -1)
        radius = np.interp(s, t, vein.radius_mm) * scale
        tangent = np.gradient(pts, axis=0)
        tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
        # Orthonormal frame across the tube.
        helper = np.where(np.abs(tangent[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
        e1 = np.cross(tangent, helper)
        e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
        e2 = np.cross(tangent, e1)
        r_max = float(radius.max())
        pitch = max(step, r_max / 10.0)
        n_disc = max(7, int(np.ceil(np.pi * r_max**2 / pitch**2)))
        m = np.arange(n_disc)
        rho = np.sqrt((m + 0.5) / n_disc)
        # Sunflower discs, each turned by the golden angle from the last so that successive
        # discs do not stack their points in lines.
        theta = m[None, :] * GOLDEN_ANGLE + np.arange(len(s))[:, None] * GOLDEN_ANGLE
        a1 = (rho * np.cos(theta) * radius[:, None])[..., None]
        a2 = (rho * np.sin(theta) * radius[:, None])[..., None]
        cloud = (pts[:, None, :] + a1 * e1[:, None, :] + a2 * e2[:, None, :]).reshape(-1, 3)
        idx = np.rint((cloud - origin) / spacing_ijk).astype(np.int64)  # (i, j, k)
        inside = np.all((idx >= 0) & (idx < upper), axis=1)
        if not inside.any():
            continue
        vol = np.repeat(np.pi * radius**2 * step / n_disc, n_disc)[inside]
        c2 = np.repeat(tangent[:, 2] ** 2, n_disc)[inside]
        idx = idx[inside]
        flats.append((idx[:, 2] * shape_kji[1] + idx[:, 1]) * shape_kji[2] + idx[:, 0])
        volumes.append(vol)
        weighted.append(vol * c2)
    fraction = np.zeros(n_vox, np.float32)
    cos2 = np.zeros(n_vox, np.float32)
    if flats:
        flat = np.concatenate(flats)
        vol = np.concatenate(volumes)
        acc = np.bincount(flat, weights=vol, minlength=n_vox)
        hit = np.flatnonzero(acc)
        acc_c = np.bincount(flat, weights=np.concatenate(weighted), minlength=n_vox)
        cos2[hit] = acc_c[hit] / acc[hit]
        fraction[hit] = np.minimum(acc[hit] / float(np.prod(spacing_ijk)), 1.0)
    return VeinRaster(fraction.reshape(shape_kji), cos2.reshape(shape_kji))


def summarise(veins: list[Vein]) -> dict[str, object]:
    out: dict[str, object] = {}
    for kind in ("pial", "medullary", "deep", "sinus"):
        group = [v for v in veins if v.kind == kind]
        out[kind] = {
            "count": len(group),
            "total_length_mm": round(sum(v.length_mm for v in group), 1),
            "width_mm": [round(2.0 * float(min(v.radius_mm.min() for v in group)), 2),
                         round(2.0 * float(max(v.radius_mm.max() for v in group)), 2)] if group else None,
        }
    return out
