"""Nodes and their grids: volume node <-> numpy + Geometry, the roles and attributes that link
one run's outputs, and .seg.nrrd files through Slicer's own storage nodes.

Coordinates. A volume node maps voxel (i, j, k) to RAS through its IJK-to-RAS matrix; the core
works in LPS (as SimpleITK). `volume_from_node` converts exactly (spacing, origin and the full
direction matrix), so oblique and anisotropic grids survive.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..io import LPS_TO_RAS, Geometry, Volume

# Node reference roles and attributes, so the outputs of one run find each other.
TABLE_ROLE = "CMBDetectLesionTable"
MARKUPS_ROLE = "CMBDetectLesionCentroids"
INPUT_ROLE = "CMBDetectInputVolume"
PROBABILITY_ROLE = "CMBDetectProbabilityMap"
REJECTED_ROLE = "CMBDetectRejectedCandidates"
REJECTED_TABLE_ROLE = "CMBDetectRejectedTable"
ATTRIBUTE_PREFIX = "CMBDetect."
SUMMARY_ATTRIBUTE = ATTRIBUTE_PREFIX + "Summary"  # JSON of DetectionResult.summary()
CREATED_ATTRIBUTE = ATTRIBUTE_PREFIX + "Created"  # "1" on every node CMBDetect made: only those are reused
# On the kept probability map of a two-stage run: JSON list of every candidate and its verdict
# (records.candidate_record), which the live threshold re-cuts.
CANDIDATES_ATTRIBUTE = ATTRIBUTE_PREFIX + "Candidates"
# On a segmentation: the fingerprint of its segments as CMBDetect last wrote them, so that
# manual edits are noticed before a re-threshold would replace them (results.edited_since_written).
WRITTEN_ATTRIBUTE = ATTRIBUTE_PREFIX + "WrittenFingerprint"


def is_own_output(node: Any) -> bool:
    """Whether CMBDetect made this node (only such nodes are ever emptied and refilled)."""
    return node is not None and node.GetAttribute(CREATED_ATTRIBUTE) == "1"


def own(node: Any) -> Any:
    return node if is_own_output(node) else None


def ijk_to_ras_of(volume_node: Any) -> np.ndarray:
    """The node's own (untransformed) 4x4 IJK-to-RAS matrix."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def geometry_of_node(volume_node: Any) -> Geometry:
    """The node's voxel grid as an LPS Geometry (spacing, origin, direction), exactly."""
    spacing = tuple(float(s) for s in volume_node.GetSpacing())
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(m)  # column c = direction of axis c in RAS
    directions_ras = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    origin_ras = np.asarray(volume_node.GetOrigin(), dtype=float)
    direction_lps = LPS_TO_RAS @ directions_ras
    origin_lps = LPS_TO_RAS @ origin_ras
    return Geometry(spacing, tuple(float(v) for v in origin_lps), tuple(float(v) for v in direction_lps.ravel()))


def volume_from_node(volume_node: Any) -> Volume:
    """A copy of a scalar volume node's voxels (k, j, i) as float32, with its LPS geometry."""
    if volume_node is None:
        raise ValueError("no input volume selected")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{volume_node.GetName()}' holds no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "a scalar SWI magnitude volume is needed"
        )
    dims = image.GetDimensions()  # (i, j, k)
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    # A copy: the detection must not see the node change under it, nor keep VTK memory alive.
    array = np.array(scalars.reshape(dims[2], dims[1], dims[0]), dtype=np.float32, copy=True)
    return Volume(array, geometry_of_node(volume_node))


def vtk_matrix(m: np.ndarray) -> Any:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def labelmap_image(labels: np.ndarray, ijk_to_ras: np.ndarray) -> Any:
    """A vtkOrientedImageData of a label array (k, j, i) on the given grid.

    The smallest unsigned type that holds the labels: uint8 below 256 lesions, as Slicer
    writes its own segmentations, uint16 above.
    """
    dtype = np.uint8 if (labels.size == 0 or int(labels.max()) < 256) else np.uint16
    data = np.ascontiguousarray(labels, dtype=dtype)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(data.shape[2], data.shape[1], data.shape[0])
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(data.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(data.dtype))
    )
    image.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras))
    return image


def to_world(node: Any, ras: Sequence[float]) -> np.ndarray:
    """A point from a node's local RAS to world RAS (linear or not), as Slicer displays it."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.asarray(ras, dtype=float)
    transform = vtk.vtkGeneralTransform()
    parent.GetTransformToWorld(transform)
    return np.array(transform.TransformPoint([float(v) for v in ras]))


def outputs_of(segmentation_node: Any) -> tuple[Any, Any, Any]:
    """(input volume, table, markups) linked to a segmentation written by write_result."""
    return (
        segmentation_node.GetNodeReference(INPUT_ROLE),
        segmentation_node.GetNodeReference(TABLE_ROLE),
        segmentation_node.GetNodeReference(MARKUPS_ROLE),
    )


def rejected_of(segmentation_node: Any) -> tuple[Any, Any]:
    """(points, table) of the candidates stage 2 rejected, linked to a segmentation (or None)."""
    return segmentation_node.GetNodeReference(REJECTED_ROLE), segmentation_node.GetNodeReference(REJECTED_TABLE_ROLE)


def summary_of(node: Any) -> dict | None:
    text = node.GetAttribute(SUMMARY_ATTRIBUTE) if node is not None else None
    return json.loads(text) if text else None


def load_segmentation_file(path: str, scene: Any, name: str | None = None) -> Any:
    """Read a .seg.nrrd (or labelmap file) into a new segmentation node, as Slicer loads it."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise OSError(f"Slicer could not read segmentation file {path}")
    if not name:
        node.SetName(storage.GetFileNameWithoutExtension())
    node.CreateDefaultDisplayNodes()
    return node


def save_segmentation_file(segmentation_node: Any, path: str) -> None:
    """Write a segmentation node as Slicer saves it (.seg.nrrd, on the full reference grid)."""
    scene = segmentation_node.GetScene()
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(str(path))
        storage.SetCropToMinimumExtent(False)  # keep the input's grid, as the command line does
        if not storage.WriteData(segmentation_node):
            raise OSError(f"Slicer could not write segmentation file {path}")
    finally:
        scene.RemoveNode(storage)
