"""A detection result into nodes, and the live threshold.

`write_result` fills (new or reused) segmentation, table and markups nodes, all linked to each
other and to the input by node references. Re-running on the same nodes replaces their content,
but only in nodes CMBDetect made: every output carries the attribute CMBDetect.Created, and a
segmentation without it (a user's manual segmentation, say) is never emptied unless the caller
says the user agreed (`reuse_foreign=True`); otherwise a new segmentation is made. If the input
sits under a transform, the outputs are placed under the same transform, and nothing is ever
resampled.

Live threshold: the probability map of a run is kept as a hidden scalar volume node linked to
the segmentation (with a two-stage run's candidates and verdicts); `rethreshold` re-extracts
the lesions from it (no network) and rewrites the segments, table, markups, rejected
candidates and summary. It cuts what the run cut (detection/rethreshold.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..detection.records import Candidate, candidate_from_record, candidate_record
from ..detection.rethreshold import LesionMap, lesions_from_probability
from .display import fill_markups, fill_segmentation, fill_table, place_in_subject_hierarchy, show_rejected
from .nodes import (
    CANDIDATES_ATTRIBUTE,
    CREATED_ATTRIBUTE,
    INPUT_ROLE,
    MARKUPS_ROLE,
    PROBABILITY_ROLE,
    SUMMARY_ATTRIBUTE,
    TABLE_ROLE,
    WRITTEN_ATTRIBUTE,
    geometry_of_node,
    ijk_to_ras_of,
    is_own_output,
    outputs_of,
    own,
    summary_of,
    vtk_matrix,
)

def write_result(
    result: Any,
    input_volume_node: Any,
    segmentation_node: Any = None,
    table_node: Any = None,
    markups_node: Any = None,
    scene: Any = None,
    reuse_foreign: bool = False,
) -> tuple[Any, Any, Any]:
    """Put a DetectionResult into (new or reused) segmentation, table and markups nodes.

    `result` needs .labels (k, j, i), .lesions, .geometry (and optionally .summary()); its grid
    must be the input node's grid (the result of detect_volume(volume_from_node(input))).
    A `segmentation_node` CMBDetect did not make is replaced by a new one, unless
    `reuse_foreign` (the user confirmed that its segments may be replaced).
    With a `.probability` map on the result, it is kept as the segmentation's hidden
    probability volume (see `rethreshold`).
    Returns (segmentation_node, table_node, markups_node).
    """
    scene = scene or input_volume_node.GetScene()
    if scene is None:
        raise ValueError("the input volume is not in a scene")
    _check_same_grid(result, input_volume_node)

    if segmentation_node is not None and not (reuse_foreign or is_own_output(segmentation_node)):
        segmentation_node = None  # never empty a segmentation CMBDetect did not make
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{input_volume_node.GetName()} microbleeds")
    # A re-run on the same segmentation reuses the table and markups of the previous run
    # (only those CMBDetect made: a reference could have been pointed at a user's node).
    if table_node is None:
        table_node = own(segmentation_node.GetNodeReference(TABLE_ROLE))
    if markups_node is None:
        markups_node = own(segmentation_node.GetNodeReference(MARKUPS_ROLE))
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{input_volume_node.GetName()} microbleed table")
    if markups_node is None:
        markups_node = scene.AddNewNodeByClass(
            "vtkMRMLMarkupsFiducialNode", f"{input_volume_node.GetName()} microbleed centroids"
        )
    for node in (segmentation_node, table_node, markups_node):
        node.SetAttribute(CREATED_ATTRIBUTE, "1")

    # Same parent transform as the input, set before the reference geometry so that the
    # segmentation's geometry is the volume's grid in the segmentation's own frame.
    transform_id = input_volume_node.GetTransformNodeID()
    for node in (segmentation_node, markups_node):
        node.SetAndObserveTransformNodeID(transform_id)

    fill_segmentation(segmentation_node, input_volume_node, result.labels, result.lesions)
    fill_table(table_node, result.lesions)
    fill_markups(markups_node, input_volume_node, result.lesions)

    segmentation_node.SetNodeReferenceID(TABLE_ROLE, table_node.GetID())
    segmentation_node.SetNodeReferenceID(MARKUPS_ROLE, markups_node.GetID())
    for node in (segmentation_node, table_node, markups_node):
        node.SetNodeReferenceID(INPUT_ROLE, input_volume_node.GetID())
        if hasattr(result, "summary"):
            node.SetAttribute(SUMMARY_ATTRIBUTE, json.dumps(result.summary()))
    segmentation_node.SetAttribute(WRITTEN_ATTRIBUTE, segments_fingerprint(segmentation_node))
    candidates, rejected = _stage_lists(result)
    if getattr(result, "probability", None) is not None:
        _keep_probability(result.probability, input_volume_node, segmentation_node, scene, candidates)
    place_in_subject_hierarchy(scene, input_volume_node, (segmentation_node, table_node, markups_node))
    show_rejected(segmentation_node, input_volume_node, rejected)
    return segmentation_node, table_node, markups_node


def segments_fingerprint(segmentation_node: Any) -> str:
    """sha256 over each segment's id, name and voxels, whatever layers hold them.

    Voxels are taken as indices on the labelmap's grid (the input's), from the nonzero voxels
    of each layer once: the same segments give the same fingerprint after the Segment Editor
    moved them between layers, or after the scene was saved and loaded (files may be cropped)."""
    segmentation = segmentation_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    digest = hashlib.sha256()
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        digest.update(f"{segmentation.GetNthSegmentID(n)}\0{segment.GetName()}\0".encode())
        image = segment.GetRepresentation(labelmap_name)
        if image is None:
            continue
        key = image.GetAddressAsString("vtkObject")
        if key not in layers:
            layers[key] = _nonzero_voxels(image)
        where, values = layers[key]
        digest.update(np.ascontiguousarray(where[values == segment.GetLabelValue()]).tobytes())
    return digest.hexdigest()


def _nonzero_voxels(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) int64 (k, j, i) indices of the nonzero voxels on the image's own grid, and their values."""
    scalars = image.GetPointData().GetScalars()
    extent = image.GetExtent()
    if scalars is None or extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return np.zeros((0, 3), np.int64), np.zeros(0)
    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    array = numpy_support.vtk_to_numpy(scalars).reshape(dims)
    where = np.argwhere(array)
    return where + np.array([extent[4], extent[2], extent[0]]), array[tuple(where.T)]


def edited_since_written(segmentation_node: Any) -> bool:
    """Whether the segments changed (voxels, segments added, removed or renamed) since
    CMBDetect last wrote them; False for a segmentation it never wrote."""
    written = segmentation_node.GetAttribute(WRITTEN_ATTRIBUTE)
    return bool(written) and written != segments_fingerprint(segmentation_node)


def _stage_lists(result: Any) -> tuple[list[Candidate] | None, list[Candidate] | None]:
    """(every candidate, the rejected ones) of a two-stage result; (None, None) for one stage.

    A LesionMap carries both; a pipeline DetectionResult has its kept lesions and rejections."""
    candidates = getattr(result, "candidates", None)
    if candidates is None and getattr(result, "candidate_stage", None) is not None:
        candidates = [*result.lesions, *result.rejected]
    if candidates is None:
        return None, None
    return list(candidates), list(getattr(result, "rejected", None) or [])


def _keep_probability(
    probability: np.ndarray, volume_node: Any, segmentation_node: Any, scene: Any, candidates: list[Candidate] | None = None
) -> Any:
    """The probability map as a scalar volume node on the input's grid, linked from the
    segmentation and saved with the scene. Hidden: no display node, and HideFromEditors keeps
    it out of the node selectors (the input selector would otherwise offer it as an SWI).
    A two-stage run's candidates and verdicts go with it (CANDIDATES_ATTRIBUTE)."""
    node = own(segmentation_node.GetNodeReference(PROBABILITY_ROLE))
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{volume_node.GetName()} microbleed probability")
        node.SetAttribute(CREATED_ATTRIBUTE, "1")
        node.SetHideFromEditors(True)
    data = np.ascontiguousarray(probability, dtype=np.float32)
    image = vtk.vtkImageData()
    image.SetDimensions(data.shape[2], data.shape[1], data.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(data.ravel(), deep=True, array_type=vtk.VTK_FLOAT))
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras_of(volume_node)))
    node.SetAndObserveImageData(image)
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.SetNodeReferenceID(INPUT_ROLE, volume_node.GetID())
    if candidates is None:
        node.RemoveAttribute(CANDIDATES_ATTRIBUTE)
    else:
        node.SetAttribute(CANDIDATES_ATTRIBUTE, json.dumps([candidate_record(c) for c in candidates]))
    segmentation_node.SetNodeReferenceID(PROBABILITY_ROLE, node.GetID())
    return node


def candidates_of(segmentation_node: Any) -> list[Candidate] | None:
    """The run's candidates and their verdicts, kept with its probability map; None for one stage."""
    node = own(segmentation_node.GetNodeReference(PROBABILITY_ROLE)) if segmentation_node is not None else None
    text = node.GetAttribute(CANDIDATES_ATTRIBUTE) if node is not None else None
    return None if not text else [candidate_from_record(r) for r in json.loads(text)]


def probability_of(segmentation_node: Any) -> np.ndarray | None:
    """The kept probability map (k, j, i) of a segmentation CMBDetect wrote, or None."""
    node = own(segmentation_node.GetNodeReference(PROBABILITY_ROLE)) if segmentation_node is not None else None
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        return None
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])


def rethreshold(
    segmentation_node: Any,
    threshold: float,
    min_diameter_mm: float,
    max_diameter_mm: float,
) -> tuple[LesionMap, Any, Any, Any]:
    """Lesions again from the segmentation's kept probability map, with a new threshold or size
    range; rewrites its segments, table, markups and summary. No network runs.

    Returns (lesion map, segmentation, table, markups). Raises ValueError when the segmentation
    has no kept probability map or its input volume is gone.
    """
    probability = probability_of(segmentation_node)
    input_node, table_node, markups_node = outputs_of(segmentation_node)
    if probability is None or input_node is None or input_node.GetScene() is None:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no probability map and input volume to re-threshold")
    run = summary_of(segmentation_node) or {}
    result = lesions_from_probability(
        probability, geometry_of_node(input_node), threshold, min_diameter_mm, max_diameter_mm, run,
        candidates_of(segmentation_node),
    )  # fmt: skip
    # The map is already kept: write only the lesions (a LesionMap without re-storing it).
    lesion_only = _LesionsOnly(result)
    nodes = write_result(lesion_only, input_node, segmentation_node, own(table_node), own(markups_node))
    return (result, *nodes)


class _LesionsOnly:
    """A LesionMap seen without its probability, so write_result leaves the kept map (and the
    candidates kept with it) alone."""

    probability = None

    def __init__(self, result: LesionMap) -> None:
        self.labels, self.lesions, self.geometry, self.summary = result.labels, result.lesions, result.geometry, result.summary
        self.candidates, self.rejected = result.candidates, result.rejected


def _check_same_grid(result: Any, volume_node: Any) -> None:
    dims = volume_node.GetImageData().GetDimensions() if volume_node.GetImageData() else None
    if dims is None or tuple(result.labels.shape) != (dims[2], dims[1], dims[0]):
        raise ValueError(
            f"result grid {tuple(result.labels.shape)} (k, j, i) does not match volume "
            f"'{volume_node.GetName()}' of {dims} (i, j, k) voxels"
        )
    if not result.geometry.matches(geometry_of_node(volume_node)):
        raise ValueError(f"result geometry {result.geometry} is not that of volume '{volume_node.GetName()}'")
    # Segments share one labelmap whose values are the lesion ids: they must agree.
    ids = sorted(lesion.id for lesion in result.lesions)
    top = int(result.labels.max()) if result.labels.size else 0
    if ids != list(range(1, len(ids) + 1)) or top != len(ids):
        raise ValueError(f"label map (values up to {top}) and lesion list (ids {ids[:3]}...) disagree")
