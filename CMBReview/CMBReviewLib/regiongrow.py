"""Add a missed microbleed with one click: a region grown from the click, bounded to a 10 mm sphere.

A microbleed is a small dark (hypointense) blob on SWI. From the clicked voxel we take the
darkest voxel within 1 mm (a click rarely lands on the exact minimum), then keep the voxels
connected to it (6-connectivity, so the region does not leak along a diagonal into a vein)
that are darker than halfway between that minimum and the local background, the median
intensity of the 10 mm sphere around the click. The sphere is measured in mm on the grid's
spacing, so anisotropic voxels are bounded correctly, and nothing outside it is ever taken.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from CMBDetectLib.io import Geometry

MAX_DIAMETER_MM = 10.0  # the paper's largest microbleed
SEED_SEARCH_MM = 1.0
MIN_CONTRAST_SIGMA = 3.5  # how far below the local background the clicked spot must lie


def sphere_mask(shape: tuple[int, int, int], geometry: Geometry, centre_kji: tuple[int, int, int], radius_mm: float) -> np.ndarray:
    """Voxels whose centre lies within radius_mm of the centre voxel, in physical space."""
    m = geometry.ijk_to_lps()[:3, :3]  # i, j, k steps in mm (direction x spacing)
    kk, jj, ii = np.indices(shape, sparse=False)
    d_ijk = np.stack([ii - centre_kji[2], jj - centre_kji[1], kk - centre_kji[0]], axis=-1).astype(float)
    dist2 = np.einsum("...a,ab,...b->...", d_ijk, m.T @ m, d_ijk)
    return dist2 <= radius_mm**2


def grow_from_click(
    image: np.ndarray, geometry: Geometry, seed_kji: tuple[int, int, int], max_diameter_mm: float = MAX_DIAMETER_MM
) -> np.ndarray:
    """Boolean mask (k, j, i) of the dark blob at the click, never beyond a max_diameter_mm sphere.

    Raises ValueError when the click is outside the image or not on something darker than its
    surroundings, by MIN_CONTRAST_SIGMA robust standard deviations (no microbleed to grow).
    """
    seed = tuple(int(round(v)) for v in seed_kji)
    if image.ndim != 3 or any(not 0 <= s < n for s, n in zip(seed, image.shape)):
        raise ValueError(f"click {seed} (k, j, i) lies outside the image of shape {image.shape}")
    # Work in a box around the click that holds the sphere: cheap on full-size volumes.
    radius_vox = np.ceil(max_diameter_mm / 2 / np.asarray(geometry.spacing)[::-1]).astype(int) + 1  # k, j, i
    lo = np.maximum(np.subtract(seed, radius_vox), 0)
    hi = np.minimum(np.add(seed, radius_vox) + 1, image.shape)
    box = image[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float64)
    local_seed = tuple(np.subtract(seed, lo))
    inside = sphere_mask(box.shape, geometry, local_seed, max_diameter_mm / 2)

    near = sphere_mask(box.shape, geometry, local_seed, SEED_SEARCH_MM) & inside
    candidates = np.argwhere(near)
    darkest = tuple(candidates[np.argmin(box[near])])
    seed_value = box[darkest]
    around = box[inside]
    background = float(np.median(around))
    # Robust spread of the surroundings (MAD as a standard deviation): a click on plain tissue
    # finds only noise a couple of sigma below the median, a microbleed lies far below it.
    sigma = 1.4826 * float(np.median(np.abs(around - background)))
    if not background - seed_value > MIN_CONTRAST_SIGMA * sigma:
        raise ValueError(f"click {seed} (k, j, i) is not on a dark spot: nothing clearly darker than its surroundings to grow")
    level = seed_value + 0.5 * (background - seed_value)
    region, _ = ndimage.label(inside & (box <= level))  # 6-connectivity by default
    blob = region == region[darkest]
    mask = np.zeros(image.shape, bool)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = blob
    return mask
