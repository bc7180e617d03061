"""The MRML adapter: numpy + Geometry <-> vtkMRML nodes. The only core file that imports slicer.

It uses only what both the Slicer application and slicer-core provide (node classes, storage
nodes, static logic methods), never `slicer.app`, `slicer.util.loadVolume`/`saveNode` or Qt,
so it is tested headless against slicer-core's real scene.

Coordinates. A volume node maps voxel (i, j, k) to RAS through its IJKToRAS matrix; the core
works in LPS (as SimpleITK). `volume_from_node` converts exactly (spacing, origin and the full
direction matrix, so oblique and anisotropic grids survive). Detection runs on the node's own
voxel grid; if the node sits under a transform, the outputs are placed under the same
transform, so they coincide with the input wherever the transform moves it, and nothing is
ever resampled.

Outputs of `write_result`, all linked to each other and to the input by node references:
- a segmentation node, reference geometry = the input volume, one segment per lesion, named
  "CMB <id>" with ID "CMB_<id>", coloured by size class, with the terminology and size tags of
  `outputs.write_segmentation_nrrd` (so a segmentation made in Slicer and one written by the
  command line carry the same fields);
- a table node, one row per lesion, the columns of the command line's CSV;
- a markups fiducial node, one locked control point per lesion centroid, labelled "CMB <id>".

Re-running on the same nodes replaces their content (the table and the markups are found
from the segmentation's node references when not passed), but only in nodes CMBDetect made:
every output carries the attribute CMBDetect.Created, and a segmentation without it (a user's
manual segmentation, say) is never emptied unless the caller says the user agreed
(`reuse_foreign=True`); otherwise a new segmentation is made.

Live threshold: the probability map of a run is kept as a hidden scalar volume node linked to
the segmentation; `rethreshold` re-extracts the lesions from it (no network) and rewrites the
segments, table, markups and summary.

Detection from Slicer runs in a child process (detection/runner.py): `DetectionJob` writes
the input node to a file, starts the worker, and, only when the run succeeded and the input
is still in the scene, turns its probability map into nodes; a cancelled or failed run, or
one whose input was deleted meanwhile, leaves the scene as it was.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .detection import outputs
from .detection.lesions import CLASS_COLORS, DEFAULT_THRESHOLD, MAX_DIAMETER_MM, MIN_DIAMETER_MM, Lesion
from .detection.outputs import LESION_COLUMNS, TERMINOLOGY_ENTRY, lesion_row
from .detection.rethreshold import LesionMap, lesions_from_probability
from .io import LPS_TO_RAS, Geometry, Volume, write_volume

# Node reference roles and attributes, so the outputs of one run find each other.
TABLE_ROLE = "CMBDetectLesionTable"
MARKUPS_ROLE = "CMBDetectLesionCentroids"
INPUT_ROLE = "CMBDetectInputVolume"
PROBABILITY_ROLE = "CMBDetectProbabilityMap"
REJECTED_ROLE = "CMBDetectRejectedCandidates"
ATTRIBUTE_PREFIX = "CMBDetect."
SUMMARY_ATTRIBUTE = ATTRIBUTE_PREFIX + "Summary"  # JSON of DetectionResult.summary()
CREATED_ATTRIBUTE = ATTRIBUTE_PREFIX + "Created"  # "1" on every node CMBDetect made: only those are reused

CENTROID_COLOR = (1.0, 0.55, 0.0)  # orange markups: visible on dark SWI, distinct from the segments
REJECTED_COLOR = (0.55, 0.55, 0.55)  # grey: what stage 2 turned down, never to be taken for a finding
MAX_REJECTED_LABELS = 20

# Column titles, units and meanings shown by Slicer's table view (the names stay the CSV's).
_COLUMN_INFO: dict[str, tuple[str, str, str]] = {
    "id": ("Lesion", "", "lesion number, as in the segment name CMB <id>"),
    "size_class": ("Class", "", "small: 2-5 mm, large: 5-10 mm equivalent diameter"),
    "diameter_mm": ("Diameter (mm)", "mm", "equivalent diameter: the sphere of the lesion's volume"),
    "volume_mm3": ("Volume (mm3)", "mm3", "lesion volume"),
    "n_voxels": ("Voxels", "", "voxels in the lesion"),
    "mean_probability": ("Mean p", "", "mean network probability over the lesion"),
    "max_probability": ("Max p", "", "highest network probability in the lesion"),
    "p_microbleed": ("P(CMB)", "", "candidate stage: the classifier's probability that this is a microbleed"),
    "certainty": ("Certainty", "", "candidate stage: definite (P >= 0.8) or possible"),
    **{f"centroid_{a}": (a.upper(), "", f"centroid, voxel index (0-based) along {a}") for a in "ijk"},
    **{f"centroid_{a}": (f"{a.upper()} (mm)", "mm", f"centroid, RAS (Slicer's patient coordinates) {a.upper()}") for a in "ras"},
    **{
        f"centroid_{c}": (f"{a} LPS (mm)", "mm", f"centroid, LPS (DICOM patient coordinates) {a}")
        for c, a in (("l", "L"), ("p", "P"), ("s_lps", "S"))
    },
}


def segment_id(lesion: Lesion) -> str:
    return f"CMB_{lesion.id}"


# --- Volumes ----------------------------------------------------------------------------


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


# --- Writing a detection result ---------------------------------------------------------


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
        table_node = _own(segmentation_node.GetNodeReference(TABLE_ROLE))
    if markups_node is None:
        markups_node = _own(segmentation_node.GetNodeReference(MARKUPS_ROLE))
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

    _fill_segmentation(segmentation_node, input_volume_node, result.labels, result.lesions)
    _fill_table(table_node, result.lesions)
    _fill_markups(markups_node, input_volume_node, result.lesions)

    segmentation_node.SetNodeReferenceID(TABLE_ROLE, table_node.GetID())
    segmentation_node.SetNodeReferenceID(MARKUPS_ROLE, markups_node.GetID())
    for node in (segmentation_node, table_node, markups_node):
        node.SetNodeReferenceID(INPUT_ROLE, input_volume_node.GetID())
        if hasattr(result, "summary"):
            node.SetAttribute(SUMMARY_ATTRIBUTE, json.dumps(result.summary()))
    if getattr(result, "probability", None) is not None:
        _keep_probability(result.probability, input_volume_node, segmentation_node, scene)
    _place_in_subject_hierarchy(scene, input_volume_node, (segmentation_node, table_node, markups_node))
    return segmentation_node, table_node, markups_node


def is_own_output(node: Any) -> bool:
    """Whether CMBDetect made this node (only such nodes are ever emptied and refilled)."""
    return node is not None and node.GetAttribute(CREATED_ATTRIBUTE) == "1"


def _own(node: Any) -> Any:
    return node if is_own_output(node) else None


def _keep_probability(probability: np.ndarray, volume_node: Any, segmentation_node: Any, scene: Any) -> Any:
    """The probability map as a scalar volume node on the input's grid, linked from the
    segmentation and saved with the scene. Hidden: no display node, and HideFromEditors keeps
    it out of the node selectors (the input selector would otherwise offer it as an SWI)."""
    node = _own(segmentation_node.GetNodeReference(PROBABILITY_ROLE))
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
    segmentation_node.SetNodeReferenceID(PROBABILITY_ROLE, node.GetID())
    return node


def probability_of(segmentation_node: Any) -> np.ndarray | None:
    """The kept probability map (k, j, i) of a segmentation CMBDetect wrote, or None."""
    node = _own(segmentation_node.GetNodeReference(PROBABILITY_ROLE)) if segmentation_node is not None else None
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
        probability, geometry_of_node(input_node), threshold, min_diameter_mm, max_diameter_mm, run
    )
    # The map is already kept: write only the lesions (a LesionMap without re-storing it).
    lesion_only = _LesionsOnly(result)
    nodes = write_result(lesion_only, input_node, segmentation_node, _own(table_node), _own(markups_node))
    return (result, *nodes)


class _LesionsOnly:
    """A LesionMap seen without its probability, so write_result leaves the kept map alone."""

    probability = None

    def __init__(self, result: LesionMap) -> None:
        self.labels, self.lesions, self.geometry, self.summary = result.labels, result.lesions, result.geometry, result.summary


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


def vtk_matrix(m: np.ndarray) -> Any:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _fill_segmentation(segmentation_node: Any, volume_node: Any, labels: np.ndarray, lesions: list[Lesion]) -> None:
    """One segment per lesion, all sharing one labelmap layer (label value = lesion id).

    Why not one array push per lesion (slicer.util.updateSegmentBinaryLabelmapFromArray): it
    copies the whole volume per lesion and makes one layer each. Measured under slicer-core,
    284 lesions in an 80x384x384 volume, medians of 3: shared layer 0.04 s,
    ImportLabelmapToSegmentationNode 0.21 s (and random segment IDs), one push per lesion
    0.13 s per lesion, 36 s in all.
    """
    # Also sets the reference-geometry node reference, which DICOM SEG export needs.
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()

    segmentation = segmentation_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    was_modifying = segmentation_node.StartModify()
    try:
        # Drop the segments' labelmaps first: removing a segment that still shares a layer
        # erases its voxels from that layer, a pass over the whole volume per segment (under
        # slicer-core, 149 lesions in 80x384x384: 7.8 s, against 0.01 s this way). The live
        # threshold replaces every segment on each move, so this is its cost.
        for n in range(segmentation.GetNumberOfSegments()):
            segmentation.GetNthSegment(n).RemoveRepresentation(labelmap_name)
        segmentation.RemoveAllSegments()
        if lesions:
            layer = labelmap_image(labels, ijk_to_ras_of(volume_node))
            for lesion in lesions:
                segment = slicer.vtkSegment()
                segment.SetName(lesion.name)
                segment.SetNameAutoGenerated(False)
                segment.SetColor(*CLASS_COLORS[lesion.size_class])
                segment.SetColorAutoGenerated(False)
                segment.SetLabelValue(lesion.id)
                # The same image object for every segment: they form one layer.
                segment.AddRepresentation(labelmap_name, layer)
                # SetTag form rather than SetTerminology, which is the same call under a name
                # that only Slicer >= 5.10 has; this one works on every supported version.
                segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), TERMINOLOGY_ENTRY)
                for tag, value in segment_tags(lesion).items():
                    segment.SetTag(tag, value)
                segmentation.AddSegment(segment, segment_id(lesion))
    finally:
        segmentation_node.EndModify(was_modifying)


def segment_tags(lesion: Lesion) -> dict[str, str]:
    """The lesion's measurement tags, taken from the .seg.nrrd writer so both stay identical.

    outputs.segment_tags gives Slicer's file form "key:value|key:value|"; the terminology
    entry among them is set by _fill_segmentation itself.
    """
    pairs = (item.split(":", 1) for item in outputs.segment_tags(lesion).split("|") if item)
    return {key: value for key, value in pairs if key != slicer.vtkSegment.GetTerminologyEntryTagName()}


def _fill_table(table_node: Any, lesions: list[Lesion]) -> None:
    """One row per lesion, the columns of the command line's CSV (outputs.LESION_COLUMNS)."""
    rows = [lesion_row(lesion) for lesion in lesions]
    was_modifying = table_node.StartModify()
    try:
        table_node.SetLocked(False)
        table_node.RemoveAllColumns()
        table = table_node.GetTable()
        for name in LESION_COLUMNS:
            if name in ("size_class", "certainty"):
                column = vtk.vtkStringArray()
            elif name in ("id", "n_voxels"):
                column = vtk.vtkIntArray()
            else:
                column = vtk.vtkDoubleArray()
            column.SetName(name)
            column.SetNumberOfValues(len(rows))
            for r, row in enumerate(rows):
                value = row[name]
                # Stage-2 columns are empty in the single-stage pipeline: NaN in a number column.
                column.SetValue(r, float("nan") if value == "" and name not in ("size_class", "certainty") else value)
            table.AddColumn(column)
        for name, (title, unit, description) in _COLUMN_INFO.items():
            if name not in LESION_COLUMNS:
                continue
            table_node.SetColumnTitle(name, title)
            if unit:
                table_node.SetColumnUnitLabel(name, unit)
            table_node.SetColumnDescription(name, description)
        table_node.SetUseColumnTitleAsColumnHeader(True)  # show the titles, keep the CSV's names
        table_node.SetLocked(True)  # results, not an editable sheet
        table.Modified()
    finally:
        table_node.EndModify(was_modifying)


def _fill_markups(markups_node: Any, volume_node: Any, lesions: list[Lesion]) -> None:
    """Locked centroid points, placed with the volume node's own IJK-to-RAS.

    The centroid is taken from the lesion's voxel-index centroid and the node's matrix rather
    than from lesion.centroid_ras, so the point lies in exactly the frame of the input node.
    """
    points = [(lesion.centroid_ijk, lesion.name, f"{lesion.size_class}, {lesion.diameter_mm:.1f} mm, p={lesion.max_probability:.2f}")
              for lesion in lesions]  # fmt: skip
    # With tens of lesions, "CMB n" labels cover the slice views: the table names them, and a
    # click on the point shows its label. The user can switch labels back on.
    _fill_points(markups_node, volume_node, points, CENTROID_COLOR, show_labels=False)


def _fill_points(node: Any, volume_node: Any, points: Sequence[tuple], color: tuple, show_labels: bool) -> None:
    """Replace `node`'s control points by locked ones at (ijk, label, description), placed
    with the volume node's own IJK-to-RAS."""
    ijk_to_ras = ijk_to_ras_of(volume_node)
    was_modifying = node.StartModify()
    try:
        node.SetLocked(False)
        node.SetFixedNumberOfControlPoints(False)
        node.RemoveAllControlPoints()
        for ijk, label, description in points:
            ras = ijk_to_ras @ np.array([*ijk, 1.0])
            index = node.AddControlPoint(vtk.vtkVector3d(*ras[:3]), label)
            node.SetNthControlPointDescription(index, description)
            node.SetNthControlPointLocked(index, True)
        # The points are results: no moving, adding or deleting them by a stray click.
        node.SetFixedNumberOfControlPoints(True)
        node.SetLocked(True)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*color)
            display.SetColor(*color)
            display.SetPointLabelsVisibility(show_labels)
    finally:
        node.EndModify(was_modifying)


def show_rejected(segmentation_node: Any, volume_node: Any, rejected: Sequence[dict]) -> Any:
    """The candidates stage 2 rejected, as locked grey points labelled with their reason, so
    that a reader sees why a dark dot was not called a bleed.

    `rejected`: rows of `<case>_rejected.csv` (outputs.REJECTED_COLUMNS). The node is linked
    from the segmentation (REJECTED_ROLE) and refilled by the next run on it; a run without
    rejections empties it, and none is made until there is something to show. Returns the node
    or None. The live threshold leaves it alone: the rejections belong to the run.
    """
    node = _own(segmentation_node.GetNodeReference(REJECTED_ROLE))
    if node is None and not rejected:
        return None
    if node is None:
        node = segmentation_node.GetScene().AddNewNodeByClass(
            "vtkMRMLMarkupsFiducialNode", f"{volume_node.GetName()} rejected candidates"
        )
        node.SetAttribute(CREATED_ATTRIBUTE, "1")
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    points = [
        ([float(row[f"centroid_{a}"]) for a in "ijk"], str(row["reason"]),
         f"rejected as {row['reason']}: P(microbleed) {float(row['p_microbleed']):.2f}, {float(row['diameter_mm']):.1f} mm")
        for row in rejected
    ]  # fmt: skip
    # The reason is the point of showing them, but tens of labels would cover the slice views
    # (a shifted-domain case had 62 rejections); a click still shows one.
    _fill_points(node, volume_node, points, REJECTED_COLOR, show_labels=len(points) <= MAX_REJECTED_LABELS)
    node.SetNodeReferenceID(INPUT_ROLE, volume_node.GetID())
    segmentation_node.SetNodeReferenceID(REJECTED_ROLE, node.GetID())
    _place_in_subject_hierarchy(segmentation_node.GetScene(), volume_node, (node,))
    return node


def _place_in_subject_hierarchy(scene: Any, volume_node: Any, nodes: Sequence[Any]) -> None:
    """Outputs go beside the input in the Data module's tree (same study), as Slicer modules do.

    In Slicer, a Qt plugin gives every new data node its subject-hierarchy item; slicer-core
    has no such plugin, so an output without an item gets one here.
    """
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None or sh.GetScene() is None:
        return
    volume_item = sh.GetItemByDataNode(volume_node)
    if not volume_item:
        return  # the input is not in the tree: nothing to be beside
    parent = sh.GetItemParent(volume_item) or sh.GetSceneItemID()
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)


# --- The whole Slicer-side run -----------------------------------------------------------


def run_detection(
    input_volume_node: Any,
    params: Any = None,
    segmentation_node: Any = None,
    table_node: Any = None,
    markups_node: Any = None,
    progress: Any = None,
    cancel: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """Detect microbleeds in a volume node and write the outputs into nodes.

    In this process (for scripts that already hold torch; the Slicer module uses DetectionJob,
    a child process): node -> Volume -> pipeline.detect_volume -> write_result. The nodes are
    only touched after detection succeeded, so a cancelled or failed run leaves the previous
    outputs as they were. Returns (result, seg, table, markups); raises pipeline.Cancelled if
    `cancel()` turned true.
    """
    from .detection.pipeline import detect_volume  # torch is imported only when detection is asked for

    volume = volume_from_node(input_volume_node)
    result = detect_volume(volume, params, progress=progress, cancel=cancel, case=input_volume_node.GetName())
    nodes = write_result(result, input_volume_node, segmentation_node, table_node, markups_node)
    return (result, *nodes)


class InputGone(Exception):
    """The input volume left the scene (deleted, or the scene closed) while its detection ran."""


class DetectionJob:
    """One detection of a volume node in a child process: the MRML side of runner.WorkerRun.

    `__init__` copies the node's voxels and grid to `work_dir/input.nrrd` (the child never sees
    the scene); `start()` launches the worker; `poll()` and `cancel()` are the runner's;
    `finish()` loads the result into nodes, only after success and only if the input is still
    in its scene. Nothing in the scene changes before `finish()`. `cleanup()` removes the files.
    """

    def __init__(
        self,
        input_volume_node: Any,
        work_dir: str | Path | None = None,
        python: str | None = None,
        env: dict | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        min_diameter_mm: float = MIN_DIAMETER_MM,
        max_diameter_mm: float = MAX_DIAMETER_MM,
        device: str = "cpu",
        model: str | None = None,
        batch_size: int | None = None,
        phase_volume_node: Any = None,
    ) -> None:
        from .detection.runner import WorkerRun, worker_arguments

        volume = volume_from_node(input_volume_node)
        if input_volume_node.GetScene() is None:
            raise ValueError(f"volume '{input_volume_node.GetName()}' is not in a scene")
        phase = None
        if phase_volume_node is not None:
            if phase_volume_node is input_volume_node:
                raise ValueError(f"volume '{input_volume_node.GetName()}' is both the SWI and the phase image")
            phase = volume_from_node(phase_volume_node)
            if phase.shape != volume.shape or not phase.geometry.matches(volume.geometry):
                raise ValueError(
                    f"phase volume '{phase_volume_node.GetName()}' is not on the grid of '{input_volume_node.GetName()}' "
                    f"(shape {phase.shape} vs {volume.shape}, or spacing, origin or direction differ); "
                    "the candidate stage needs the phase of the same acquisition"
                )
        self.input_volume_node = input_volume_node
        self.input_id = input_volume_node.GetID()
        self.scene = input_volume_node.GetScene()
        self.threshold, self.min_diameter_mm, self.max_diameter_mm = threshold, min_diameter_mm, max_diameter_mm
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="cmbdetect-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        input_path = self.work_dir / "input.nrrd"
        write_volume(volume.array, volume.geometry, input_path, compress=False)  # fast; read at once
        phase_path = None
        if phase is not None:
            phase_path = self.work_dir / "phase.nrrd"
            write_volume(phase.array, phase.geometry, phase_path, compress=False)
        arguments = worker_arguments(
            input_path, self.work_dir / "out", "input", threshold, min_diameter_mm, max_diameter_mm, device, model, batch_size,
            phase_path,
        )
        self.run = WorkerRun(arguments, self.work_dir / "out", python=python, env=env)

    def start(self) -> None:
        self.run.start()

    def poll(self) -> list:
        return self.run.poll()

    def wait(self, timeout: float | None = None) -> str:
        return self.run.wait(timeout)

    def cancel(self) -> None:
        self.run.cancel()

    def input_present(self) -> bool:
        return self.scene.GetNodeByID(self.input_id) is self.input_volume_node

    def finish(self, segmentation_node: Any = None, reuse_foreign: bool = False) -> tuple[LesionMap, Any, Any, Any]:
        """Nodes from a successful run: (lesion map, segmentation, table, markups).

        Raises RuntimeError if the run failed or was cancelled (the worker's error message),
        InputGone if the input left the scene meanwhile. The probability map is re-read here
        and its lesions extracted with this run's threshold and size range: the same code
        as `rethreshold`, so the segments of a run and of a re-threshold never differ.
        """
        from .detection.runner import SUCCEEDED

        if self.run.state != SUCCEEDED:
            raise RuntimeError(f"microbleed detection {self.run.state}: {self.run.error}")
        if not self.input_present():
            raise InputGone(f"volume {self.input_id} left the scene during its detection")
        output = self.run.output()
        geometry = geometry_of_node(self.input_volume_node)
        if not output.probability.geometry.matches(geometry):
            raise ValueError(f"volume '{self.input_volume_node.GetName()}' changed its grid during the detection")
        run = {k: v for k, v in output.summary.items() if k != "case"}
        result = lesions_from_probability(
            output.probability.array, geometry, self.threshold, self.min_diameter_mm, self.max_diameter_mm, run
        )
        nodes = write_result(result, self.input_volume_node, segmentation_node, reuse_foreign=reuse_foreign)
        rejected_csv = outputs.output_paths(output.out_dir, "input", rejected=True)["rejected_csv"]
        rejected: list[dict] = []
        if rejected_csv.is_file():
            with open(rejected_csv, newline="") as f:
                rejected = list(csv.DictReader(f))
        show_rejected(nodes[0], self.input_volume_node, rejected)
        return (result, *nodes)

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


# --- Reading results back ---------------------------------------------------------------


def outputs_of(segmentation_node: Any) -> tuple[Any, Any, Any]:
    """(input volume, table, markups) linked to a segmentation written by write_result."""
    return (
        segmentation_node.GetNodeReference(INPUT_ROLE),
        segmentation_node.GetNodeReference(TABLE_ROLE),
        segmentation_node.GetNodeReference(MARKUPS_ROLE),
    )


def summary_of(node: Any) -> dict | None:
    text = node.GetAttribute(SUMMARY_ATTRIBUTE) if node is not None else None
    return json.loads(text) if text else None


def lesion_index(markups_node: Any, lesion_id: int) -> int | None:
    """Index of the control point of lesion `lesion_id` (labelled "CMB <id>"), or None."""
    label = f"CMB {int(lesion_id)}"
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointLabel(index) == label:
            return index
    return None


def lesion_position_world(markups_node: Any, index: int) -> np.ndarray:
    """World RAS of the index-th lesion centroid (through any parent transform)."""
    position = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(index, position)
    return np.array(position)


def jump_to_lesion(
    target: Lesion | Sequence[float],
    scene: Any = None,
    volume_node: Any = None,
    view_group: int = -1,
) -> np.ndarray:
    """Centre every slice view on a lesion (a Lesion or a world RAS point); returns world RAS.

    A Lesion's centroid lies in the input volume's frame: pass that volume node so a parent
    transform, if any, carries the point into the world where the slice views are.
    """
    if isinstance(target, Lesion):
        if volume_node is not None:
            ras = ijk_to_ras_of(volume_node) @ np.array([*target.centroid_ijk, 1.0])
            point = to_world(volume_node, ras[:3])
        else:
            point = np.asarray(target.centroid_ras, dtype=float)
    else:
        point = np.asarray(target, dtype=float)
    scene = scene or (volume_node.GetScene() if volume_node is not None else slicer.mrmlScene)
    slicer.vtkMRMLSliceNode.JumpAllSlices(
        scene, float(point[0]), float(point[1]), float(point[2]), slicer.vtkMRMLSliceNode.CenteredJumpSlice, view_group
    )
    return point


def to_world(node: Any, ras: Sequence[float]) -> np.ndarray:
    """A point from a node's local RAS to world RAS (linear or not), as Slicer displays it."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.asarray(ras, dtype=float)
    transform = vtk.vtkGeneralTransform()
    parent.GetTransformToWorld(transform)
    return np.array(transform.TransformPoint([float(v) for v in ras]))


# --- Files through Slicer's storage nodes -----------------------------------------------


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
