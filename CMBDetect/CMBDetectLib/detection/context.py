"""What a reader sees around a candidate and the classifier's 20^3 patch does not (issue 21, item 5).

A vein cut across is a dark dot on one slice and in the classifier's 15 mm patch; a reader
scrolls and sees it go on. This module measures, per candidate, on a wider isotropic patch in
patient space (CONTEXT_MM across at 1 mm, axes along S, P, L like the classifier's patch):

- **continuity along a tube**: the dark structure through the candidate (the voxels darker
  than half-way between the candidate's core and the surrounding tissue, connected to the
  core) and how far it reaches from the centre, how elongated it is, whether it leaves the
  patch. A bleed stops at its rim; a vein runs on.
- **multi-scale shape** from the Hessian's eigenvalues at 1, 2 and 3 mm (scikit-image): a dark
  blob has three positive eigenvalues of one size, a dark tube two and one near zero
  (Frangi's blob-versus-line ratio), at the scale of a small bleed, a large one and a vein.
- **position**: depth below the head's surface (air-tissue edges and cortical veins lie near
  it) and distance from the head's midline (pineal and choroid-plexus calcifications lie on it).
- the candidate's own volume and elongation, and its contrast against the tissue around it.

With the classifier's verdicts these are the inputs of a logistic model (`ContextModel`, fitted
by training/calibration.py on labelled tuning cases and stored in the classifier's card as
standardised coefficients), whose P(microbleed) replaces the classifier's before calibration.
Applying it needs numpy, scipy and scikit-image, which Slicer ships.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.feature import hessian_matrix, hessian_matrix_eigvals
from skimage.filters import threshold_otsu

from ..io import Geometry
from .configs import ClassifierConfig
from .records import CLASSES, MICROBLEED

CONTEXT_SIZE = 33  # voxels across the context patch
CONTEXT_SPACING_MM = 1.0
HESSIAN_SCALES_MM = (1.0, 2.0, 3.0)
CORE_RADIUS_MM = 2.0  # the candidate's darkest point is looked for this close to its centroid
SHELL_MM = (8.0, 16.0)  # the surrounding tissue: this far from the centre
MASK_STRIDE = 2  # the head mask is found on every 2nd voxel: position is wanted to a few mm
DEPTH_CAP_MM = 40.0
MIDLINE_CAP_MM = 60.0
EPS = 1e-6

FEATURES = (
    "logit_p_microbleed",  # the classifier's own P(microbleed) (no-phase rule applied when no phase)
    "log_p_vein",
    "log_p_calcification",
    "log_p_nucleus",
    "log_p_air_edge",
    "log_p_other",
    "tube_reach_mm",  # how far the dark structure through the candidate reaches from its centre
    "tube_elongation",  # log of its longest over its shortest principal axis
    "tube_leaves_patch",  # 1 when it reaches the patch's faces
    "tube_log_volume",
    "blob_1mm",  # smallest over largest Hessian eigenvalue at the core: 1 blob, 0 tube
    "blob_2mm",
    "blob_3mm",
    "line_2mm",  # middle over largest: 1 blob or tube, 0 sheet
    "contrast",  # 1 - core / surrounding tissue
    "depth_mm",  # below the head's surface
    "midline_mm",  # from the head's mid-sagittal plane
    "log_volume_mm3",  # the candidate's (stage 1's component)
    "elongation",  # the candidate's, log of its principal axes' ratio
)


@dataclass(frozen=True)
class HeadFrame:
    """Where the head is: the distance below its surface (mm) on a coarse grid, and the
    L coordinate (LPS mm) of its mid-sagittal plane."""

    depth_mm: np.ndarray  # (k, j, i) / MASK_STRIDE
    midline_l_mm: float

    @classmethod
    def of(cls, magnitude: np.ndarray, geometry: Geometry) -> "HeadFrame":
        coarse = np.asarray(magnitude[::MASK_STRIDE, ::MASK_STRIDE, ::MASK_STRIDE], np.float32)
        tissue = coarse > threshold_otsu(coarse) * 0.5 if coarse.max() > coarse.min() else np.ones(coarse.shape, bool)
        labels, n = ndimage.label(ndimage.binary_opening(tissue, iterations=1))
        if n:
            head = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        else:
            head = tissue
        head = ndimage.binary_fill_holes(ndimage.binary_closing(head, iterations=2))
        # The scan's own faces are not the head's surface (a slab cut through the brain):
        # pad along each axis with the edge so that only air makes a surface.
        padded = np.pad(head, 1, mode="edge")
        spacing = np.asarray(geometry.spacing, float)[::-1] * MASK_STRIDE  # (k, j, i)
        depth = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1].astype(np.float32)
        kji = np.argwhere(head)
        if len(kji):
            lps = geometry.index_to_lps(kji[:, ::-1] * MASK_STRIDE)
            midline = float(np.median(lps[:, 0]))
        else:
            midline = float(geometry.index_to_lps(np.array([[s / 2 for s in magnitude.shape[::-1]]]))[0, 0])
        return cls(depth, midline)

    def depth_at(self, centroid_ijk: np.ndarray) -> float:
        kji = np.clip(np.rint(np.asarray(centroid_ijk, float)[::-1] / MASK_STRIDE).astype(int), 0, np.array(self.depth_mm.shape) - 1)
        return float(min(self.depth_mm[tuple(kji)], DEPTH_CAP_MM))


def _principal_log_ratio(points_mm: np.ndarray) -> float:
    if len(points_mm) < 3:
        return 0.0
    eig = np.linalg.eigvalsh(np.cov(points_mm.T) + np.eye(3) * 0.05)
    return float(0.5 * np.log(eig[-1] / eig[0]))


def _context_patch(magnitude: np.ndarray, geometry: Geometry, centre_lps: np.ndarray) -> np.ndarray:
    from .candidates import patch_index_coordinates

    config = ClassifierConfig(patch_size=CONTEXT_SIZE, patch_spacing_mm=CONTEXT_SPACING_MM)
    coords = patch_index_coordinates(geometry, centre_lps, config)
    return ndimage.map_coordinates(magnitude, coords, order=1, mode="constant", cval=0.0).astype(np.float32)


def _grid_mm() -> tuple[np.ndarray, np.ndarray]:
    c = (CONTEXT_SIZE - 1) / 2.0
    axis = (np.arange(CONTEXT_SIZE) - c) * CONTEXT_SPACING_MM
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    return grid, np.linalg.norm(grid, axis=-1)


_GRID, _RADIUS = _grid_mm()


def _blob_line(patch: np.ndarray, core: tuple[int, int, int], sigma: float) -> tuple[float, float]:
    """(smallest / largest, middle / largest) Hessian eigenvalue at the core, dark structures
    positive: about (1, 1) on a dark blob, (0, 1) on a dark tube, (0, 0) on a dark sheet."""
    lo = [max(c - int(3 * sigma + 2), 0) for c in core]
    hi = [min(c + int(3 * sigma + 3), CONTEXT_SIZE) for c in core]
    box = patch[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    h = hessian_matrix(box, sigma=sigma / CONTEXT_SPACING_MM, order="rc", use_gaussian_derivatives=False)
    at = tuple(c - l for c, l in zip(core, lo))
    eig = np.sort(np.array([e[at] for e in hessian_matrix_eigvals(h)]))[::-1]  # largest first
    if eig[0] <= EPS:  # not a dark structure at this scale
        return 0.0, 0.0
    return float(np.clip(eig[2] / eig[0], -1.0, 1.0)), float(np.clip(eig[1] / eig[0], -1.0, 1.0))


def _tube(patch: np.ndarray, core: tuple[int, int, int], level: float) -> tuple[float, float, float, float]:
    """(reach mm, log elongation, leaves the patch, log volume mm3) of the dark structure through the core."""
    dark, _ = ndimage.label(patch < level, structure=np.ones((3, 3, 3), bool))
    which = dark[core]
    if which == 0:
        return 0.0, 0.0, 0.0, 0.0
    inside = dark == which
    points = _GRID[inside]
    edge = inside[[0, -1]].any() or inside[:, [0, -1]].any() or inside[:, :, [0, -1]].any()
    volume = float(inside.sum()) * CONTEXT_SPACING_MM**3
    return float(_RADIUS[inside].max()), _principal_log_ratio(points), float(edge), float(np.log(volume))


def context_features(
    magnitude: np.ndarray,
    geometry: Geometry,
    candidate_labels: np.ndarray,
    candidates: list,
    probabilities: np.ndarray,
    head: HeadFrame | None = None,
) -> np.ndarray:
    """(N, len(FEATURES)) float32 for the candidates (stage 1's components, labelled 1..N in
    `candidate_labels`); `magnitude` scaled to the white-matter peak; `probabilities` the
    classifier's (N, classes) verdicts as the stage uses them."""
    n = len(candidates)
    out = np.zeros((n, len(FEATURES)), np.float32)
    if n == 0:
        return out
    head = head or HeadFrame.of(magnitude, geometry)
    p = np.clip(np.asarray(probabilities, np.float64), 1e-4, 1 - 1e-4)
    spacing_kji = np.asarray(geometry.spacing, float)[::-1]
    direction = geometry.direction_matrix
    objects = ndimage.find_objects(candidate_labels, max_label=n)
    core_zone = _RADIUS <= CORE_RADIUS_MM
    shell = (_RADIUS >= SHELL_MM[0]) & (_RADIUS <= SHELL_MM[1])
    for row, cand in enumerate(candidates):
        centre = np.asarray(cand.centroid_lps, float)
        patch = _context_patch(magnitude, geometry, centre)
        masked = np.where(core_zone, patch, np.inf)
        core = np.unravel_index(int(np.argmin(masked)), patch.shape)
        tissue = patch[shell & (patch > 0.2)]
        around = float(np.median(tissue)) if tissue.size else 1.0
        low = float(patch[core])
        contrast = float(np.clip(1.0 - low / max(around, EPS), -1.0, 1.0))
        reach, elong, leaves, tube_volume = _tube(patch, core, low + 0.5 * (around - low))
        blob = [_blob_line(patch, core, s) for s in HESSIAN_SCALES_MM]
        box = objects[row]
        if box is not None:
            kji = np.argwhere(candidate_labels[box] == row + 1) * spacing_kji
            points = (kji[:, ::-1] @ direction.T)  # mm along patient axes
        else:
            points = np.zeros((0, 3))
        midline = min(abs(centre[0] - head.midline_l_mm), MIDLINE_CAP_MM)
        out[row] = (
            np.log(p[row, MICROBLEED] / (1 - p[row, MICROBLEED])),
            *(np.log(p[row, CLASSES.index(name)]) for name in ("vein", "calcification", "nucleus", "air_edge", "other")),
            reach, elong, leaves, tube_volume,
            blob[0][0], blob[1][0], blob[2][0], blob[1][1],
            contrast, head.depth_at(cand.centroid_ijk), midline,
            np.log(max(cand.volume_mm3, EPS)), _principal_log_ratio(points),
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class ContextModel:
    """A logistic model of "is a microbleed" on standardised context features; the card holds
    its features by name, so a card and this version must agree on what each one is."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float

    @classmethod
    def from_dict(cls, data: dict) -> "ContextModel":
        features = tuple(data["features"])
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise ValueError(f"the card's context model uses features this version does not compute: {unknown}")
        fields = [tuple(float(v) for v in data[k]) for k in ("mean", "scale", "coef")]
        if any(len(f) != len(features) for f in fields):
            raise ValueError("a context model needs one mean, scale and coefficient per feature")
        return cls(features, *fields, float(data["intercept"]))

    def as_dict(self) -> dict:
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "coef": list(self.coef), "intercept": self.intercept}  # fmt: skip

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """P(microbleed) for (N, len(FEATURES)) features."""
        x = np.asarray(features, np.float64)[:, [FEATURES.index(f) for f in self.features]]
        z = ((x - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.coef) + self.intercept
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
