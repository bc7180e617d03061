"""Oblique and resampled grids: a reconstructed case moved onto another voxel grid.

Many archives hold SWI that is not on the acquisition grid: reformatted along the AC-PC line,
resampled to another pixel size or slice thickness, tilted to the patient's head. A case drawn
with `oblique` is simulated on its axial acquisition grid as usual, then resampled, all in one
physical space, onto a grid rotated by `angle_deg` about `axis` (scanner LPS), with in-plane
spacing `spacing_mm` (x `aspect` along i) and `thickness_mm` along the new slice axis, large
enough to hold every acquired voxel. The image and phase are interpolated linearly (SimpleITK),
the label map and mimic map by nearest neighbour, so they stay exact codes.

After nearest-neighbour resampling a bleed's outline is re-measured on the new grid (voxels,
apparent diameter, size class); a bleed keeps only its largest 26-connected piece, outlines that
come to touch are parted by removing the later one's contact voxels, and a bleed left with no
voxel gets the one voxel nearest its centre, so every bleed stays labelled.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..io import Geometry, to_sitk

STRUCTURE_26 = np.ones((3, 3, 3), bool)
MAX_VOXEL_GROWTH = 1.5  # the resampled grid holds at most this many times the acquired voxels (spacing
# grows on all axes alike when the drawn one would exceed it)


def oblique_geometry(
    geometry: Geometry, shape_kji: tuple[int, int, int], oblique: dict[str, object],
    fixed_kji: tuple[int | None, int | None, int | None] = (None, None, None),
) -> tuple[Geometry, tuple[int, int, int]]:
    """The resampled grid: direction, spacing, origin and size (k, j, i) covering the
    acquired grid's corners.

    `fixed_kji`: sizes the user asked for (--slices, --matrix rows and columns), None where
    drawn. Such an axis gets exactly that many voxels, spaced to span the same extent (its
    first and last voxel centres on the extreme acquired corners), so the grid still holds
    every acquired voxel."""
    rotation = Rotation.from_rotvec(np.deg2rad(float(oblique["angle_deg"])) * np.asarray(oblique["axis"], float))  # type: ignore[arg-type]
    direction = rotation.as_matrix() @ geometry.direction_matrix
    s = float(oblique["spacing_mm"])  # type: ignore[arg-type]
    spacing = np.array([s * float(oblique["aspect"]), s, float(oblique["thickness_mm"])])  # type: ignore[arg-type]
    n = np.array(shape_kji[::-1], float)
    corners = np.array([[a, b, c] for a in (0, n[0] - 1) for b in (0, n[1] - 1) for c in (0, n[2] - 1)])
    lps = geometry.index_to_lps(corners)
    local = lps @ direction  # coordinates along the new axes (direction columns)
    lo, hi = local.min(0) - spacing / 2.0, local.max(0) + spacing / 2.0
    size = np.ceil((hi - lo) / spacing).astype(int)
    limit = MAX_VOXEL_GROWTH * float(np.prod(n))
    if np.prod(size.astype(float)) > limit:  # too fine for the field of view: coarser on every axis
        spacing *= np.cbrt(np.prod(size.astype(float)) / limit)
        size = np.ceil((hi - lo) / spacing).astype(int)
    size = np.maximum(size, 4)
    for axis, wanted in enumerate(fixed_kji[::-1]):  # i, j, k
        if wanted is not None:
            size[axis] = int(wanted)
            spacing[axis] = max(float(local[:, axis].max() - local[:, axis].min()), 1e-3) / (int(wanted) - 1)
            lo[axis] = local[:, axis].min() - spacing[axis] / 2.0
    origin = direction @ (lo + spacing / 2.0)
    grid = Geometry(tuple(float(v) for v in spacing), tuple(float(v) for v in origin),
                    tuple(float(v) for v in direction.ravel()))
    return grid, (int(size[2]), int(size[1]), int(size[0]))


def resample(array: np.ndarray, source: Geometry, target: Geometry, shape_kji: tuple[int, int, int], nearest: bool) -> np.ndarray:
    """`array` on `source` resampled onto `target` (0 outside), keeping its dtype."""
    reference = sitk.Image([int(v) for v in shape_kji[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(target.spacing)
    reference.SetOrigin(target.origin)
    reference.SetDirection(target.direction)
    image = to_sitk(array, source)
    out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                        0.0, image.GetPixelID())
    return sitk.GetArrayFromImage(out).astype(array.dtype, copy=False)


def tidy_labels(labels: np.ndarray, centres_kji: dict[int, np.ndarray]) -> tuple[np.ndarray, dict[int, int]]:
    """Resampled labels made valid again (see module text). Returns the labels and, per
    original id, the new id (1..n in the old order)."""
    out = np.zeros(labels.shape, np.uint16)
    boxes = ndimage.find_objects(labels)
    for lesion_id in sorted(centres_kji):
        box = boxes[lesion_id - 1] if lesion_id - 1 < len(boxes) else None
        if box is not None:
            grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            mask = labels[grown] == lesion_id
            parts, n = ndimage.label(mask, structure=STRUCTURE_26)
            if n > 1:
                mask = parts == (1 + int(np.argmax(np.bincount(parts.ravel())[1:])))
            # Part it from outlines already placed: no contact voxels.
            taken = ndimage.binary_dilation(out[grown] > 0, STRUCTURE_26)
            mask &= ~taken
            if mask.any():
                parts, n = ndimage.label(mask, structure=STRUCTURE_26)
                if n > 1:
                    mask = parts == (1 + int(np.argmax(np.bincount(parts.ravel())[1:])))
                out[grown][mask] = lesion_id
                continue
        k, j, i = np.clip(np.rint(centres_kji[lesion_id]).astype(int), 0, np.array(labels.shape) - 1)
        if out[max(k - 1, 0):k + 2, max(j - 1, 0):j + 2, max(i - 1, 0):i + 2].any():
            continue  # no room left: the bleed is dropped (recorded by the caller)
        out[k, j, i] = lesion_id
    present = [i for i in sorted(centres_kji) if (out == i).any()]
    mapping = {old: new for new, old in enumerate(present, start=1)}
    lookup = np.zeros(max(centres_kji, default=0) + 1, np.uint16)
    for old, new in mapping.items():
        lookup[old] = new
    return lookup[out], mapping
