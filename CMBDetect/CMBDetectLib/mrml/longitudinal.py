"""A longitudinal comparison into nodes: the follow-up placed on the baseline through the
registration (a linear transform node; nothing is resampled), a locked table of the changes,
the new bleeds as points, the ARIA-H grade on the table, and the two scans side by side with
linked slice views.

Inputs are `cmbdetect longitudinal`'s own outputs (longitudinal/pairs.py): the pair's summary
(its `registration.matrix_4x4`, baseline LPS -> follow-up LPS) and the rows of its changes CSV
(positions in the follow-up's space).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk

from .nodes import CREATED_ATTRIBUTE, SUMMARY_ATTRIBUTE, vtk_matrix

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
GRADE_ATTRIBUTE = "CMBDetect.AriaH"
NEW_COLOR = (1.0, 0.2, 0.2)
CHANGE_COLUMNS = ("status", "evidence", "centroid_r", "centroid_a", "centroid_s", "diameter_mm", "p_microbleed")
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
    import json

    keep = ("case", "new_microbleeds", "persisting", "resolved", "not_compared", "aria_h", "aria_h_source", "notes")
    return json.dumps({k: summary[k] for k in keep if k in summary})


def _fill_changes(table_node: Any, changes: Sequence[dict]) -> None:
    table = table_node.GetTable()
    for name in CHANGE_COLUMNS:
        column = vtk.vtkStringArray() if name in TEXT_COLUMNS else vtk.vtkDoubleArray()
        column.SetName(name)
        column.SetNumberOfValues(len(changes))
        for r, row in enumerate(changes):
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
