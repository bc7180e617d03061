"""What a run shows: one segment per lesion, the lesion table, the centroid points and the
rejected candidates (points and a table), placed beside the input in the subject hierarchy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import slicer
import vtk

from ..detection import records
from ..detection.lesions import CLASS_COLORS, Lesion
from ..detection.records import CLASSES, LESION_COLUMNS, REJECTED_COLUMNS, TERMINOLOGY_ENTRY, Candidate, lesion_row, rejected_row
from .nodes import CREATED_ATTRIBUTE, INPUT_ROLE, REJECTED_ROLE, REJECTED_TABLE_ROLE, ijk_to_ras_of, labelmap_image, own

CENTROID_COLOR = (1.0, 0.55, 0.0)  # orange markups: visible on dark SWI, distinct from the segments
REJECTED_COLOR = (0.55, 0.55, 0.55)  # grey: what stage 2 turned down, never to be taken for a finding
MAX_REJECTED_LABELS = 20
# Hollow 2D outlines around the dot instead of Slicer's default filled sphere (scale 3), which
# covers a 2-5 mm bleed; two shapes, so that kept and rejected differ without colour.
CENTROID_GLYPH = "Circle2D"
REJECTED_GLYPH = "Square2D"
# Percent of the view: about 5 mm on a 250 mm field of view, a ring around a small bleed.
GLYPH_SCALE = 2.0

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
    "reason": ("Reason", "", "rejected as: the mimic it most resembles, or below the threshold"),
    "mars_region": ("MARS region", "", "lobar, deep or infratentorial (MARS); unknown when the registration to the template failed QC"),
    "mars_structure": ("Structure", "", "the atlas structure at the centroid (e.g. frontal_cortex, thalamus)"),
    "side": ("Side", "", "left, right or midline"),
    **{f"p_{c}": (f"P({c})", "", f"candidate stage: the classifier's probability that this is {c.replace('_', '-')}") for c in CLASSES[1:]},
    **{f"centroid_{a}": (a.upper(), "", f"centroid, voxel index (0-based) along {a}") for a in "ijk"},
    **{f"centroid_{a}": (f"{a.upper()} (mm)", "mm", f"centroid, RAS (Slicer's patient coordinates) {a.upper()}") for a in "ras"},
    **{
        f"centroid_{c}": (f"{a} LPS (mm)", "mm", f"centroid, LPS (DICOM patient coordinates) {a}")
        for c, a in (("l", "L"), ("p", "P"), ("s_lps", "S"))
    },
}


def segment_id(lesion: Lesion) -> str:
    return f"CMB_{lesion.id}"


def fill_segmentation(segmentation_node: Any, volume_node: Any, labels: np.ndarray, lesions: list[Lesion]) -> None:
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

    records.segment_tags gives Slicer's file form "key:value|key:value|"; the terminology
    entry among them is set by _fill_segmentation itself.
    """
    pairs = (item.split(":", 1) for item in records.segment_tags(lesion).split("|") if item)
    return {key: value for key, value in pairs if key != slicer.vtkSegment.GetTerminologyEntryTagName()}


def fill_table(table_node: Any, lesions: list[Lesion]) -> None:
    """One row per lesion, the columns of the command line's CSV (records.LESION_COLUMNS)."""
    _fill_rows(table_node, LESION_COLUMNS, [lesion_row(lesion) for lesion in lesions])


# Columns of text and of integers; every other column holds numbers.
_TEXT_COLUMNS = ("size_class", "certainty", "reason", "mars_region", "mars_structure", "side")
_INT_COLUMNS = ("id", "n_voxels")


# The rejected table's id numbers candidates, not lesions.
_REJECTED_COLUMN_INFO = {"id": ("Candidate", "", "rejected candidate number, as in its point's description \"Rejected <id>\"")}


def _fill_rows(table_node: Any, columns: Sequence[str], rows: Sequence[dict], info: dict | None = None) -> None:
    """A locked results table: `columns` (the CSV's names) titled, with units and meanings
    (_COLUMN_INFO, then `info`)."""
    was_modifying = table_node.StartModify()
    try:
        table_node.SetLocked(False)
        table_node.RemoveAllColumns()
        table = table_node.GetTable()
        for name in columns:
            if name in _TEXT_COLUMNS:
                column = vtk.vtkStringArray()
            elif name in _INT_COLUMNS:
                column = vtk.vtkIntArray()
            else:
                column = vtk.vtkDoubleArray()
            column.SetName(name)
            column.SetNumberOfValues(len(rows))
            for r, row in enumerate(rows):
                value = row[name]
                # Stage-2 columns are empty in the single-stage pipeline: NaN in a number column.
                column.SetValue(r, float("nan") if value == "" and name not in _TEXT_COLUMNS else value)
            table.AddColumn(column)
        for name, (title, unit, description) in {**_COLUMN_INFO, **(info or {})}.items():
            if name not in columns:
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


def fill_markups(markups_node: Any, volume_node: Any, lesions: list[Lesion]) -> None:
    """Locked centroid points, placed with the volume node's own IJK-to-RAS.

    The centroid is taken from the lesion's voxel-index centroid and the node's matrix rather
    than from lesion.centroid_ras, so the point lies in exactly the frame of the input node.
    """
    points = [(lesion.centroid_ijk, lesion.name, f"{lesion.size_class}, {lesion.diameter_mm:.1f} mm, p={lesion.max_probability:.2f}")
              for lesion in lesions]  # fmt: skip
    # With tens of lesions, "CMB n" labels cover the slice views: the table names them (a click
    # on a row centres the views on its lesion). The Markups module can switch labels back on.
    _fill_points(markups_node, volume_node, points, CENTROID_COLOR, CENTROID_GLYPH, show_labels=False)


def _fill_points(node: Any, volume_node: Any, points: Sequence[tuple], color: tuple, glyph: str, show_labels: bool) -> None:
    """Replace `node`'s control points by locked ones at (ijk, label, description), placed
    with the volume node's own IJK-to-RAS, drawn as small hollow `glyph`s. The display node's
    visibility is left as the reader set it."""
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
            display.SetGlyphTypeFromString(glyph)
            display.SetUseGlyphScale(True)
            display.SetGlyphScale(GLYPH_SCALE)
            display.SetFillVisibility(False)
            display.SetSliceProjection(False)  # only in the lesion's own slices
    finally:
        node.EndModify(was_modifying)


def show_rejected(segmentation_node: Any, volume_node: Any, rejected: Sequence[Candidate] | None) -> Any:
    """The candidates stage 2 rejected: locked grey points labelled with their reason, and a
    table of every reason (the command line's rejected-CSV columns), so that a reader sees why a
    dark dot was not called a bleed.

    `rejected`: the candidates below the threshold (a two-stage result's `rejected`), or None
    for a single-stage result. Both nodes are linked from the segmentation (REJECTED_ROLE,
    REJECTED_TABLE_ROLE) and refilled by every run and re-threshold on it; a two-stage result
    makes them even when empty (a re-threshold may fill them), a single-stage one only empties
    existing ones. Returns the points node or None.
    """
    node = own(segmentation_node.GetNodeReference(REJECTED_ROLE))
    table = own(segmentation_node.GetNodeReference(REJECTED_TABLE_ROLE))
    if node is None and rejected is None:
        return None
    rejected = list(rejected or [])
    scene = segmentation_node.GetScene()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{volume_node.GetName()} rejected candidates")
        node.SetAttribute(CREATED_ATTRIBUTE, "1")
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{volume_node.GetName()} rejected candidates table")
        table.SetAttribute(CREATED_ATTRIBUTE, "1")
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    points = [
        (c.centroid_ijk, c.reason,
         f"{c.name}: rejected as {c.reason}, P(microbleed) {c.p_microbleed:.2f}, {c.diameter_mm:.1f} mm")
        for c in rejected
    ]  # fmt: skip
    # Labels name the reason while they are few; beyond that they would cover the slice views
    # (a shifted-domain case had 62 rejections), and the table gives every reason.
    _fill_points(node, volume_node, points, REJECTED_COLOR, REJECTED_GLYPH, show_labels=len(points) <= MAX_REJECTED_LABELS)
    _fill_rows(table, REJECTED_COLUMNS, [rejected_row(c) for c in rejected], _REJECTED_COLUMN_INFO)
    for linked in (node, table):
        linked.SetNodeReferenceID(INPUT_ROLE, volume_node.GetID())
    segmentation_node.SetNodeReferenceID(REJECTED_ROLE, node.GetID())
    segmentation_node.SetNodeReferenceID(REJECTED_TABLE_ROLE, table.GetID())
    place_in_subject_hierarchy(scene, volume_node, (node, table))
    return node


def set_rejected_visibility(segmentation_node: Any, visible: bool) -> Any:
    """Show or hide the segmentation's rejected-candidate points in every view; returns the
    points node, or None when there is none. Refills keep the choice (_fill_points leaves it)."""
    node = own(segmentation_node.GetNodeReference(REJECTED_ROLE)) if segmentation_node is not None else None
    if node is None:
        return None
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetVisibility(bool(visible))
    return node


def place_in_subject_hierarchy(scene: Any, volume_node: Any, nodes: Sequence[Any]) -> None:
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
