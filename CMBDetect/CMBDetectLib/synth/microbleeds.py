"""Microbleeds: how many, where, how big, and the outline an expert would draw.

Placement. Each bleed first draws its MARS region (lobar 50 %, deep 35 %, infratentorial 15 %:
our estimate for a cerebral small-vessel-disease cohort like the paper's, where hypertensive
deep bleeds are common beside lobar ones), then a template voxel of that region where the
template is solid tissue (grey + white matter > 0.92), mapped into the scanner through the
case's pose and deformation. Bleeds outside the acquired slab are redrawn.

Size. The paper's Table 2 counts 9,387 small (2-5 mm) and 1,138 large (5-10 mm) labelled
lesions: 89.2 % small. Those are sizes experts outlined, i.e. apparent sizes, on the paper's
scanners (87 % at 3 T). So each bleed draws a target class with p(small) = 0.892 and a target
apparent diameter in it, and we solve for the true source diameter whose outline lands there on
a reference protocol (3 T, TE 23 ms, 0.5 x 0.5 x 1.8 mm: the middle of our 3 T draws). The
source is then simulated on the case's own protocol, where it blooms more (longer TE, bigger
voxels) or less (1.5 T, shorter TE): the labelled size, and so the class, is whatever the
outline measures there, and the JSON keeps the true (source) diameter, the apparent (labelled)
diameter, its class and the reference target class. A bleed too faint to outline on the case's
protocol is replaced by a new draw.

Source. A paramagnetic sphere (65 %) or ellipsoid (axis ratios 0.6-1, random orientation) of
haemosiderin, susceptibility 0.4-1.6 ppm (log-uniform; our estimate) and almost no signal of
its own (interior signal 0.02, for its very short T2*).

Label rule (the "expert outline"). A voxel belongs to a bleed when the bleed leaves its SWI
signal at most 60 % of what the voxel would show without it (visibility <= 0.6: magnitude loss
from intravoxel dephasing times the phase mask of the bleed's own phase, noise-free), and it is
26-connected to the darkest voxel. If that outline is under 2 mm (equivalent diameter), it is
widened by raising the level in steps of 0.025 up to 0.85; if over 10 mm, narrowed by lowering
it. The level used is recorded per lesion (`label_level`). A bleed whose outline cannot reach
2 mm is too faint for the protocol and is replaced by a new draw; one that would touch another
bleed's outline or a calcification's dark area, or sit where air-tissue dephasing has already
removed a fifth of the signal (no reader could outline a bleed inside a susceptibility
artefact), is placed elsewhere. If no place is found in 30 tries the bleed is dropped, so
`n_lesions` can fall short of `n_lesions_requested` on small slabs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..detection.lesions import MAX_DIAMETER_MM, MIN_DIAMETER_MM, equivalent_diameter_mm, size_class
from .anatomy import REGIONS, Template, index_to_mni
from .susceptibility import Source, SourcePatch, overlap_slices, phase_per_ppm, simulate_source, visibility
from .warp import Warp, mni_to_voxel

REGION_PRIOR = {"lobar": 0.50, "deep": 0.35, "infratentorial": 0.15}
SMALL_FRACTION = 9387.0 / (9387.0 + 1138.0)  # Table 2 of Fan et al. 2022
LABEL_LEVEL = 0.6
WIDEST_LEVEL = 0.85
NARROWEST_LEVEL = 0.2
LEVEL_STEP = 0.025
CHI_RANGE_PPM = (0.4, 1.6)
MAX_SIZE_TRIES = 4
MAX_PLACEMENT_TRIES = 30
VEIN_RIM_MAX = 0.2  # blood fraction below the vein mimic's threshold: beside the vein, not in it
# The protocol on which Table 2's size mix is reproduced: the middle of our 3 T draws (TE 16-30
# ms, 1.0-2.5 mm slices) with the 0.5 mm pixels of the commonest Table 1 matrices (432, 512).
REFERENCE_PROTOCOL = (3.0, 23.0, (1.8, 0.5, 0.5))  # B0 (T), TE (ms), voxel (k, j, i) mm
REFERENCE_POWER = 4
STRUCTURE_26 = np.ones((3, 3, 3), bool)
NEIGHBOURS_6 = np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


@dataclass
class Microbleed:
    id: int
    centre_kji: np.ndarray
    centre_mni: np.ndarray
    region: str
    shape: str
    source: Source
    patch: SourcePatch
    label_slices: tuple[slice, ...]  # where `label_mask` sits in the volume
    label_mask: np.ndarray  # bool, cropped to the volume
    label_level: float
    target_class: str
    extras: dict[str, float] = field(default_factory=dict)
    placement: str = "tissue"  # tissue | vein (on a vein's rim) | cortex (at the cortical surface)

    @property
    def n_voxels(self) -> int:
        return int(self.label_mask.sum())


def sample_count(rng: np.random.Generator) -> int:
    """Bleeds per case: 1 + negative binomial, mean about 6.5 (10,525 lesions in 1,615 patients
    in the paper), long-tailed, capped at 30."""
    return int(min(30, 1 + rng.negative_binomial(1.2, 1.2 / (1.2 + 5.5))))


def sample_target(rng: np.random.Generator) -> tuple[str, float]:
    """Target class and apparent diameter (mm), sizes skewed towards the small end."""
    if rng.random() < SMALL_FRACTION:
        return "small", float(2.3 + 2.5 * rng.beta(1.3, 1.8))
    return "large", float(5.3 + 4.2 * rng.beta(1.2, 2.5))


DEFAULT_SHAPES = (("sphere", 0.4), ("ellipsoid", 0.35), ("lobulated", 0.25))


def sample_lobes(rng: np.random.Generator, n_range: tuple[int, int], size: tuple[float, float]) -> np.ndarray:
    """Lobes for an irregular source, in units of its main radius: (n, 4) rows of an offset
    (x, y, z; 0.55-0.95 of the radius, so each lobe overlaps the body) and a lobe radius
    (`size` of the main radius)."""
    n = int(rng.integers(n_range[0], n_range[1] + 1))
    direction = rng.normal(size=(n, 3))
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-9)
    distance = rng.uniform(0.55, 0.95, n)
    radius = rng.uniform(*size, n)
    return np.concatenate([direction * distance[:, None], radius[:, None]], 1)


def sample_source_shape(
    rng: np.random.Generator, shapes: tuple[tuple[str, float], ...] = DEFAULT_SHAPES
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Shape name, semi-axis ratios normalised to unit geometric mean, rotation, lobes (in
    units of the mean radius; none for spheres and ellipsoids). Draws a fixed number of
    numbers whatever the shape."""
    names = [n for n, _ in shapes]
    u = rng.random()
    cumulative = np.cumsum([w for _, w in shapes]) / sum(w for _, w in shapes)
    name = names[min(int(np.searchsorted(cumulative, u, side="right")), len(names) - 1)]
    ratios = np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
    ratios /= np.cbrt(np.prod(ratios))
    rotation = Rotation.from_quat(rng.normal(size=4)).as_matrix()
    lobes = sample_lobes(rng, (1, 3), (0.4, 0.75))
    if name == "sphere":
        return name, np.ones(3), np.eye(3), np.zeros((0, 4))
    if name == "ellipsoid":
        return name, ratios, rotation, np.zeros((0, 4))
    return name, ratios, rotation, lobes


def scaled_lobes(lobes: np.ndarray, radius_mm: float) -> tuple[tuple[float, float, float, float], ...]:
    return tuple(tuple(float(v) * radius_mm for v in row) for row in lobes)  # type: ignore[misc]


def outline(
    vis: np.ndarray, spacing_kji: tuple[float, float, float]
) -> tuple[np.ndarray, float] | None:
    """The label rule on a (cropped) visibility box: mask and level, or None if no level in
    0.2-0.85 gives a 2-10 mm outline."""
    if vis.size == 0:
        return None
    seed = np.unravel_index(int(np.argmin(vis)), vis.shape)
    spacing_ijk = tuple(spacing_kji[::-1])

    def at(level: float) -> tuple[np.ndarray, float]:
        comp, _ = ndimage.label(vis <= level, structure=STRUCTURE_26)
        if comp[seed] == 0:
            return np.zeros(vis.shape, bool), 0.0
        mask = comp == comp[seed]
        return mask, float(equivalent_diameter_mm(int(mask.sum()), spacing_ijk))

    level = LABEL_LEVEL
    mask, d = at(level)
    while d < MIN_DIAMETER_MM and level < WIDEST_LEVEL - 1e-9:
        level = round(level + LEVEL_STEP, 4)
        mask, d = at(level)
    while d > MAX_DIAMETER_MM and level > NARROWEST_LEVEL + 1e-9:
        level = round(level - LEVEL_STEP, 4)
        mask, d = at(level)
    if not MIN_DIAMETER_MM <= d <= MAX_DIAMETER_MM:
        return None
    return mask, level


def bloom_guess(rad_per_ppm: float, chi: float) -> float:
    """Rough apparent/true diameter ratio, to start the size search (fitted to our simulator)."""
    pole = rad_per_ppm * chi * 2.0 / 3.0
    return max(1.05, 0.75 * (pole / 0.6) ** (1.0 / 3.0))


def _candidate_points(
    template: Template, rng: np.random.Generator, region: str, n: int
) -> np.ndarray:
    pool = template.candidates[region]
    flat = pool[rng.integers(0, len(pool), n)]
    kji = np.stack(np.unravel_index(flat, template.shape), -1).astype(float)
    return index_to_mni(kji + rng.uniform(-0.5, 0.5, kji.shape))


@dataclass(frozen=True)
class SourceDraw:
    """A bleed's intrinsic properties: independent of where it sits and of the scanner."""

    target_class: str
    target_d: float
    shape_name: str
    source: Source


def solve_source(rng: np.random.Generator, shapes: tuple[tuple[str, float], ...] = DEFAULT_SHAPES) -> SourceDraw | None:
    """Draw a target class and apparent diameter (Table 2 mix), a shape and a susceptibility,
    and find the source size whose outline on the reference protocol has that class and about
    that diameter. The true size is then a property of the bleed alone: on the case's own
    protocol it blooms more or less, and its class is whatever its outline there measures."""
    target_class, target_d = sample_target(rng)
    shape_name, ratios, rotation, lobes = sample_source_shape(rng, shapes)
    chi = float(np.exp(rng.uniform(*np.log(CHI_RANGE_PPM))))
    b0, te, spacing = REFERENCE_PROTOCOL
    rad_per_ppm = phase_per_ppm(b0, te)
    true_d = float(np.clip(target_d / bloom_guess(rad_per_ppm, chi), 0.6, 9.0))
    best = None
    for _ in range(MAX_SIZE_TRIES):
        source = Source(tuple(float(v) for v in ratios * true_d / 2.0), rotation, chi, interior_signal=0.02,
                        lobes=scaled_lobes(lobes, true_d / 2.0))
        patch = simulate_source(source, np.zeros(3), spacing, b0, te)
        result = outline(visibility(patch.factor, REFERENCE_POWER), spacing)
        if result is None:
            ratio = 1.6  # too faint to outline: a bigger source
        else:
            d = float(equivalent_diameter_mm(int(result[0].sum()), spacing[::-1]))
            if best is None or (size_class(d) == target_class) >= (size_class(best[1]) == target_class):
                best = (source, d)
            if size_class(d) == target_class and abs(d - target_d) < 0.35 * target_d:
                break
            ratio = target_d / d
        true_d = float(np.clip(true_d * ratio ** 0.9, 0.6, 9.0))
    if best is None:
        return None
    return SourceDraw(target_class, target_d, shape_name, best[0])


def _near_vein_points(
    vein_fraction: np.ndarray, template: Template, warp: Warp, origin: np.ndarray, spacing_ijk: np.ndarray,
    rng: np.random.Generator, n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to n acquisition-grid points (k, j, i) just beside a vein (blood fraction 2-20 %:
    the vein's partial-volume rim) in brain tissue, and their MNI positions."""
    rim = np.flatnonzero((vein_fraction > 0.02) & (vein_fraction < VEIN_RIM_MAX))
    pick = rim[rng.integers(0, len(rim), n)] if len(rim) else np.zeros(0, np.int64)
    kji = np.stack(np.unravel_index(pick, vein_fraction.shape), -1).astype(float) + rng.uniform(-0.3, 0.3, (n, 3))[: len(pick)]
    lps = np.asarray(origin) + kji[:, ::-1] * np.asarray(spacing_ijk)
    mni = warp.scanner_to_mni(lps) if len(lps) else np.zeros((0, 3))
    ok = template.sample(template.tissue, mni) > 0.8 if len(mni) else np.zeros(0, bool)
    return kji[ok], mni[ok]


def place_microbleeds(
    count: int,
    template: Template,
    warp: Warp,
    origin: np.ndarray,
    spacing_ijk: np.ndarray,
    shape_kji: tuple[int, int, int],
    field_strength_t: float,
    te_ms: float,
    power: float,
    occupied: np.ndarray,
    rng: np.random.Generator,
    clear: np.ndarray | None = None,
    shapes: tuple[tuple[str, float], ...] = DEFAULT_SHAPES,
    p_on_vein: float = 0.0,
    p_on_cortex: float = 0.0,
    vein_fraction: np.ndarray | None = None,
) -> list[Microbleed]:
    """Draw, place and outline `count` bleeds; `occupied` (bool volume) marks where a new
    outline may not reach and is updated with each bleed's outline, dilated by one voxel.
    `clear` (bool volume) marks where the background signal survives air-tissue dephasing:
    a bleed's voxel and its six neighbours must all be clear. With probability `p_on_vein` a
    bleed is placed on a vein's rim (from `vein_fraction`), with `p_on_cortex` at the cortical
    surface (lobar tissue with 55-92 % grey + white matter: it meets CSF); otherwise in solid
    tissue of its MARS region."""
    spacing_kji = tuple(float(s) for s in np.asarray(spacing_ijk)[::-1])
    shape = np.array(shape_kji)
    margin = np.array([0.5, 2.0, 2.0])
    names = list(REGIONS)
    prior = np.array([REGION_PRIOR[r] for r in names])
    bleeds: list[Microbleed] = []
    for _ in range(count):
        region = names[int(rng.choice(len(names), p=prior))]
        u_mode = rng.random()
        mode = "vein" if u_mode < p_on_vein else ("cortex" if u_mode < p_on_vein + p_on_cortex else "tissue")
        if mode == "vein" and vein_fraction is None:
            mode = "tissue"
        draw = solve_source(rng, shapes)
        subvoxel = rng.uniform(-0.5, 0.5, 3)
        bleed = None
        for attempt in range(MAX_PLACEMENT_TRIES):
            if draw is None:
                draw = solve_source(rng, shapes)
                continue
            # Half the tries in the drawn place; then anywhere in solid tissue.
            use_mode = mode if attempt < MAX_PLACEMENT_TRIES // 2 else "tissue"
            use_region = region if attempt < MAX_PLACEMENT_TRIES // 2 else names[int(rng.choice(len(names), p=prior))]
            if use_mode == "vein":
                kji, mni = _near_vein_points(vein_fraction, template, warp, origin, spacing_ijk, rng, 16)  # type: ignore[arg-type]
            else:
                if use_mode == "cortex":
                    use_region = "lobar"
                mni = _candidate_points(template, rng, "cortex" if use_mode == "cortex" else use_region, 16)
                kji = mni_to_voxel(warp, origin, spacing_ijk, mni)
            if len(kji) == 0:
                continue
            ok = np.all((kji >= margin) & (kji <= shape - 1 - margin), axis=1)
            nearest = np.clip(np.rint(kji), 0, shape - 1).astype(int)
            ok &= ~occupied[tuple(nearest.T)]
            if clear is not None:
                for offset in NEIGHBOURS_6:
                    ok &= clear[tuple(np.clip(nearest + offset, 0, shape - 1).T)]
            if not ok.any():
                continue
            pick = int(np.flatnonzero(ok)[0])
            if use_mode == "vein":  # the region is wherever the vein led
                code = int(template.sample(template.region, mni[pick][None], order=0)[0])
                use_region = names[code - 1] if 1 <= code <= len(names) else "lobar"
            centre = np.rint(kji[pick]) + subvoxel * 0.999
            bleed, visible = _outline_here(draw, centre, mni[pick], use_region, spacing_kji, shape_kji,
                                           field_strength_t, te_ms, power, occupied)
            if bleed is not None:
                bleed.placement = use_mode
                break
            if not visible:
                draw = solve_source(rng, shapes)  # too faint for this protocol anywhere: another bleed
        if bleed is None:
            continue
        bleed.id = len(bleeds) + 1
        # Reserve the outline plus a one-voxel rim, so no two outlines ever touch.
        rim = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(bleed.label_slices, shape_kji))
        local = np.zeros(tuple(s.stop - s.start for s in rim), bool)
        local[tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(bleed.label_slices, rim))] = bleed.label_mask
        occupied[rim] |= ndimage.binary_dilation(local, STRUCTURE_26)
        bleeds.append(bleed)
    return bleeds


def _outline_here(
    draw: SourceDraw,
    centre: np.ndarray,
    mni: np.ndarray,
    region: str,
    spacing_kji: tuple[float, float, float],
    shape_kji: tuple[int, int, int],
    field_strength_t: float,
    te_ms: float,
    power: float,
    occupied: np.ndarray,
) -> tuple[Microbleed | None, bool]:
    """Simulate the bleed at `centre` on the case's protocol and outline it. Returns the bleed
    (or None) and whether it was visible at all (False: no outline of 2-10 mm)."""
    patch = simulate_source(draw.source, centre, spacing_kji, field_strength_t, te_ms)
    vol_sl, patch_sl = overlap_slices(shape_kji, patch.lo, patch.factor.shape)
    result = outline(visibility(patch.factor[patch_sl], power), spacing_kji)
    if result is None:
        return None, False
    mask, level = result
    if (occupied[vol_sl] & mask).any():
        return None, True
    return Microbleed(
        id=0,
        centre_kji=np.asarray(centre, dtype=float),
        centre_mni=np.asarray(mni, dtype=float),
        region=region,
        shape=draw.shape_name,
        source=draw.source,
        patch=patch,
        label_slices=vol_sl,
        label_mask=mask,
        label_level=level,
        target_class=draw.target_class,
        extras={"target_apparent_diameter_mm": draw.target_d},
    ), True
