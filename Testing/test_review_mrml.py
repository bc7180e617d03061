"""The review's MRML adapter on slicer-core's real scene: a stored case becomes nodes on the image's
own oblique, anisotropic grid; what the reader changes in the nodes becomes stored decisions."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer_core", reason="slicer-core (the Qt-free MRML engine) is not installed")

import slicer  # noqa: E402
import slicer.util  # noqa: E402

from CMBDetectLib.detection.lesions import extract_lesions  # noqa: E402
from CMBDetectLib.detection.outputs import write_lesion_csv, write_segmentation_nrrd  # noqa: E402
from CMBDetectLib.io import read_volume, write_volume  # noqa: E402
from CMBReviewLib import mrml as review_mrml  # noqa: E402
from CMBReviewLib import voxelfiles  # noqa: E402
from CMBReviewLib.regiongrow import sphere_mask  # noqa: E402
from CMBReviewLib.store import Study, StudyError  # noqa: E402
from CMBReviewLib.study import add_cases  # noqa: E402
from test_review_regiongrow import GEOMETRY  # noqa: E402  (oblique, anisotropic)

SHAPE = (10, 64, 72)
BLEEDS = [((5, 20, 20), 2.5), ((4, 44, 50), 3.0)]  # detected
MISSED = ((6, 44, 20), 2.0)  # dark, but the "detector" did not report it


def make_study(folder) -> Study:
    """A one-case study (c1: two detected bleeds, one missed) with readers ana and ben, in `folder`."""
    import json

    rng = np.random.default_rng(3)
    image = rng.normal(400, 10, SHAPE).astype(np.float32)
    probability = np.zeros(SHAPE, np.float32)
    for centre, r in BLEEDS:
        m = sphere_mask(SHAPE, GEOMETRY, centre, r)
        image[m] = 100.0
        probability[m] = 0.9
    image[sphere_mask(SHAPE, GEOMETRY, *MISSED)] = 100.0
    write_volume(image, GEOMETRY, folder / "images" / "c1.nii.gz")
    labels, lesions = extract_lesions(probability, GEOMETRY)
    assert len(lesions) == 2
    det = folder / "det"
    write_volume(labels, GEOMETRY, det / "c1_lesions.nii.gz")
    write_segmentation_nrrd(det / "c1.seg.nrrd", labels, lesions, GEOMETRY)
    write_lesion_csv(det / "c1_lesions.csv", lesions)
    (det / "c1_summary.json").write_text(json.dumps({"n_lesions": 2, "seconds": 1.5}))
    s = Study.create(folder / "study.db")
    added, errors = add_cases(s, [("c1", folder / "images" / "c1.nii.gz", det)])
    assert added == ["c1"] and not errors
    s.add_reader("ana")
    s.add_reader("ben")
    return s


@pytest.fixture
def study(tmp_path):
    s = make_study(tmp_path)
    yield s
    s.close()


def test_a_stored_case_becomes_nodes_on_the_images_grid(mrml, study):
    nodes = review_mrml.load_case(study, "c1", "ana", mrml.scene)
    np.testing.assert_allclose(review_mrml.ijk_to_ras_of(nodes.volume), GEOMETRY.ijk_to_ras(), atol=1e-6)
    labels = read_volume(study.path.parent / "det" / "c1_lesions.nii.gz").array.astype(int)
    assert review_mrml._segment_ids(nodes.segmentation) == ["CMB_1", "CMB_2"]
    for lesion_id in (1, 2):
        seg = slicer.util.arrayFromSegmentBinaryLabelmap(nodes.segmentation, f"CMB_{lesion_id}", nodes.volume)
        assert np.array_equal(seg > 0, labels == lesion_id)
    points = slicer.util.arrayFromMarkupsControlPoints(nodes.markups)
    # each point at its lesion's voxel centroid, mapped through the node's own matrix
    ijk_to_ras = review_mrml.ijk_to_ras_of(nodes.volume)
    for n, lesion_id in enumerate((1, 2)):
        kji = np.argwhere(labels == lesion_id).mean(axis=0)
        np.testing.assert_allclose(points[n], (ijk_to_ras @ [*kji[::-1], 1])[:3], atol=1e-3)
        assert nodes.markups.GetNthControlPointDescription(n) == ""
    # jumping to a lesion centres the slice views on it
    point = review_mrml.jump_to(nodes, 1)
    for slice_node in mrml.slice_nodes():
        np.testing.assert_allclose(slice_node.GetSliceToRAS().GetElement(0, 3), point[0], atol=1e-3)


def test_reader_edits_in_the_nodes_become_stored_decisions(mrml, study):
    nodes = review_mrml.load_case(study, "c1", "ana", mrml.scene)
    nodes.markups.SetNthControlPointDescription(0, "correct:possible")
    nodes.markups.SetNthControlPointDescription(1, "incorrect:vessel")
    # a lesion painted in the Segment Editor: a new segment with voxels
    painted = sphere_mask(SHAPE, GEOMETRY, *MISSED)
    nodes.segmentation.GetSegmentation().AddEmptySegment("Segment_1", "my bleed")
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted.astype(np.uint8), nodes.segmentation, "Segment_1", nodes.volume)
    done = review_mrml.store_edits(study, nodes)
    assert done == {"verdicts": 2, "added": 1, "replaced": 0, "withdrawn": 0, "errors": []}
    ana = study.reader_id("ana")
    current = {v.lesion_id: v for v in study.current_verdicts(ana)}
    det = [l for l in study.lesions() if l.source == "detector"]
    assert (current[det[0].id].verdict, current[det[0].id].certainty) == ("correct", "possible")
    assert (current[det[1].id].verdict, current[det[1].id].reason) == ("incorrect", "vessel")
    (added,) = [l for l in study.lesions() if l.source == "reader"]
    path, digest = study.file(added.file_id)
    assert np.array_equal(voxelfiles.read_checked(path, digest, "c1", nodes.image) > 0, painted)
    assert review_mrml._segment_ids(nodes.segmentation)[-1] == "Segment_1", "the painted segment stays as it was painted"
    # storing again changes nothing: the nodes and the store agree
    assert review_mrml.store_edits(study, nodes) == {"verdicts": 0, "added": 0, "replaced": 0, "withdrawn": 0, "errors": []}

    # reopened for ana: her verdicts on the points, her lesion as a segment; ben sees neither
    mrml.clear()
    again = review_mrml.load_case(study, "c1", "ana", mrml.scene)
    assert [again.markups.GetNthControlPointDescription(n) for n in range(3)] == ["correct:possible", "incorrect:vessel", "correct"]
    other = review_mrml.load_case(study, "c1", "ben", mrml.scene)
    assert other.markups.GetNumberOfControlPoints() == 2 and review_mrml._segment_ids(other.segmentation) == ["CMB_1", "CMB_2"]
    # ana deletes her added segment: the lesion is withdrawn (the history keeps it)
    again.segmentation.GetSegmentation().RemoveSegment(f"ADDED_{added.id}")
    assert review_mrml.store_edits(study, again)["withdrawn"] == 1
    assert not [l for l in study.lesions() if l.source == "reader"]
    assert len(study.lesions(include_withdrawn=True)) == 3


def test_one_click_add_and_the_triage_keys(mrml, study):
    nodes = review_mrml.load_case(study, "c1", "ben", mrml.scene)
    review_mrml.set_verdict(study, nodes, 0, "incorrect", "calcification", "possible")
    assert nodes.markups.GetNthControlPointDescription(0) == "incorrect:calcification:possible"
    (centre, _) = MISSED
    ras = (review_mrml.ijk_to_ras_of(nodes.volume) @ [*centre[::-1], 1])[:3]
    lesion_id = review_mrml.add_missed_at(study, nodes, tuple(ras + 0.3))
    (added,) = [l for l in study.lesions() if l.source == "reader"]
    assert added.id == lesion_id and added.added_by == study.reader_id("ben")
    grown = slicer.util.arrayFromSegmentBinaryLabelmap(nodes.segmentation, f"ADDED_{lesion_id}", nodes.volume) > 0
    truth = sphere_mask(SHAPE, GEOMETRY, *MISSED)
    assert 2 * np.sum(grown & truth) / (grown.sum() + truth.sum()) > 0.9
    with pytest.raises(StudyError, match="not a verdict"):
        review_mrml.parse_verdict("incorrect:unicorn")


def test_ground_truth_from_the_segment_editor_and_its_endorsement(mrml, study):
    nodes = review_mrml.load_case(study, "c1", "ana", mrml.scene)
    gt = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ground truth")
    gt.SetReferenceImageGeometryParameterFromVolumeNode(nodes.volume)
    for n, (centre, r) in enumerate([*BLEEDS, MISSED]):
        gt.GetSegmentation().AddEmptySegment(f"s{n}")
        slicer.util.updateSegmentBinaryLabelmapFromArray(sphere_mask(SHAPE, GEOMETRY, centre, r).astype(np.uint8), gt, f"s{n}", nodes.volume)
    g = review_mrml.store_groundtruth(study, "c1", "ana", gt, nodes.volume)
    study.endorse(g, study.reader_id("ben"))
    (stored,) = study.groundtruths(study.case("c1").id)
    path, digest = study.file(stored["file_id"])
    labels = voxelfiles.read_checked(path, digest, "c1", nodes.image)
    assert sorted(int(v) for v in np.unique(labels) if v) == [1, 2, 3]
    assert stored["endorsed_by"] == [study.reader_id("ben")]


def test_consensus_prefers_an_endorsed_ground_truth(mrml, study, tmp_path):
    from CMBDetectLib.labels import read_label
    from CMBReviewLib.consensus import export_consensus

    nodes = review_mrml.load_case(study, "c1", "ana", mrml.scene)
    gt = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ground truth")
    gt.SetReferenceImageGeometryParameterFromVolumeNode(nodes.volume)
    gt.GetSegmentation().AddEmptySegment("s0")
    truth = sphere_mask(SHAPE, GEOMETRY, *MISSED)
    slicer.util.updateSegmentBinaryLabelmapFromArray(truth.astype(np.uint8), gt, "s0", nodes.volume)
    g = review_mrml.store_groundtruth(study, "c1", "ana", gt, nodes.volume)
    # not endorsed yet, and nobody reviewed the case: nothing to export
    written, skipped, failed = export_consensus(study, tmp_path / "cons")
    assert not written and not failed and skipped == ["c1: no reader has reviewed it"]
    study.endorse(g, study.reader_id("ben"))
    written, _, _ = export_consensus(study, tmp_path / "cons")
    assert written[0].source == "ground truth by ana, endorsed by ben" and written[0].n_lesions == 1
    labels = read_label(written[0].label_path, "c1", nodes.image)
    assert np.array_equal(labels > 0, truth)
    # --majority-only ignores it, and with no reviews there is again nothing
    assert export_consensus(study, tmp_path / "maj", use_endorsed=False)[0] == []
