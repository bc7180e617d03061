"""An SWI volume registered to the atlas's template head (MNI ICBM152 2009a), with a QC verdict.

The template is the moving image and the SWI the fixed one, so the transform maps SWI points
(LPS mm) straight into the template, which is what a lesion's look-up needs, and the metric
is sampled where the SWI has data (a partial-coverage slab included). The steps reuse
registration/rigid.py's optimiser: centred on the moments of the two heads, rigid (Euler 3D),
then affine (12 parameters: a head's size and shape differ from the template's), Mattes mutual
information since SWI is not T1, two resolutions on the SWI binned to about 2 mm. A coarse
B-spline was tried and not kept: it raised the metric but moved the bleeds farther from their
template positions (region agreement 0.79 against 0.81, 14 s more a case; docs/regions.md).

QC: after the fit, the template's head (resampled onto the binned SWI) must overlap the SWI's
own head (Otsu foreground) with a Dice of at least MIN_HEAD_DICE where the SWI has data, and
the mutual information must reach MAX_METRIC. A registration that fails either is flagged:
every lesion is then `unknown`, never a region read through a wrong transform.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..io import Volume
from ..registration.rigid import SEED, float_image, moments_start, optimise
from .atlas import Atlas, load_atlas

WORKING_MM = 2.0  # the template's own voxel: finer SWI voxels are binned to about this
SHRINK = (4, 2)
ITERATIONS = 60
# Starts tried before the fit (degrees about x, y, z, around the moments start): a scan's header
# may place the head on its face, its side or upside down, which the moments do not see.
START_TURNS_DEG = ((0, 0, 0), (90, 0, 0), (-90, 0, 0), (180, 0, 0), (0, 90, 0), (0, -90, 0), (0, 180, 0),
                   (0, 0, 90), (0, 0, -90), (0, 0, 180))  # fmt: skip
START_ITERATIONS = 20
SAMPLES = 20_000
# QC thresholds, from docs/measure_regions.py (docs/regions.md: 6 cases, 18 good fits, 6 that
# did not recover): good fits reach a Mattes MI of -0.72 to -0.88 and a head Dice of 0.77-0.94;
# fits stuck 40-100 mm off end at -0.05 to -0.58 (one partial slab at -0.71), Dice 0.45-0.93.
# The Dice only catches gross failures (a slab inside a head overlaps it anyway).
MIN_HEAD_DICE = 0.7
MAX_METRIC = -0.6
# A scan thinner than this along any axis (a few slices, a test phantom) is not registered: the
# coarsest level would have too few voxels for ITK's smoothing, and a head is not recognisable.
MIN_EXTENT_MM = 40.0
TEMPLATE_HEAD_LEVEL = 20  # uint8 grey level of the template head image above which it is head


@dataclass
class TemplateRegistration:
    transform: sitk.Transform  # SWI LPS mm -> template LPS mm
    ok: bool
    head_dice: float
    metric: float
    seconds: float
    reason: str = ""  # why QC failed; "" when ok
    picture: dict = field(default_factory=dict)  # what the QC picture needs (slices, outlines)

    def qc(self) -> dict[str, object]:
        return {"passed": self.ok, "head_dice": round(self.head_dice, 4), "mattes_mi": round(self.metric, 4),
                "min_head_dice": MIN_HEAD_DICE, "max_mattes_mi": MAX_METRIC,
                **({"reason": self.reason} if self.reason else {})}  # fmt: skip

    def matrix(self) -> list[list[float]]:
        """The fitted transform as a 4 x 4 matrix (SWI LPS mm -> template LPS mm, applied to
        column vectors), for the summary: the Slicer module and the live threshold locate the
        lesions they re-extract with it, without registering again."""
        out = np.eye(4)
        if isinstance(self.transform, (sitk.AffineTransform, sitk.Euler3DTransform)):
            a = np.array(self.transform.GetMatrix()).reshape(3, 3)
            centre, shift = np.array(self.transform.GetCenter()), np.array(self.transform.GetTranslation())
            out[:3, :3], out[:3, 3] = a, centre + shift - a @ centre
        return [[round(float(v), 6) for v in row] for row in out]

    def to_template(self, points_lps: np.ndarray) -> np.ndarray:
        return np.array([self.transform.TransformPoint(tuple(map(float, p))) for p in np.reshape(points_lps, (-1, 3))])


class _TooThin(Exception):
    pass


def _head_mask(image: sitk.Image) -> np.ndarray:
    """The SWI's head: Otsu's foreground, holes filled slice by slice (dark veins and bleeds)."""
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(image, 0, 1)).astype(bool)
    return np.stack([ndimage.binary_fill_holes(plane) for plane in mask]) if mask.size else mask


def _affine_from(rigid: sitk.Euler3DTransform) -> sitk.AffineTransform:
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine.SetCenter(rigid.GetCenter())
    return affine


def _best_start(fixed: sitk.Image, moving: sitk.Image, moments: sitk.Euler3DTransform, seed: int) -> sitk.Euler3DTransform:
    """The moments start and its turns (START_TURNS_DEG), each fitted briefly at the coarsest
    level; the one with the best metric. A header that has the head on its face or upside down
    then still registers, for about a second more per case."""
    best: tuple[float, sitk.Euler3DTransform] | None = None
    for turn in START_TURNS_DEG:
        candidate = sitk.Euler3DTransform(moments)
        candidate.SetRotation(*np.radians(turn))
        try:
            metric, _ = optimise(fixed, moving, candidate, SHRINK[:1], START_ITERATIONS, seed, SAMPLES)
        except RuntimeError:  # this start leaves the image: try the others
            continue
        if best is None or metric < best[0]:
            best = (metric, candidate)
    return moments if best is None else best[1]


def register_to_template(volume: Volume, atlas: Atlas | None = None, initial: sitk.Euler3DTransform | None = None,
                         seed: int = SEED) -> TemplateRegistration:  # fmt: skip
    """Register `volume` to the template; `initial` replaces the moments start and the search
    over its turns (for tests and measurements of deliberately bad starts). Never raises for a volume that does not
    register: the result says so."""
    atlas = atlas or load_atlas()
    start = time.perf_counter()
    fixed = float_image(volume, WORKING_MM)
    moving = atlas.head
    rigid = moments_start(fixed, moving) if initial is None else sitk.Euler3DTransform(initial)
    transform: sitk.Transform = rigid
    metric, reason = 0.0, ""
    extent = min(n * d for n, d in zip(fixed.GetSize(), fixed.GetSpacing()))
    try:
        if extent < MIN_EXTENT_MM:
            raise _TooThin(f"the scan covers only {extent:.0f} mm along one axis (at least {MIN_EXTENT_MM:.0f} mm needed)")
        if initial is None:
            rigid = transform = _best_start(fixed, moving, rigid, seed)
        optimise(fixed, moving, rigid, SHRINK, ITERATIONS, seed, SAMPLES)
        transform = _affine_from(rigid)
        metric, _ = optimise(fixed, moving, transform, SHRINK, ITERATIONS, seed, SAMPLES)
    except _TooThin as exc:
        reason = str(exc)
    except RuntimeError as exc:  # ITK: too few samples overlap, the fit left the image
        # Without the object's address ITK puts in its message: two runs must write the same summary.
        reason = "the registration stopped: " + re.sub(r"\s*\(0x[0-9a-fA-F]+\)", "", str(exc).strip().splitlines()[-1])
    swi = sitk.GetArrayViewFromImage(fixed)
    mine = _head_mask(fixed)
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > TEMPLATE_HEAD_LEVEL
    both = float((mine & theirs).sum())
    dice = 2.0 * both / max(1.0, float(mine.sum() + theirs.sum()))
    if not reason and dice < MIN_HEAD_DICE:
        reason = f"the template's head overlaps the scan's head by a Dice of {dice:.2f} only (at least {MIN_HEAD_DICE} expected)"
    if not reason and metric > MAX_METRIC:
        reason = f"the mutual information after registration is {metric:.3f} (at most {MAX_METRIC} expected)"
    brain = sitk.GetArrayFromImage(sitk.Resample(atlas.brain, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    slices = [int(k) for k in np.linspace(0, swi.shape[0] - 1, 5)[1:-1].round()] if swi.shape[0] >= 3 else [0]
    picture = {"slices": slices, "image": np.asarray(swi)[slices].copy(), "brain": brain[slices] > 0,
               "head": theirs[slices], "spacing": fixed.GetSpacing()}  # fmt: skip
    return TemplateRegistration(transform, not reason, dice, metric, time.perf_counter() - start, reason, picture)
