"""Reading ground-truth label maps onto their image's grid: NIfTI/NRRD label maps or `.seg.nrrd`.

Slicer's `.seg.nrrd` may hold several layers (a 4D file) and is often cropped to the
segments' extent; both are brought onto the image's grid exactly. A label on another grid
(different spacing or direction, or a non-integer shift) is refused, never resampled.
"""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import SimpleITK as sitk

from .errors import CaseError
from .io import Geometry, Volume, geometry_of, to_sitk


def read_label_file(path: Path, case: str) -> tuple[np.ndarray, Geometry]:
    """A label map or `.seg.nrrd` on its own grid (layers of a segmentation merged)."""
    if path.name.lower().endswith(".nrrd"):
        header = nrrd.read_header(str(path))
        if int(header.get("dimension", 3)) == 4:
            # Layers first ("list" kind) in Slicer's multi-layer files: any layer's label marks a lesion.
            data, header = nrrd.read(str(path), index_order="C")
            kinds = header.get("kinds", [])
            layer_axis = next((i for i, k in enumerate(kinds) if k in ("list", "vector")), 0)
            mask = (np.moveaxis(data, 3 - layer_axis, 0) > 0).any(axis=0) if layer_axis else (data > 0).any(axis=0)
            dirs = np.array([d for d in header["space directions"] if d is not None and not np.all(np.isnan(d))], float)
            spacing = np.linalg.norm(dirs, axis=1)
            direction = (dirs / spacing[:, None]).T
            space = header.get("space", "left-posterior-superior")
            origin = np.asarray(header["space origin"], float)
            if space.startswith("right-anterior"):
                flip = np.diag([-1.0, -1.0, 1.0])
                direction, origin = flip @ direction, flip @ origin
            return mask.astype(np.uint16), Geometry(tuple(spacing), tuple(origin), tuple(direction.ravel()))
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CaseError(case, f"cannot read label {path}: {str(exc).strip().splitlines()[-1]}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(case, f"label {path.name} is not a 3D scalar label map")
    return sitk.GetArrayFromImage(image), geometry_of(image)


def read_label(path: str | Path, case: str, like: Volume) -> np.ndarray:
    """The label map on `like`'s grid, as an integer array (k, j, i)."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(case, f"label file not found: {path}")
    array, geometry = read_label_file(path, case)
    if array.shape == like.shape and geometry.matches(like.geometry):
        return array
    g = like.geometry
    same_axes = np.allclose(geometry.spacing, g.spacing, atol=1e-4) and np.allclose(geometry.direction, g.direction, atol=1e-4)
    offset = np.linalg.solve(g.ijk_to_lps()[:3, :3], np.subtract(geometry.origin, g.origin)) if same_axes else None
    if offset is None or not np.allclose(offset, np.round(offset), atol=1e-3):
        raise CaseError(case, f"label {path.name} is on another grid than its image (spacing, direction or origin differ)")
    # A sub-box (or super-box) of the image grid: nearest-neighbour resampling is an exact paste.
    label_image = to_sitk(array.astype(np.uint16), geometry)
    reference = to_sitk(np.zeros(like.shape, np.uint8), g)
    pasted = sitk.Resample(label_image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return sitk.GetArrayFromImage(pasted)
