"""From a probability map to microbleeds: threshold, 3D connected components, size in mm.

The paper keeps lesions of 2-10 mm and reports two classes, small (2-5 mm) and large
(5-10 mm). Size here is the equivalent diameter, the diameter of the sphere with the
lesion's volume, computed from the voxel spacing so that anisotropic grids are sized right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..io import Geometry

DEFAULT_THRESHOLD = 0.4  # the paper's operating point
MIN_DIAMETER_MM = 2.0
MAX_DIAMETER_MM = 10.0
SMALL_LARGE_BOUNDARY_MM = 5.0  # small: [2, 5) mm, large: [5, 10] mm
CONNECTIVITY = 26  # voxels touching by a face, an edge or a corner belong to one lesion

# Display colours (RGB 0-1): small bleeds the orange-red of Slicer's haemorrhage code
# (SCT 50960005, recommended 188,65,28), large ones a darker red so the classes differ.
CLASS_COLORS: dict[str, tuple[float, float, float]] = {
    "small": (188 / 255, 65 / 255, 28 / 255),
    "large": (128 / 255, 0 / 255, 32 / 255),
}


@dataclass
class Lesion:
    """One detected microbleed. Centroids are (i, j, k) voxel indices and patient mm."""

    id: int
    n_voxels: int
    volume_mm3: float
    diameter_mm: float
    size_class: str
    centroid_ijk: tuple[float, float, float]
    centroid_lps: tuple[float, float, float]
    centroid_ras: tuple[float, float, float]
    mean_probability: float
    max_probability: float
    # MARS location (anatomy/locate.py): lobar | deep | infratentorial, or "unknown" when the
    # registration failed QC; "" when regions were not asked for (--no-regions).
    mars_region: str = ""
    mars_structure: str = ""
    side: str = ""

    @property
    def name(self) -> str:
        return f"CMB {self.id}"


def structure(connectivity: int = CONNECTIVITY) -> np.ndarray:
    rank = {6: 1, 18: 2, 26: 3}.get(connectivity)
    if rank is None:
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity}")
    return ndimage.generate_binary_structure(3, rank)


def label_components(mask: np.ndarray, connectivity: int = CONNECTIVITY) -> tuple[np.ndarray, int]:
    """3D connected components of a binary mask: labels 1..n in scan order, and n."""
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=structure(connectivity))
    return labels, int(n)


def equivalent_diameter_mm(n_voxels: np.ndarray | int, spacing: tuple[float, float, float]) -> np.ndarray:
    """Diameter (mm) of the sphere whose volume equals n_voxels voxels of this spacing."""
    volume = np.asarray(n_voxels, dtype=float) * float(np.prod(spacing))
    return np.cbrt(6.0 * volume / np.pi)


def size_class(diameter_mm: float) -> str:
    return "small" if diameter_mm < SMALL_LARGE_BOUNDARY_MM else "large"


def extract_lesions(
    probability: np.ndarray,
    geometry: Geometry,
    threshold: float = DEFAULT_THRESHOLD,
    min_diameter_mm: float = MIN_DIAMETER_MM,
    max_diameter_mm: float = MAX_DIAMETER_MM,
    connectivity: int = CONNECTIVITY,
) -> tuple[np.ndarray, list[Lesion]]:
    """Threshold the probability map, keep components of min..max mm, describe each.

    Returns a uint16 label map (0 background, lesions numbered 1..N in scan order) on the
    probability's grid, and the lesions in the same order.
    """
    if probability.ndim != 3:
        raise ValueError(f"probability map must be 3D, got shape {probability.shape}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, not {threshold}")
    if not 0.0 <= min_diameter_mm <= max_diameter_mm:
        raise ValueError(f"size range {min_diameter_mm}-{max_diameter_mm} mm is not a range")

    labels = np.zeros(probability.shape, np.uint16)
    mask = probability >= threshold
    # Connected components only inside the box that holds every above-threshold voxel: on a
    # real map that is a small part of the volume. Cropping keeps the scan order, so the
    # components are numbered as on the whole volume.
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if zs.size == 0:
        return labels, []
    ys = np.flatnonzero(mask.any(axis=(0, 2)))
    xs = np.flatnonzero(mask.any(axis=(0, 1)))
    crop = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    offset = np.array([zs[0], ys[0], xs[0]])
    components, n = label_components(mask[crop], connectivity)
    counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
    diameters = equivalent_diameter_mm(counts, geometry.spacing)
    kept = np.flatnonzero((diameters >= min_diameter_mm) & (diameters <= max_diameter_mm)) + 1
    if kept.size > np.iinfo(np.uint16).max:
        raise ValueError(f"{kept.size} lesions found: the probability map is not plausible")
    if kept.size == 0:
        return labels, []

    # Each kept component is described inside its own bounding box (find_objects), never by a
    # pass over the whole volume; the rest become background. Kept components are renumbered
    # 1..N in scan order.
    objects = ndimage.find_objects(components)
    region_labels = labels[crop]
    region_probability = probability[crop]
    centroids_kji = np.empty((kept.size, 3))
    means = np.empty(kept.size)
    maxima = np.empty(kept.size)
    for row, old in enumerate(kept):
        box = objects[old - 1]
        inside = components[box] == old
        region_labels[box][inside] = row + 1
        values = region_probability[box][inside]
        means[row] = values.mean(dtype=np.float64)
        maxima[row] = values.max()
        corner = np.array([s.start for s in box])
        centroids_kji[row] = np.argwhere(inside).mean(axis=0) + corner + offset
    centroids_ijk = centroids_kji[:, ::-1]
    lps = geometry.index_to_lps(centroids_ijk)
    ras = lps * np.array([-1.0, -1.0, 1.0])
    lesions = []
    for row, old in enumerate(kept):
        d = float(diameters[old - 1])
        lesions.append(
            Lesion(
                id=row + 1,
                n_voxels=int(counts[old - 1]),
                volume_mm3=float(counts[old - 1] * geometry.voxel_volume_mm3),
                diameter_mm=d,
                size_class=size_class(d),
                centroid_ijk=tuple(float(v) for v in centroids_ijk[row]),
                centroid_lps=tuple(float(v) for v in lps[row]),
                centroid_ras=tuple(float(v) for v in ras[row]),
                mean_probability=float(means[row]),
                max_probability=float(maxima[row]),
            )
        )
    return labels, lesions


def lesion_counts(lesions: list[Lesion]) -> dict[str, object]:
    """The counts every summary reports: lesions, small, large, total volume (mm3)."""
    small = sum(lesion.size_class == "small" for lesion in lesions)
    return {
        "n_lesions": len(lesions),
        "n_small": small,
        "n_large": len(lesions) - small,
        "total_volume_mm3": round(float(sum(lesion.volume_mm3 for lesion in lesions)), 3),
    }
