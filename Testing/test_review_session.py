"""The reading session behind the CMBReview module, on slicer-core's real scene.

The Qt widget cannot run here; it only forwards clicks to `ReviewSession`, so what a click does
is checked here: the study, the reader, the open case and its nodes stay consistent, and every
decision lands in the store under the right reader and case.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("slicer_core", reason="slicer-core (the Qt-free MRML engine) is not installed")

import slicer  # noqa: E402
import slicer.util  # noqa: E402

from CMBReviewLib import mrml as review_mrml  # noqa: E402
from CMBReviewLib.regiongrow import sphere_mask  # noqa: E402
from CMBReviewLib.session import ReviewSession  # noqa: E402
from CMBReviewLib.store import Study, StudyError  # noqa: E402
from test_review_mrml import GEOMETRY, MISSED, SHAPE, make_study  # noqa: E402


@pytest.fixture
def study_path(tmp_path):
    make_study(tmp_path).close()
    return tmp_path / "study.db"


@pytest.fixture
def session(mrml, study_path):
    s = ReviewSession(mrml.scene)
    s.open_study(study_path)
    yield s
    s.close()


def case_nodes_in(scene) -> list[str]:
    """Names of the review's nodes (those tagged with a case) in the scene."""
    out = []
    for cls in ("vtkMRMLSegmentationNode", "vtkMRMLMarkupsFiducialNode"):
        nodes = scene.GetNodesByClass(cls)
        out += [nodes.GetItemAsObject(i).GetName() for i in range(nodes.GetNumberOfItems()) if nodes.GetItemAsObject(i).GetAttribute(review_mrml.CASE_ATTRIBUTE)]
    return out


def verdicts_of(path, reader: str) -> dict[str, str]:
    """'CMB <id>' -> current verdict of this reader, read from the file by a connection of its own."""
    with Study.open(path) as study:
        labels = {l.id: l.label for l in study.lesions(include_withdrawn=True)}
        return {labels[v.lesion_id]: v.verdict for v in study.current_verdicts(study.reader_id(reader))}


def test_a_case_read_through_the_session(session, study_path, mrml):
    session.select_reader("ana")
    assert session.case_list() == [("c1", False)]
    nodes = session.open_case(0)
    assert [label for label, _ in session.lesion_rows()] == ["CMB 1", "CMB 2"]
    session.set_verdict(0, "correct")
    session.set_verdict(1, "incorrect", "vessel")
    (centre, _) = MISSED
    ras = (review_mrml.ijk_to_ras_of(nodes.volume) @ [*centre[::-1], 1])[:3]
    session.add_missed_at(tuple(ras))
    assert session.lesion_rows()[2][1] == "correct"
    session.close_case()
    assert session.nodes is None and case_nodes_in(mrml.scene) == []
    assert session.case_list() == [("c1", True)]
    assert verdicts_of(study_path, "ana") == {"CMB 1": "correct", "CMB 2": "incorrect", "Added 3": "correct"}
    t4 = session.statistics(n_boot=0)["table4"]["ana"]
    assert (t4["correct"], t4["incorrect"], t4["missed"]) == (1, 1, 1)
    with pytest.raises(StudyError, match="no case is open"):
        session.set_verdict(0, "correct")


def test_switching_the_reader_files_each_verdict_under_the_reader_selected_then(session, study_path):
    session.select_reader("ana")
    session.open_case(0)
    session.set_verdict(0, "correct")
    # ana changed a point's verdict in the point list but did not store it: it is hers
    session.nodes.markups.SetNthControlPointDescription(1, "incorrect:vessel")
    nodes = session.select_reader("ben")
    session.set_verdict(0, "incorrect", "calcification")
    assert verdicts_of(study_path, "ben") == {"CMB 1": "incorrect"}
    assert verdicts_of(study_path, "ana") == {"CMB 1": "correct", "CMB 2": "incorrect"}
    assert nodes is session.nodes and nodes.reader == "ben", "the case stays open, now as ben sees it"
    assert [verdict for _, verdict in session.lesion_rows()] == ["incorrect:calcification", ""], "ben sees none of ana's verdicts"
    with Study.open(study_path) as study:  # ana's sitting ended with the switch
        assert (study.case("c1").id, study.reader_id("ana")) in study.reading_seconds()


def test_opening_another_study_closes_the_open_case(session, study_path, tmp_path, mrml):
    other = tmp_path / "other"
    other.mkdir()
    make_study(other).close()
    session.select_reader("ana")
    session.open_case(0)
    session.nodes.markups.SetNthControlPointDescription(0, "correct")  # not stored yet
    session.open_study(other / "study.db")
    assert session.nodes is None and case_nodes_in(mrml.scene) == [], "the old case's nodes and lesion ids are gone"
    with pytest.raises(StudyError, match="no case is open"):
        session.set_verdict(0, "incorrect", "vessel")
    assert verdicts_of(study_path, "ana") == {"CMB 1": "correct"}, "the old case's edits went to the old study"
    assert verdicts_of(other / "study.db", "ana") == {}
    # a study that cannot be opened leaves the session as it was
    session.open_case(0)
    with pytest.raises(StudyError, match="not found"):
        session.open_study(tmp_path / "nowhere.db")
    assert session.nodes is not None and session.study.path == other / "study.db"


def paint(nodes, segment_id: str, mask: np.ndarray) -> None:
    """What a Segment Editor stroke leaves behind: the segment's voxels replaced by `mask`."""
    if segment_id not in review_mrml._segment_ids(nodes.segmentation):
        nodes.segmentation.GetSegmentation().AddEmptySegment(segment_id, "my bleed")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), nodes.segmentation, segment_id, nodes.volume)


def added_by(path, reader: str) -> list[np.ndarray]:
    """The voxels of each lesion the reader added (not withdrawn), read back from the study's files."""
    from CMBReviewLib import voxelfiles
    from CMBReviewLib.study import load_image

    with Study.open(path) as study:
        mine = [l for l in study.lesions() if l.source == "reader" and l.added_by == study.reader_id(reader)]
        image = load_image(study, "c1")
        return [voxelfiles.read_checked(*study.file(l.file_id), "c1", image) > 0 for l in mine]


def history_rows(path) -> int:
    with Study.open(path) as study:
        return len(study.history())


def test_painted_lesions_are_stored_stroke_by_stroke_and_stay_in_the_scene(session, study_path):
    session.select_reader("ana")
    nodes = session.open_case(0)
    assert session.store_edits_if_changed() is None, "nothing painted yet: nothing to store"
    bleed = sphere_mask(SHAPE, GEOMETRY, *MISSED)
    first_stroke = bleed.copy()
    first_stroke[MISSED[0][0] + 1 :] = False
    paint(nodes, "Segment_1", first_stroke)
    done = session.store_edits_if_changed()
    assert done["added"] == 1 and not done["errors"]
    (stored,) = added_by(study_path, "ana")
    assert np.array_equal(stored, first_stroke), "stored before the reader leaves the case: a crash now loses nothing"
    shown = slicer.util.arrayFromSegmentBinaryLabelmap(nodes.segmentation, "Segment_1", nodes.volume) > 0
    assert np.array_equal(shown, first_stroke), "the painted segment stays where the reader paints it"
    rows = history_rows(study_path)
    assert session.store_edits_if_changed() is None and history_rows(study_path) == rows

    paint(nodes, "Segment_1", bleed)  # the next stroke completes the lesion
    done = session.store_edits_if_changed()
    assert (done["added"], done["replaced"]) == (0, 1)
    (stored,) = added_by(study_path, "ana")
    assert np.array_equal(stored, bleed), "the lesion now holds both strokes; the first version stays in the history"
    assert [label.startswith("Added") for label, _ in session.lesion_rows()] == [False, False, True]

    nodes.segmentation.GetSegmentation().RemoveSegment("Segment_1")
    assert session.store_edits_if_changed()["withdrawn"] == 1
    assert added_by(study_path, "ana") == [] and len(session.lesion_rows()) == 2


def test_a_painted_lesion_that_cannot_be_stored_stays_in_the_scene(session, study_path):
    session.select_reader("ana")
    nodes = session.open_case(0)
    blocker = study_path.with_name(study_path.name + ".files") / "c1"
    blocker.parent.mkdir(exist_ok=True)
    blocker.write_text("a file where the case's voxel folder should be")
    bleed = sphere_mask(SHAPE, GEOMETRY, *MISSED)
    paint(nodes, "Segment_1", bleed)
    nodes.markups.SetNthControlPointDescription(0, "correct")
    done = session.store_edits()
    assert done["added"] == 0 and done["verdicts"] == 1, "the other edits are stored"
    (error,) = done["errors"]
    assert "c1" in error and "my bleed" in error
    shown = slicer.util.arrayFromSegmentBinaryLabelmap(nodes.segmentation, "Segment_1", nodes.volume) > 0
    assert np.array_equal(shown, bleed), "the reader's painting is still in the scene"
    with pytest.raises(StudyError, match="my bleed"):
        session.close_case()  # leaving would lose it: the case stays open
    with pytest.raises(StudyError, match="my bleed"):
        session.select_reader("ben")  # and stays ana's
    assert session.nodes is nodes and session.reader == "ana"
    blocker.unlink()
    assert session.store_edits_if_changed()["added"] == 1, "a failed store is tried again"
    (stored,) = added_by(study_path, "ana")
    assert np.array_equal(stored, bleed)
    session.close_case()


def test_a_failed_commit_does_not_leave_the_long_lived_connection_in_a_transaction(session, study_path):
    study = session.study
    # A deferred foreign-key violation is checked only at COMMIT, which then fails.
    study.con.execute("PRAGMA defer_foreign_keys = ON")
    with pytest.raises(Exception, match="FOREIGN KEY"):
        with study.transaction() as con:
            con.execute("INSERT INTO verdicts (lesion_id, reader_id, verdict, certainty, created) VALUES (9999, 1, 'correct', 'definite', 'now')")
    assert not study.con.in_transaction, "rolled back"
    assert study.con.execute("SELECT COUNT(*) FROM verdicts WHERE lesion_id = 9999").fetchone()[0] == 0
    # the next click is stored as usual, and durable (read back by another connection)
    session.select_reader("ana")
    session.open_case(0)
    session.set_verdict(0, "correct")
    assert verdicts_of(study_path, "ana") == {"CMB 1": "correct"}


# --- a study created from the module ------------------------------------------------------


@pytest.fixture
def case_folders(tmp_path):
    """An images folder and a detections folder as `cmbdetect detect` leaves them (case c1)."""
    source = tmp_path / "source"
    source.mkdir()
    make_study(source).close()
    return source / "images", source / "det"


def test_a_study_created_from_the_module_is_checked_as_review_create_checks_it_and_opened(mrml, tmp_path, case_folders):
    from CMBDetectLib.io import write_volume

    images, det = case_folders
    # A second image without detections: named and left out, as `review create` does.
    write_volume(np.zeros(SHAPE, np.float32) + 400, GEOMETRY, images / "c2.nii.gz")
    session = ReviewSession(mrml.scene)
    added, errors = session.create_study(tmp_path / "new" / "study.db", images, det, ["ana", "ben"])
    assert added == ["c1"]
    (error,) = errors
    assert error.case == "c2" and "no complete CMBDetect result" in str(error)
    assert session.study.path == tmp_path / "new" / "study.db", "the new study is open"
    assert session.readers() == ["ana", "ben"]
    assert "Table 4" in session.statistics_html(n_boot=0), "what the panel shows right after: a study without decisions yet"
    session.select_reader("ben")
    session.open_case(0)
    session.set_verdict(0, "correct")
    session.close()
    assert verdicts_of(tmp_path / "new" / "study.db", "ben") == {"CMB 1": "correct"}


@pytest.mark.parametrize(
    "problem, arguments, message",
    [
        ("no case passes", lambda images, det, tmp: (tmp / "x.db", images, tmp / "empty", ["ana"]), "detections folder not found"),
        ("a bad reader name", lambda images, det, tmp: (tmp / "x.db", images, det, ["ana", "b/en"]), "reader name 'b/en'"),
        ("no study file chosen", lambda images, det, tmp: (None, images, det, ["ana"]), "choose where to write the new study"),
        ("no images folder chosen", lambda images, det, tmp: (tmp / "x.db", None, det, ["ana"]), "give a folder of images"),
        ("an existing study", lambda images, det, tmp: (tmp / "source" / "study.db", images, det, ["ana"]), "exists already"),
    ],
)
def test_a_study_that_cannot_be_created_writes_nothing_and_leaves_the_session_as_it_was(
    session, study_path, tmp_path, case_folders, problem, arguments, message
):
    images, det = case_folders
    session.select_reader("ana")
    session.open_case(0)
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(StudyError, match=re.escape(message)):
        session.create_study(*arguments(images, det, tmp_path))
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before, f"{problem}: nothing written"
    assert session.study.path == study_path and session.nodes is not None, f"{problem}: the open study and case stay"


def test_creating_a_study_leaves_the_open_case_of_the_old_one_stored(session, study_path, tmp_path, case_folders, mrml):
    images, det = case_folders
    session.select_reader("ana")
    session.open_case(0)
    session.nodes.markups.SetNthControlPointDescription(0, "incorrect:vessel")  # not stored yet
    session.create_study(tmp_path / "new.db", images, det, ["ana"])
    assert session.nodes is None and case_nodes_in(mrml.scene) == []
    assert verdicts_of(study_path, "ana") == {"CMB 1": "incorrect"}
    assert session.reader == "ana", "the reader is in the new study too: still selected"


def test_an_empty_path_field_reads_as_not_chosen():
    from pathlib import Path

    from CMBReviewLib.session import chosen_path

    # Slicer's parameter node keeps an empty pathlib.Path as "." (pathlib.Path("") == Path(".")).
    assert chosen_path(Path()) is None and chosen_path("") is None and chosen_path(None) is None and chosen_path(" ") is None
    assert chosen_path(Path("/data/study.db")) == Path("/data/study.db")


def test_opening_with_no_study_chosen_says_so(session, study_path):
    from pathlib import Path

    with pytest.raises(StudyError, match="choose the study file to open"):
        session.open_study(Path())
    assert session.study.path == study_path


def test_reader_names_typed_in_one_field():
    from CMBReviewLib.session import reader_names

    assert reader_names(" ana, ben;carl  dora,,ana ") == ["ana", "ben", "carl", "dora"]
    assert reader_names("") == []


# --- closing the scene ----------------------------------------------------------------------


@pytest.fixture
def scene_close_reports(session, mrml):
    """What the widget's StartClose observer does: hand the closing over to the session; collects
    what each call reports."""
    reported: list[list[str]] = []
    tag = mrml.scene.AddObserver(mrml.scene.StartCloseEvent, lambda caller, event: reported.append(session.scene_closing()))
    yield reported
    mrml.scene.RemoveObserver(tag)


def test_closing_the_scene_stores_the_case_and_leaves_no_dangling_nodes(session, study_path, mrml, scene_close_reports):
    reported = scene_close_reports
    session.select_reader("ana")
    session.open_case(0)
    session.nodes.markups.SetNthControlPointDescription(1, "incorrect:vessel")  # typed, not stored yet
    mrml.clear()
    assert reported == [[]], "stored without a problem"
    assert session.nodes is None, "no reference to the removed nodes is kept"
    assert verdicts_of(study_path, "ana") == {"CMB 2": "incorrect"}
    with Study.open(study_path) as study:
        assert (study.case("c1").id, study.reader_id("ana")) in study.reading_seconds(), "the sitting is recorded"
    assert session.store_edits_if_changed() is None and session.elapsed_seconds() == 0.0
    nodes = session.open_case(0)  # the reader goes on in the new scene
    assert nodes.volume.GetScene() is mrml.scene and sorted(case_nodes_in(mrml.scene)) == ["c1 lesions (ana)", "c1 lesions (ana) points"]
    assert [verdict for _, verdict in session.lesion_rows()] == ["", "incorrect:vessel"]


def test_closing_the_scene_with_an_edit_that_cannot_be_stored_says_so_and_still_lets_go(session, study_path, mrml, scene_close_reports):
    reported = scene_close_reports
    session.select_reader("ana")
    nodes = session.open_case(0)
    blocker = study_path.with_name(study_path.name + ".files") / "c1"
    blocker.parent.mkdir(exist_ok=True)
    blocker.write_text("a file where the case's voxel folder should be")
    paint(nodes, "Segment_1", sphere_mask(SHAPE, GEOMETRY, *MISSED))
    nodes.markups.SetNthControlPointDescription(0, "correct")
    mrml.clear()
    ((error,),) = reported
    assert error.startswith("c1, segment 'my bleed': not stored") and error.endswith("lost: the scene was closed"), error
    assert session.nodes is None, "the scene took the nodes: the session does not hold on to them"
    assert verdicts_of(study_path, "ana") == {"CMB 1": "correct"}, "what could be stored was"
    blocker.unlink()
    session.open_case(0)
    assert case_nodes_in(mrml.scene)
