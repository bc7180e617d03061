"""A longitudinal comparison into nodes: the follow-up placed on the baseline through the
registration (a linear transform node; nothing is resampled), a locked table of the changes,
the new bleeds as points, the ARIA-H grade on the table, and the two scans side by side with
linked slice views.

Inputs are `cmbdetect longitudinal`'s own outputs (longitudinal/pairs.py): the pair's summary
(its `registration.matrix_4x4`, baseline LPS -> follow-up LPS) and the rows of its changes CSV
(positions in the follow-up's space).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk

from .nodes import CREATED_ATTRIBUTE, SUMMARY_ATTRIBUTE, vtk_matrix

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
GRADE_ATTRIBUTE = "CMBDetect.AriaH"
TRANSFORM_ROLE = "CMBDetectComparisonTransform"  # the changes table -> its registration (rows are in the follow-up's space)
NEW_COLOR = (1.0, 0.2, 0.2)
# "id": the row's number in <case>_changes.csv, first, so that a click on a sorted view finds its row.
CHANGE_COLUMNS = ("id", "status", "evidence", "centroid_r", "centroid_a", "centroid_s", "diameter_mm", "p_microbleed")
TEXT_COLUMNS = ("status", "evidence")


@dataclass
class Comparison:
    transform: Any  # vtkMRMLLinearTransformNode: follow-up -> baseline (the world)
    table: Any  # vtkMRMLTableNode: one row per change; the grade as attribute GRADE_ATTRIBUTE
    new_bleeds: Any  # vtkMRMLMarkupsFiducialNode: the new bleeds, under `transform`
    grade: str


def followup_to_baseline_ras(summary: dict) -> np.ndarray:
    """4x4 RAS matrix taking the follow-up's points onto the baseline (a Slicer transform's
    "to parent"), from the summary's LPS matrix (baseline -> follow-up)."""
    matrix = np.asarray(summary["registration"]["matrix_4x4"], float)
    return LPS_RAS @ np.linalg.inv(matrix) @ LPS_RAS


def show_comparison(baseline_node: Any, followup_node: Any, summary: dict, changes: Sequence[dict], scene: Any = None,
                    link_views: bool = True) -> Comparison:  # fmt: skip
    """Put one pair's comparison in the scene (see the module text); returns its nodes. The
    follow-up node (and the new bleeds' points) go under the registration's transform, so both
    scans are shown in the baseline's frame; `link_views` shows them side by side, linked."""
    scene = scene or slicer.mrmlScene
    case = summary.get("case", followup_node.GetName())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"{case} registration")
    transform.SetMatrixTransformToParent(vtk_matrix(followup_to_baseline_ras(summary)))
    followup_node.SetAndObserveTransformNodeID(transform.GetID())
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{case} changes")
    _fill_changes(table, changes)
    table.SetNodeReferenceID(TRANSFORM_ROLE, transform.GetID())
    grade = str(summary["aria_h"])
    table.SetAttribute(GRADE_ATTRIBUTE, grade)
    table.SetAttribute(SUMMARY_ATTRIBUTE, _short_summary(summary))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{case} new microbleeds")
    new = [r for r in changes if r["status"] == "new"]
    for n, row in enumerate(new, start=1):
        index = points.AddControlPoint(vtk.vtkVector3d(*(float(row[k]) for k in ("centroid_r", "centroid_a", "centroid_s"))), f"new {n}")
        points.SetNthControlPointDescription(index, f"new, {float(row['diameter_mm']):.1f} mm")
        points.SetNthControlPointLocked(index, True)
    points.SetLocked(True)
    points.SetAndObserveTransformNodeID(transform.GetID())
    points.CreateDefaultDisplayNodes()
    if points.GetDisplayNode() is not None:
        points.GetDisplayNode().SetSelectedColor(*NEW_COLOR)
        points.GetDisplayNode().SetColor(*NEW_COLOR)
    for node in (transform, table, points):
        node.SetAttribute(CREATED_ATTRIBUTE, "1")
    if link_views:
        show_side_by_side(baseline_node, followup_node, scene)
    return Comparison(transform, table, points, grade)


def _short_summary(summary: dict) -> str:
    keep = ("case", "new_microbleeds", "persisting", "resolved", "not_compared", "aria_h", "aria_h_source", "operating_point", "notes")
    short = {k: summary[k] for k in keep if k in summary}
    if "correlation" in summary.get("registration", {}):
        short["registration_correlation"] = summary["registration"]["correlation"]
    return json.dumps(short)


def _fill_changes(table_node: Any, changes: Sequence[dict]) -> None:
    table = table_node.GetTable()
    for name in CHANGE_COLUMNS:
        column = vtk.vtkStringArray() if name in TEXT_COLUMNS else (vtk.vtkIntArray() if name == "id" else vtk.vtkDoubleArray())
        column.SetName(name)
        column.SetNumberOfValues(len(changes))
        for r, row in enumerate(changes):
            if name == "id":
                column.SetValue(r, r + 1)
                continue
            value = row.get(name, "")
            column.SetValue(r, str(value) if name in TEXT_COLUMNS else (float(value) if value not in ("", None) else float("nan")))
        table.AddColumn(column)
    table_node.SetLocked(True)


def show_side_by_side(baseline_node: Any, followup_node: Any, scene: Any = None) -> None:
    """Baseline in the red view, follow-up in the yellow, side by side, slice views linked."""
    scene = scene or slicer.mrmlScene
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    for view, node in (("Red", baseline_node), ("Yellow", followup_node)):
        composite = _composite_of(scene, view)
        composite.SetBackgroundVolumeID(node.GetID())
        composite.SetLinkedControl(True)


def _composite_of(scene: Any, view: str) -> Any:
    """The slice composite node of a slice view (Red, Yellow, ...). The application's slice
    logics make them; a scene without those (slicer-core alone) gets one, tagged as they tag it."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        slice_node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        if slice_node.GetLayoutName() == view:
            composite = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(slice_node)
            if composite is not None:
                return composite
    composite = slicer.vtkMRMLSliceCompositeNode()
    composite.SetLayoutName(view)
    composite.SetSingletonTag(view)
    return scene.AddNode(composite)


def new_bleed_position_world(comparison: Comparison, index: int) -> np.ndarray:
    """World RAS (the baseline's frame) of the index-th new bleed: where to jump."""
    position = [0.0, 0.0, 0.0]
    comparison.new_bleeds.GetNthControlPointPositionWorld(index, position)
    return np.array(position)


def comparison_summary(table_node: Any) -> dict | None:
    """The short summary a comparison's changes table carries (counts, grade, notes); None for
    any other table (a detection's lesion table, say)."""
    if table_node is None or table_node.GetAttribute(GRADE_ATTRIBUTE) is None:
        return None
    try:
        return json.loads(table_node.GetAttribute(SUMMARY_ATTRIBUTE) or "{}")
    except ValueError:
        return {"aria_h": table_node.GetAttribute(GRADE_ATTRIBUTE)}


def change_position_world(table_node: Any, row_id: int) -> np.ndarray | None:
    """World RAS (the baseline's frame) of the changes table's row `row_id` (its "id" column):
    where a click on that row jumps. The row's position is in the follow-up's space, so it goes
    through the table's registration transform, wherever the user has moved that since."""
    table = table_node.GetTable()
    ids = table.GetColumnByName("id")
    if ids is None:
        return None
    row = next((r for r in range(table.GetNumberOfRows()) if int(ids.GetValue(r)) == int(row_id)), None)
    if row is None:
        return None
    point = [float(table.GetColumnByName(k).GetValue(row)) for k in ("centroid_r", "centroid_a", "centroid_s")]
    transform = table_node.GetNodeReference(TRANSFORM_ROLE)
    if transform is None:
        return np.array(point)
    to_world = vtk.vtkGeneralTransform()
    transform.GetTransformToWorld(to_world)
    return np.array(to_world.TransformPoint(point))


def comparison_text(summary: dict) -> str:
    """What the module shows above the changes table: the grade, the counts, and what the grade
    does not say (rich text for a QLabel)."""
    counts = f"{summary.get('new_microbleeds', '?')} new microbleed(s) since baseline, {summary.get('persisting', '?')} persisting, " \
             f"{summary.get('resolved', '?')} resolved"  # fmt: skip
    if summary.get("not_compared"):
        counts += f", {summary['not_compared']} outside the other scan's field of view (not compared)"
    lines = [
        f"<b>ARIA-H (microhaemorrhage): {summary.get('aria_h', '?')}</b>: {counts}.",
        "Grade by new microbleeds: none 0, mild 1-4, moderate 5-9, severe 10 or more (lecanemab and donanemab prescribing information).",
        "<b>Superficial siderosis is not assessed.</b> A resolved microbleed is usually a miss at one of the two time points.",
    ]
    if "registration_correlation" in summary:
        lines.append(f"Registration: rigid, correlation {summary['registration_correlation']:.2f} after it.")
    lines.append("<b>Research software: not for clinical use, never a treatment decision.</b>")
    return "<br>".join(lines)
