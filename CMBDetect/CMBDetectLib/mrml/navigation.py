"""Finding a lesion again: its point, its world position, and the slice views centred on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import slicer

from ..detection.lesions import Lesion
from .nodes import ijk_to_ras_of, to_world

def lesion_index(markups_node: Any, lesion_id: int) -> int | None:
    """Index of the control point of lesion `lesion_id` (labelled "CMB <id>"), or None."""
    label = f"CMB {int(lesion_id)}"
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointLabel(index) == label:
            return index
    return None


def rejected_index(markups_node: Any, candidate_id: int) -> int | None:
    """Index of the point of rejected candidate `candidate_id` (its description starts with
    "Rejected <id>:"; its label is the reason, which many share), or None."""
    prefix = f"Rejected {int(candidate_id)}:"
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointDescription(index).startswith(prefix):
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
