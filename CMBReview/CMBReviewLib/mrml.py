"""The MRML adapter of the review: a stored case becomes nodes; what a reader changes in them becomes decisions.

The only CMBReviewLib module that imports slicer. It uses what both the Slicer application and
slicer-core provide (nodes, `slicer.util` array helpers, static logic methods), so it is tested
headless on slicer-core's real scene.

A case for one reader becomes:
- a scalar volume node (the SWI, on its own grid: IJK-to-RAS from the file's geometry);
- a segmentation node: the detector's lesions (segment IDs `CMB_<id>`, one shared layer) and
  the lesions this reader added (`ADDED_<lesion id>`, each its own layer, as they may overlap);
- a markups node: one locked point per lesion at its centroid, labelled as its segment
  ("CMB <id>" / "Added <id>"); the point's description carries the reader's current verdict
  (VERDICT_FORMAT), so the views, the point list and the store say the same thing.
What the reader changes there, `store_edits` turns into stored decisions: a point's new
description is a verdict; a new segment (painted in the Segment Editor) is an added lesion; an
added lesion's segment painted further is stored again (the new version supersedes the old);
one the reader deleted or erased is withdrawn. Each is its own transaction. A reader's segment
carries the id of the lesion stored for it and the digest of the stored voxels (segment tags
LESION_TAG, MASK_TAG), so painted segments stay where the reader paints them and are stored as
often as they change (`edit_stamp` tells cheaply whether anything did).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import slicer.util
import vtk

from CMBDetectLib.detection.lesions import CLASS_COLORS
from CMBDetectLib.detection.records import TERMINOLOGY_ENTRY
from CMBDetectLib.io import Volume
from CMBDetectLib.mrml.navigation import jump_to_lesion
from CMBDetectLib.mrml.nodes import ijk_to_ras_of, labelmap_image, volume_from_node

from . import voxelfiles
from .regiongrow import grow_from_click
from .store import CERTAINTIES, MIMIC_REASONS, VERDICTS, Study, StudyError
from .study import add_missed, detector_labels, load_image, save_groundtruth

LESIONS_ATTRIBUTE = "CMBReview.Lesions"  # JSON: the stored lesion id of each control point, in order
CASE_ATTRIBUTE = "CMBReview.Case"
READER_ATTRIBUTE = "CMBReview.Reader"
ADDED_COLOR = (0.1, 0.75, 0.95)  # reader-added lesions in cyan, apart from the detector's reds
VERDICT_FORMAT = "verdict[:reason][:certainty], e.g. 'correct', 'correct:possible', 'incorrect:vessel'"
LESION_TAG = "CMBReview.LesionId"  # on a reader's segment: the stored lesion it shows
MASK_TAG = "CMBReview.MaskDigest"  # ... and the digest of the voxels stored for that lesion
STAYS = "; it stays in the scene"  # ends the message of a painted segment that could not be stored


def verdict_text(verdict: str | None, reason: str | None = None, certainty: str = "definite") -> str:
    if verdict is None:
        return ""
    return ":".join([verdict, *([reason] if reason else []), *([certainty] if certainty != "definite" else [])])


def parse_verdict(text: str) -> tuple[str, str | None, str] | None:
    """'incorrect:vessel:possible' -> ('incorrect', 'vessel', 'possible'); '' -> None (not judged)."""
    parts = [p.strip().lower() for p in (text or "").split(":") if p.strip()]
    if not parts:
        return None
    verdict, rest = parts[0], parts[1:]
    if verdict not in VERDICTS:
        raise StudyError(f"'{text}' is not a verdict: {VERDICT_FORMAT}")
    certainty = rest.pop() if rest and rest[-1] in CERTAINTIES else "definite"
    reason = rest.pop(0) if rest else None
    if rest or (reason is not None and reason not in MIMIC_REASONS):
        raise StudyError(f"'{text}' is not a verdict: {VERDICT_FORMAT}; reasons: {', '.join(MIMIC_REASONS)}")
    return verdict, reason, certainty


@dataclass
class CaseNodes:
    case: str
    reader: str
    volume: Any
    segmentation: Any
    markups: Any
    image: Volume  # the stored image, whose grid every decision is checked against
    # segment id -> its _modified_key when `store_edits` last found it stored: an unchanged
    # segment is not read back and hashed again (that costs a resampled whole-volume array).
    seen: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)


def _scene(scene: Any) -> Any:
    return scene if scene is not None else slicer.mrmlScene


def load_case(study: Study, case: str, reader: str, scene: Any = None) -> CaseNodes:
    """Volume, segmentation and markups nodes of one case as this reader sees it."""
    scene = _scene(scene)
    reader_id = study.reader_id(reader)
    image = load_image(study, case)
    volume = slicer.util.addVolumeFromArray(image.array, image.geometry.ijk_to_ras(), case)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{case} lesions ({reader})")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{case} lesions ({reader}) points")
    markups.CreateDefaultDisplayNodes()
    for node in (segmentation, markups):
        node.SetAttribute(CASE_ATTRIBUTE, case)
        node.SetAttribute(READER_ATTRIBUTE, reader)
    nodes = CaseNodes(case, reader, volume, segmentation, markups, image)

    lesions = study.lesions(study.case(case).id, reader_id)
    detector = [l for l in lesions if l.source == "detector"]
    labels = detector_labels(study, case, image) if detector else None
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if detector:
        layer = labelmap_image(labels, ijk_to_ras_of(volume))
        for l in detector:
            segment = slicer.vtkSegment()
            segment.SetName(l.label)
            segment.SetColor(*CLASS_COLORS.get(l.size_class or "small", CLASS_COLORS["small"]))
            segment.SetLabelValue(int(l.detector_label))
            segment.AddRepresentation(labelmap_name, layer)
            segment.SetTerminology(TERMINOLOGY_ENTRY)
            segmentation.GetSegmentation().AddSegment(segment, f"CMB_{l.detector_label}")
    for l in lesions:
        if l.source == "reader":
            path, digest = study.file(l.file_id)
            mask = voxelfiles.read_checked(path, digest, case, image) > 0
            _add_segment(nodes, f"ADDED_{l.id}", l.label, mask)
            _tag_segment(nodes, f"ADDED_{l.id}", l.id, mask)

    verdicts = {v.lesion_id: v for v in study.current_verdicts(reader_id)}
    ids = []
    for l in lesions:
        v = verdicts.get(l.id)
        index = markups.AddControlPoint(vtk.vtkVector3d(*l.ras), l.label)
        markups.SetNthControlPointDescription(index, verdict_text(v.verdict, v.reason, v.certainty) if v else "")
        markups.SetNthControlPointLocked(index, True)
        ids.append(l.id)
    markups.SetAttribute(LESIONS_ATTRIBUTE, json.dumps(ids))
    for segment_id in _segment_ids(segmentation):
        nodes.seen[segment_id] = _modified_key(nodes, segment_id)
    return nodes


def _add_segment(nodes: CaseNodes, segment_id: str, name: str, mask: np.ndarray) -> None:
    segmentation = nodes.segmentation.GetSegmentation()
    segmentation.AddEmptySegment(segment_id, name, list(ADDED_COLOR))
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), nodes.segmentation, segment_id, nodes.volume)


def _mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.asarray(mask, bool)).tobytes() + repr(mask.shape).encode()).hexdigest()


def _tag(segment: Any, key: str) -> str | None:
    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def _tag_segment(nodes: CaseNodes, segment_id: str, lesion_id: int | None, mask: np.ndarray | None = None) -> None:
    """Mark a reader's segment as showing a stored lesion (or, with None, as showing none)."""
    segment = nodes.segmentation.GetSegmentation().GetSegment(segment_id)
    if lesion_id is None:
        segment.RemoveTag(LESION_TAG)
        segment.RemoveTag(MASK_TAG)
    else:
        segment.SetTag(LESION_TAG, str(lesion_id))
        segment.SetTag(MASK_TAG, _mask_digest(mask))


def _modified_key(nodes: CaseNodes, segment_id: str) -> tuple[int, int]:
    """Changes whenever the segment or its voxels do (VTK modification times only grow)."""
    segment = nodes.segmentation.GetSegmentation().GetSegment(segment_id)
    representation = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    return segment.GetMTime(), representation.GetMTime() if representation is not None else 0


def edit_stamp(nodes: CaseNodes) -> tuple:
    """Cheap to take: changes whenever the reader may have changed something `store_edits` stores
    (a segment added, removed or painted; a point's verdict), so equal stamps need no store."""
    segmentation = nodes.segmentation.GetSegmentation()
    segments = [(segment_id, *_modified_key(nodes, segment_id)) for segment_id in _segment_ids(nodes.segmentation)]
    m = nodes.markups
    points = tuple(m.GetNthControlPointDescription(n) for n in range(m.GetNumberOfControlPoints()))
    return nodes.segmentation.GetMTime(), segmentation.GetMTime(), tuple(segments), points


def remove_case_nodes(nodes: CaseNodes) -> None:
    """Take a case's nodes out of their scene (those still in it)."""
    for node in (nodes.volume, nodes.segmentation, nodes.markups):
        scene = node.GetScene() if node is not None else None
        if scene is not None:
            scene.RemoveNode(node)


def lesion_ids(nodes: CaseNodes) -> list[int]:
    return json.loads(nodes.markups.GetAttribute(LESIONS_ATTRIBUTE) or "[]")


def set_verdict(study: Study, nodes: CaseNodes, index: int, verdict: str, reason: str | None = None, certainty: str = "definite") -> None:
    """The triage keys: store the verdict on the index-th lesion, then show it on its point."""
    study.record_verdict(lesion_ids(nodes)[index], study.reader_id(nodes.reader), verdict, reason, certainty)
    nodes.markups.SetNthControlPointDescription(index, verdict_text(verdict, reason, certainty))


def jump_to(nodes: CaseNodes, index: int) -> np.ndarray:
    """Centre every slice view on the index-th lesion; returns the world RAS point."""
    position = [0.0, 0.0, 0.0]
    nodes.markups.GetNthControlPointPositionWorld(index, position)
    return jump_to_lesion(position, scene=nodes.volume.GetScene())


def add_missed_at(study: Study, nodes: CaseNodes, ras: tuple[float, float, float], certainty: str = "definite") -> int:
    """The one-click add: grow the dark blob at the clicked world point (bounded to 10 mm) and store it."""
    ras_to_ijk = np.linalg.inv(ijk_to_ras_of(nodes.volume))
    ijk = ras_to_ijk @ np.array([*ras, 1.0])
    kji = tuple(int(round(v)) for v in ijk[2::-1])
    try:
        mask = grow_from_click(nodes.image.array, nodes.image.geometry, kji)
    except ValueError as exc:
        raise StudyError(f"{nodes.case}: {exc}") from None
    return _store_added(study, nodes, mask, certainty)


def _store_added(
    study: Study, nodes: CaseNodes, mask: np.ndarray, certainty: str = "definite", segment_id: str | None = None, replaces: int | None = None
) -> int:
    """Store an added lesion and show it with its point; returns its id. The one-click add makes
    segment `ADDED_<id>`; a painted one stays the segment it was painted in (`segment_id`), and
    a new version of a painted lesion (`replaces`) takes over its point."""
    lesion_id = add_missed(study, nodes.case, nodes.reader, mask, nodes.image, certainty)
    lesion = next(l for l in study.lesions(study.case(nodes.case).id) if l.id == lesion_id)
    if segment_id is None:
        segment_id = f"ADDED_{lesion_id}"
        _add_segment(nodes, segment_id, lesion.label, mask)
    _tag_segment(nodes, segment_id, lesion_id, mask)
    m, ids = nodes.markups, lesion_ids(nodes)
    if replaces in ids:
        index = ids.index(replaces)
        ids[index] = lesion_id
        m.SetNthControlPointPosition(index, *lesion.ras)
        m.SetNthControlPointLabel(index, lesion.label)
    else:
        index = m.AddControlPoint(vtk.vtkVector3d(*lesion.ras), lesion.label)
        ids.append(lesion_id)
    m.SetNthControlPointDescription(index, verdict_text("correct", None, certainty))
    m.SetNthControlPointLocked(index, True)
    m.SetAttribute(LESIONS_ATTRIBUTE, json.dumps(ids))
    return lesion_id


def _drop_point(nodes: CaseNodes, lesion_id: int) -> None:
    """Remove a withdrawn lesion's point (and its id) from the point list."""
    ids = lesion_ids(nodes)
    if lesion_id in ids:
        nodes.markups.RemoveNthControlPoint(ids.index(lesion_id))
        ids.remove(lesion_id)
        nodes.markups.SetAttribute(LESIONS_ATTRIBUTE, json.dumps(ids))


def _segment_ids(segmentation_node: Any) -> list[str]:
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(n) for n in range(ids.GetNumberOfValues())]


def store_edits(study: Study, nodes: CaseNodes) -> dict[str, Any]:
    """Turn what the reader changed in the nodes into stored decisions.

    Returns counts (verdicts, added, replaced, withdrawn) and `errors`: one message per point or
    segment that could not be stored; it is left as it is in the nodes, to be stored at the
    next call, and the other edits are stored regardless.
    """
    reader_id = study.reader_id(nodes.reader)
    if nodes.image.shape != tuple(reversed(nodes.volume.GetImageData().GetDimensions())):
        raise StudyError(f"{nodes.case}: the volume node no longer has the stored image's grid")
    done: dict[str, Any] = {"verdicts": 0, "added": 0, "replaced": 0, "withdrawn": 0, "errors": []}
    current = {v.lesion_id: v for v in study.current_verdicts(reader_id)}
    visible = {l.id: l for l in study.lesions(study.case(nodes.case).id, reader_id)}  # withdrawn ones drop out
    for index, lesion_id in enumerate(lesion_ids(nodes)):
        try:
            parsed = parse_verdict(nodes.markups.GetNthControlPointDescription(index))
            v = current.get(lesion_id)
            if parsed is not None and lesion_id in visible and (v is None or (v.verdict, v.reason, v.certainty) != parsed):
                study.record_verdict(lesion_id, reader_id, *parsed)
                done["verdicts"] += 1
        except StudyError as exc:
            done["errors"].append(f"{nodes.case}, {nodes.markups.GetNthControlPointLabel(index)}: {exc}")

    # The reader's own lesions shown in these nodes: each is kept, stored again, or withdrawn.
    mine = {i for i in lesion_ids(nodes) if i in visible and visible[i].source == "reader" and visible[i].added_by == reader_id}
    handled: set[int] = set()
    segmentation = nodes.segmentation.GetSegmentation()
    for segment_id in _segment_ids(nodes.segmentation):
        if segment_id.startswith("CMB_"):
            continue  # the detector's lesions are judged on their points, not repainted
        segment = segmentation.GetSegment(segment_id)
        tagged = _tag(segment, LESION_TAG)
        lesion_id = int(tagged) if tagged and tagged.isdigit() and int(tagged) in mine else None
        if nodes.seen.get(segment_id) == _modified_key(nodes, segment_id) and (lesion_id is not None or not tagged):
            if lesion_id is not None:  # untouched since it was last found stored (or empty)
                handled.add(lesion_id)
            continue
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(nodes.segmentation, segment_id, nodes.volume)
        mask = np.asarray(mask) > 0 if mask is not None else None
        try:
            if mask is None or not mask.any():
                if lesion_id is not None:
                    _tag_segment(nodes, segment_id, None)  # erased: withdrawn below; painted again, it is new
                # else a segment the reader has not painted yet
            elif lesion_id is None:
                _store_added(study, nodes, mask, segment_id=segment_id)
                done["added"] += 1
            elif _tag(segment, MASK_TAG) == _mask_digest(mask):
                handled.add(lesion_id)
            else:
                # Painted further: the new version is stored before the old one is withdrawn, so
                # a crash in between leaves both (the reader deletes one), never neither.
                handled.add(lesion_id)
                previous = current.get(lesion_id)
                _store_added(study, nodes, mask, previous.certainty if previous else "definite", segment_id, replaces=lesion_id)
                study.withdraw_added(lesion_id, reader_id)
                done["replaced"] += 1
        except (StudyError, OSError) as exc:
            done["errors"].append(f"{nodes.case}, segment '{segment.GetName()}': not stored ({exc}){STAYS}")
            continue  # not marked as seen: tried again at the next store
        nodes.seen[segment_id] = _modified_key(nodes, segment_id)
    for lesion_id in sorted(mine - handled):  # its segment deleted or erased
        try:
            study.withdraw_added(lesion_id, reader_id)
        except StudyError as exc:
            done["errors"].append(f"{nodes.case}, {visible[lesion_id].label}: {exc}")
            continue
        _drop_point(nodes, lesion_id)
        done["withdrawn"] += 1
    return done


def store_groundtruth(study: Study, case: str, reader: str, segmentation_node: Any, volume_node: Any) -> int:
    """A ground-truth labelling made in the Segment Editor: every segment, one label each."""
    image = load_image(study, case)
    grid = volume_from_node(volume_node).geometry
    if not grid.matches(image.geometry) or volume_from_node(volume_node).shape != image.shape:
        raise StudyError(f"{case}: label on the case's own volume (its grid differs from the stored image)")
    labels = np.zeros(image.shape, np.uint16)
    for n, segment_id in enumerate(_segment_ids(segmentation_node), start=1):
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
        if mask is not None:
            labels[np.asarray(mask) > 0] = n
    return save_groundtruth(study, case, reader, labels, image)
