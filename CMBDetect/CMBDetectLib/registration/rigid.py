"""Rigid registration of one scan to another (SimpleITK), with a QC score.

The transform maps points of the fixed scan's space (LPS mm) into the moving scan's space,
which is what SimpleITK's registration returns: baseline lesions (fixed) are mapped into the
follow-up (moving) with it, and follow-up positions back with its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..io import Volume, to_sitk

# Below this normalised correlation (after registration, inside the fixed scan's head) the scans
# are not taken to show the same head in the same place. Two noisy phantoms of one head register
# at >= 0.9; a pure-noise scan stays near 0.
MIN_CORRELATION = 0.5
# The pose check: the edges (gradient magnitude) of the two scans are compared at the found pose
# and at poses PROBE_MM away along each axis; a neighbour that fits better by more than
# PROBE_TOLERANCE means the optimiser stopped short. A whole-overlap correlation cannot see
# that: it stays at 0.99 with a phantom 6 mm off along its slices, where the smooth interior
# dominates; edges move with the pose.
PROBE_MM = 2.0
PROBE_DEG = 1.5
PROBE_TOLERANCE = 0.01
EDGE_SIGMA_MM = 1.0


SHRINK = (4, 2, 1)
SAMPLES = 50_000  # metric samples per level
# The metric's random sample set is drawn from this seed, so that a case registers the same way
# every run. Never 0: SimpleITK reads a seed of 0 as "from the wall clock" (sitkWallClock).
SEED = 1


@dataclass
class RigidResult:
    transform: sitk.Transform  # fixed space -> moving space, LPS mm
    correlation: float  # normalised correlation of the two scans after registration (_correlation)
    metric: float  # the final Mattes mutual information (negative: lower is better)
    iterations: int
    pose: dict = field(default_factory=dict)  # pose_check's result

    @property
    def pose_ok(self) -> bool:
        return bool(self.pose.get("pose_ok", True))

    def qc(self) -> dict[str, object]:
        return {"correlation": round(self.correlation, 4), "mattes_mi": round(self.metric, 4), "iterations": self.iterations,
                **{k: v for k, v in self.pose.items() if k != "correlation"}}

    def matrix(self) -> np.ndarray:
        """The transform as a 4x4 matrix on LPS points (fixed -> moving)."""
        return transform_matrix(self.transform)

    def to_moving(self, points_lps: np.ndarray) -> np.ndarray:
        return np.array([self.transform.TransformPoint(tuple(map(float, p))) for p in np.reshape(points_lps, (-1, 3))])

    def to_fixed(self, points_lps: np.ndarray) -> np.ndarray:
        inverse = self.transform.GetInverse()
        return np.array([inverse.TransformPoint(tuple(map(float, p))) for p in np.reshape(points_lps, (-1, 3))])


WORKING_MM = 1.0  # finer voxels are binned to about this size first: a rigid fit needs no more detail


def float_image(volume: Volume, working_mm: float = WORKING_MM) -> sitk.Image:
    """The volume as a float image with voxels of at least `working_mm`: ITK's pyramid and
    sample set cost seconds per level on a 0.5 mm scan, whatever the number of iterations."""
    image = sitk.Cast(to_sitk(volume.array.astype(np.float32), volume.geometry), sitk.sitkFloat32)
    factors = [max(1, int(working_mm / s + 1e-6)) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


SMOOTHING_MM = {4: 2.0, 2: 1.0, 1: 0.0}  # Gaussian sigma (mm) per shrink factor of the pyramid


def optimise(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, shrink: tuple[int, ...] = SHRINK,
    iterations: int = 40, seed: int = SEED, samples: int = SAMPLES, moving_mask: sitk.Image | None = None,
) -> tuple[float, int]:
    """Fit `transform` (fixed points -> moving points, changed in place): Mattes mutual
    information on random samples, regular-step gradient descent, coarse to fine over `shrink`.
    Returns the final metric (negative: lower is better) and the iterations of the last level.
    Raises RuntimeError when SimpleITK cannot proceed (no overlap at all)."""
    if seed == 0:
        raise ValueError("seed 0 means 'from the wall clock' to SimpleITK: runs would differ")
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # About `samples` points per level, whatever the scan's size: a 512 x 512 x 100 SWI at 20 %
    # would cost five million points an iteration at full resolution.
    voxels = float(np.prod(fixed.GetSize()))
    reg.SetMetricSamplingPercentagePerLevel([min(0.2, samples * s**3 / voxels) for s in shrink], seed)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    # Coarse to fine, so that a motion of several millimetres is found before the detail is.
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([SMOOTHING_MM.get(s, s / 2.0) for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    # One thread: the metric's threads add their partial sums in the order they finish, which
    # made two runs of one case differ in the last digits (and, rarely, in a rounded output).
    # The metric takes ITK's global default (the method's own setting does not reach it); at
    # 1-2 mm working voxels a single thread costs no measurable time (docs/regions.md).
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        reg.Execute(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return float(reg.GetMetricValue()), int(reg.GetOptimizerIteration())


def centre_of_mass(image: sitk.Image) -> np.ndarray:
    """The intensity-weighted centre of an image (LPS mm)."""
    array = sitk.GetArrayViewFromImage(image).astype(np.float64)
    weights = [array.sum(axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]  # k, j, i
    total = float(array.sum())
    if total <= 0:
        return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()]))
    kji = [float(np.dot(w, np.arange(len(w)))) / total for w in weights]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(kji[::-1]))


def moments_start(fixed: sitk.Image, moving: sitk.Image) -> sitk.Euler3DTransform:
    """Rotation about the fixed image's centre of mass, translated onto the moving image's: what
    SimpleITK's CenteredTransformInitializer (MOMENTS) gives an Euler transform, computed here
    because that initialiser's translation depended on the images of earlier calls in the same
    process (up to 10 mm), so a case's registration depended on the cases run before it."""
    centre, target = centre_of_mass(fixed), centre_of_mass(moving)
    start = sitk.Euler3DTransform()
    start.SetCenter(tuple(map(float, centre)))
    start.SetTranslation(tuple(map(float, target - centre)))
    return start


def register_rigid(fixed: Volume, moving: Volume, iterations: int = 40, seed: int = SEED) -> RigidResult:
    """Euler 3D transform from `fixed` to `moving`: centred on the moments, Mattes mutual
    information, three resolutions (4-2-1), then the pose check (PROBE_MM); when a neighbour
    fits better, the optimiser starts once more from there. Raises RuntimeError when SimpleITK
    cannot proceed (no overlap at all)."""
    f, m = float_image(fixed), float_image(moving)
    transform = moments_start(f, m)
    metric, done = optimise(f, m, transform, SHRINK, iterations, seed)
    pose, better = _pose_check(f, m, transform)
    if not pose["pose_ok"] and better is not None:
        # The optimiser stopped short (a small step, a flat stretch of the metric): once more from the better neighbour.
        transform = _as_euler(better, f)
        metric, more = optimise(f, m, transform, SHRINK, iterations, seed)
        done += more
        pose, _ = _pose_check(f, m, transform)
        pose["restarted"] = True
    return RigidResult(transform, pose["correlation"], metric, done, pose)  # the pose check measured it at this pose


def _centre(image: sitk.Image) -> tuple[float, float, float]:
    return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])


def _as_euler(transform: sitk.Transform, fixed: sitk.Image) -> sitk.Euler3DTransform:
    """A rigid transform (any composition of rigid ones) as one Euler 3D transform centred on
    the fixed image, for the optimiser to start from."""
    matrix = transform_matrix(transform)
    rotation, offset = matrix[:3, :3], matrix[:3, 3]
    u, _, vt = np.linalg.svd(rotation)  # the nearest rotation: rounding leaves it a hair off orthogonal
    rotation = u @ vt
    centre = np.asarray(_centre(fixed))
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(centre))
    euler.SetMatrix(tuple(rotation.ravel()))
    euler.SetTranslation(tuple(offset + rotation @ centre - centre))
    return euler


def transform_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 matrix of an affine-like transform, read off its action on the origin and unit points."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    m = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        m[:3, axis] = np.array(transform.TransformPoint(tuple(unit))) - origin
    m[:3, 3] = origin
    return m


def pose_check(fixed: Volume, moving: Volume, transform: sitk.Transform) -> dict[str, object]:
    """Whether `transform` (fixed -> moving) is where the two scans' edges fit best among its
    neighbours: PROBE_MM away along each axis of the fixed space, PROBE_DEG about each axis
    through the fixed scan's centre (see PROBE_MM)."""
    return _pose_check(float_image(fixed), float_image(moving), transform)[0]


def _edges(image: sitk.Image) -> sitk.Image:
    return sitk.GradientMagnitudeRecursiveGaussian(image, EDGE_SIGMA_MM)


def _probes(fixed: sitk.Image) -> list[tuple[str, sitk.Transform]]:
    """Small rigid moves in the fixed space: shifts, and rotations about its centre."""
    probes: list[tuple[str, sitk.Transform]] = []
    for axis, name in enumerate("LPS"):
        for sign in (-1.0, 1.0):
            offset = [0.0, 0.0, 0.0]
            offset[axis] = sign * PROBE_MM
            probes.append((f"shift {sign * PROBE_MM:+g} mm along {name}", sitk.TranslationTransform(3, tuple(offset))))
            angles = [0.0, 0.0, 0.0]
            angles[axis] = np.deg2rad(sign * PROBE_DEG)
            probes.append((f"rotation {sign * PROBE_DEG:+g} degrees about {name}", sitk.Euler3DTransform(_centre(fixed), *angles)))
    return probes


def _pose_check(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> tuple[dict[str, object], sitk.Transform | None]:
    """The check's result, and the better neighbour's transform (None when the pose is best)."""
    a = sitk.GetArrayFromImage(_edges(fixed)).astype(np.float64)
    moving_edges = _edges(moving)

    def edge_correlation(t: sitk.Transform) -> float:
        # A copy, not a view: a view of the temporary image would outlive its memory.
        b = sitk.GetArrayFromImage(sitk.Resample(moving_edges, fixed, t, sitk.sitkLinear, np.nan, sitk.sitkFloat32))
        both = np.isfinite(b)
        if both.sum() < 100 or a[both].std() == 0 or b[both].std() == 0:
            return 0.0
        return float(np.corrcoef(a[both], b[both].astype(np.float64))[0, 1])

    at_pose = edge_correlation(transform)
    best, best_move, better = at_pose, "", None
    for name, move in _probes(fixed):
        probe = sitk.CompositeTransform(transform)
        probe.AddTransform(move)  # applied first: a move in the fixed space
        value = edge_correlation(probe)
        if value > best:
            best, best_move, better = value, name, probe
    ok = best - at_pose <= PROBE_TOLERANCE
    return {
        "correlation": _correlation(fixed, moving, transform),
        "edge_correlation": round(at_pose, 4),
        "pose_ok": bool(ok),
        "better_neighbour": best_move,  # "" when the pose is the best of its neighbours
        "better_by": round(best - at_pose, 4),
        "probes": f"+-{PROBE_MM:g} mm along, +-{PROBE_DEG:g} degrees about each axis",
    }, (None if ok else better)


def _overlap(onto: sitk.Image, other: sitk.Image, transform: sitk.Transform) -> tuple[float, np.ndarray, np.ndarray]:
    """`other` resampled onto `onto` (`transform` maps `onto`'s points into `other`): the share
    of `onto`'s head (above Otsu's threshold) that `other` covers, and the two scans' values
    where `other` has data."""
    a = sitk.GetArrayViewFromImage(onto)
    b = sitk.GetArrayFromImage(sitk.Resample(other, onto, transform, sitk.sitkLinear, np.nan, sitk.sitkFloat32))
    # A copy: a view of the temporary mask would read freed memory (a wrong mask, or a crash).
    head = sitk.GetArrayFromImage(sitk.OtsuThreshold(onto, 0, 1)).astype(bool)
    inside = int((head & np.isfinite(b)).sum())
    covered = inside / max(int(head.sum()), 1) if inside >= 100 else 0.0
    # The whole overlap, not only the head: the head's outline carries much of the alignment.
    both = np.isfinite(b)
    return covered, a[both].astype(np.float64), b[both].astype(np.float64)


def _correlation(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Pearson correlation of the two scans where they overlap after registration, seen from the
    scan that the other covers the more of: a partial slab lies within a whole head, so a slab
    follow-up is judged on its own grid (its head inside the baseline's), not by the share of
    the baseline's head it covers. 0 when the overlap holds less than half of either scan's head."""
    covered, x, y = max(_overlap(fixed, moving, transform), _overlap(moving, fixed, transform.GetInverse()), key=lambda o: o[0])
    if covered < 0.5 or x.std() == 0 or y.std() == 0:
        return 0.0  # too little overlap to compare
    return float(np.corrcoef(x, y)[0, 1])
