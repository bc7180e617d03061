"""The outline of a bleed the U-Net marked only in part: grown into the whole dark spot.

Where a blooming bleed is very dark, the U-Net's probability can stay high on a slice or two
and drop on the others; the candidate then covers part of the bleed. Under the paper's rule
(a bleed is found when more than 40% of it is covered) such a detection is a false positive
lying on a bleed that counts as missed, and its size is wrong. A reader outlines the whole
dark spot. So each candidate is grown, 6-connected (no leaking along a diagonal into a vein),
into the voxels darker than halfway between its darkest voxel and the local background (the
median of the box around it): CMBReview's rule for a reader's click. The growth is refused,
and the U-Net's mask kept, when it reaches the faces of a box `MARGIN_MM` around the candidate
(a vein, a sinus, the skull base: not the edge of a bleed) or the stage's largest diameter;
it never takes another candidate's voxels. Stage 2 decides on the U-Net's candidate and the
outline follows the decision: it changes masks and sizes, not which candidates are kept.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage

from ..io import Geometry
from .lesions import Lesion, equivalent_diameter_mm, size_class

MARGIN_MM = 5.0  # half the largest microbleed: room to grow a bleed the U-Net marked at one end
HALF = 0.5  # the outline lies halfway between the darkest voxel and the background


def grow_outlines(image: np.ndarray, geometry: Geometry, labels: np.ndarray, order: list[int], max_diameter_mm: float) -> np.ndarray:
    """A copy of the candidate map `labels` (ids 1..n) with each candidate grown into its dark
    spot (module docstring), candidates taken in `order` (ids; first served first)."""
    out = labels.copy()
    if not order:
        return out
    objects = ndimage.find_objects(labels)
    margin = np.ceil(MARGIN_MM / np.asarray(geometry.spacing, float)[::-1]).astype(int)  # k, j, i
    six = ndimage.generate_binary_structure(3, 1)
    for cid in order:
        found = objects[cid - 1] if cid - 1 < len(objects) else None
        if found is None:
            continue
        lo = np.maximum([s.start for s in found] - margin, 0)
        hi = np.minimum([s.stop for s in found] + margin, labels.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        values = image[box].astype(np.float64)
        own = labels[box] == cid
        darkest = float(values[own].min())
        background = float(np.median(values[~own]))
        if not background > darkest:
            continue
        level = darkest + HALF * (background - darkest)
        free = (out[box] == 0) | own  # never another candidate's voxels
        parts, _ = ndimage.label(free & ((values <= level) | own), structure=six)
        grown = np.isin(parts, np.unique(parts[own]))
        # Touching a face of the box (where the box is not the volume's edge) is a leak.
        faces = [grown[0], grown[-1], grown[:, 0], grown[:, -1], grown[:, :, 0], grown[:, :, -1]]
        inner = [lo[0] > 0, hi[0] < labels.shape[0], lo[1] > 0, hi[1] < labels.shape[1], lo[2] > 0, hi[2] < labels.shape[2]]
        if any(edge and face.any() for edge, face in zip(inner, faces)):
            continue
        if equivalent_diameter_mm(int(grown.sum()), geometry.spacing) > max_diameter_mm:
            continue
        out[box][grown & ~own] = cid
    return out


def redescribe(lesions: list[Lesion], labels: np.ndarray, geometry: Geometry, probability: np.ndarray) -> list[Lesion]:
    """The lesions (ids as in `labels`) described again on their grown masks: size, centroid and
    the U-Net's mean and maximum probability inside."""
    objects = ndimage.find_objects(labels)
    out = []
    for lesion in lesions:
        box = objects[lesion.id - 1]
        inside = labels[box] == lesion.id
        n = int(inside.sum())
        if n == lesion.n_voxels:
            out.append(lesion)
            continue
        kji = np.argwhere(inside).mean(axis=0) + [s.start for s in box]
        lps = geometry.index_to_lps(kji[::-1][None, :])[0]
        values = probability[box][inside]
        d = float(equivalent_diameter_mm(n, geometry.spacing))
        out.append(replace(
            lesion, n_voxels=n, volume_mm3=float(n * geometry.voxel_volume_mm3), diameter_mm=d, size_class=size_class(d),
            centroid_ijk=tuple(float(v) for v in kji[::-1]), centroid_lps=tuple(float(v) for v in lps),
            centroid_ras=tuple(float(v) for v in lps * np.array([-1.0, -1.0, 1.0])),
            mean_probability=float(values.mean(dtype=np.float64)), max_probability=float(values.max()),
        ))  # fmt: skip
    return out
