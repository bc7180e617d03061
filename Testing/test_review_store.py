"""The study store on real SQLite files: concurrent writers, a writer killed mid-decision, migration, history."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from CMBDetectLib.io import Geometry, Volume
from CMBReviewLib import voxelfiles
from CMBReviewLib.store import APPLICATION_ID, SCHEMA_V1, SCHEMA_VERSION, Study, StudyError, create_schema_v1
from CMBReviewLib.study import add_missed, save_groundtruth

N_LESIONS = 40


def make_study(path, n_lesions: int = N_LESIONS, readers=("ana", "ben")) -> None:
    with Study.create(path) as study:
        case_id = study.add_case("case1", "case1.nii.gz")
        study.add_detector_lesions(case_id, [{"id": n + 1, "ras": (float(n), 0.0, 0.0)} for n in range(n_lesions)])
        for r in readers:
            study.add_reader(r)


def _writer(path: str, reader: str, barrier, verdict: str) -> None:
    """One reader triaging every lesion, one transaction per click, as fast as it can."""
    with Study.open(path) as study:
        reader_id = study.reader_id(reader)
        lesions = [l.id for l in study.lesions()]
        barrier.wait()
        for lesion in lesions:
            study.record_verdict(lesion, reader_id, verdict, "vessel" if verdict == "incorrect" else None)
            study.record_reading(1, reader_id, 0.5, completed=False)


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "study.db"
    make_study(path)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(path), r, barrier, v)) for r, v in (("ana", "correct"), ("ben", "incorrect"))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with Study.open(path) as study:
        assert study.integrity_ok()
        current = study.current_verdicts()
        ids = study.readers()
        by_reader = {name: [v for v in current if v.reader_id == r] for r, name in ids.items()}
        assert len(by_reader["ana"]) == len(by_reader["ben"]) == N_LESIONS
        assert {v.verdict for v in by_reader["ana"]} == {"correct"} and {v.verdict for v in by_reader["ben"]} == {"incorrect"}
        assert study.con.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 2 * N_LESIONS


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from CMBReviewLib.store import Study, now
    study = Study.open(sys.argv[1])
    reader = study.reader_id("ana")
    lesions = [l.id for l in study.lesions()]
    for lesion in lesions[:5]:
        study.record_verdict(lesion, reader, "correct")  # five complete decisions
    with study.transaction() as con:  # the sixth: half written when the process dies
        con.execute("INSERT INTO verdicts (lesion_id, reader_id, verdict, certainty, created) VALUES (?, ?, 'correct', 'definite', ?)",
                    (lesions[5], reader, now()))
        print("inside", flush=True)
        time.sleep(120)
    """
)


def test_writer_killed_mid_decision_leaves_a_consistent_store(tmp_path):
    path = tmp_path / "study.db"
    make_study(path)
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "inside"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    with Study.open(path) as study:
        assert study.integrity_ok()
        verdicts = study.current_verdicts()
        assert len(verdicts) == 5, "the five committed decisions stay, the half one is gone"
        # and the store takes new decisions at once (no lock left behind)
        study.record_verdict(study.lesions()[5].id, study.reader_id("ben"), "incorrect", "calcification")
        assert len(study.current_verdicts()) == 6


def test_migration_from_version_1_keeps_every_row(tmp_path):
    path = tmp_path / "v1.db"
    create_schema_v1(path)  # exactly the DDL the first release wrote
    con = sqlite3.connect(path)
    con.executescript(
        """
        INSERT INTO study VALUES ('name', 'old'), ('match_radius_mm', '4.0');
        INSERT INTO cases (id, name, image, position) VALUES (1, 'c1', 'c1.nii.gz', 0);
        INSERT INTO readers (id, name, created) VALUES (1, 'ana', 't');
        INSERT INTO lesions (id, case_id, source, detector_label, r, a, s, created) VALUES (1, 1, 'detector', 1, 0, 0, 0, 't');
        INSERT INTO verdicts (lesion_id, reader_id, verdict, reason, created) VALUES (1, 1, 'incorrect', 'vessel', 't');
        INSERT INTO readings (case_id, reader_id, seconds, completed, created) VALUES (1, 1, 90.5, 1, 't');
        """
    )
    con.commit()
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    con.close()

    with Study.open(path) as study:
        assert study.schema_version == SCHEMA_VERSION == 3
        (v,) = study.current_verdicts()
        assert (v.verdict, v.reason, v.certainty) == ("incorrect", "vessel", "definite")  # v1 verdicts were definite
        assert study.reading_seconds() == {(1, 1): 90.5}
        assert study.match_radius_mm == 4.0
        study.record_verdict(1, 1, "correct", certainty="possible")  # the v2 column works
        assert study.current_verdicts()[0].certainty == "possible"
        study.record_reading(1, 1, 10.0, comment="second look")
        study.record_import("0" * 64, "old.csv", 1)  # the v3 table of imported files works
        assert study.imported("0" * 64)["name"] == "old.csv"
        assert study.integrity_ok()
    with Study.open(path) as study:  # opening again applies nothing more
        assert study.schema_version == 3 and len(study.history()) == 2


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    make_study(path)
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(StudyError, match="newer than this CMBReview"):
        Study.open(path)


def test_v1_ddl_is_what_create_starts_from(tmp_path):
    # The migration test is only honest if new studies really start at v1 and migrate.
    assert "certainty" not in SCHEMA_V1
    path = tmp_path / "s.db"
    make_study(path)
    con = sqlite3.connect(path)
    columns = [r[1] for r in con.execute("PRAGMA table_info(verdicts)")]
    assert "certainty" in columns and con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID  # marks it a study
    assert con.execute("PRAGMA foreign_keys").fetchone()[0] == 0  # off per connection by default...
    con.close()
    with Study.open(path) as study:
        assert study.con.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # ...and on in ours
        with pytest.raises(sqlite3.IntegrityError):
            with study.transaction() as c:
                c.execute("INSERT INTO verdicts (lesion_id, reader_id, verdict, certainty, created) VALUES (999, 1, 'correct', 'definite', 't')")


def test_a_new_verdict_supersedes_and_the_history_stays(tmp_path):
    path = tmp_path / "s.db"
    make_study(path, n_lesions=2)
    with Study.open(path) as study:
        ana = study.reader_id("ana")
        first = study.lesions()[0].id
        study.record_verdict(first, ana, "correct")
        study.record_verdict(first, ana, "incorrect", "artefact", "possible")
        (current,) = study.current_verdicts(ana)
        assert (current.verdict, current.reason, current.certainty) == ("incorrect", "artefact", "possible")
        assert [h["verdict"] for h in study.history()] == ["correct", "incorrect"]


@pytest.mark.parametrize(
    "verdict, reason, certainty, message",
    [
        ("incorrect", None, "definite", "needs a mimic reason"),
        ("incorrect", "bird", "definite", "needs a mimic reason"),
        ("correct", "vessel", "definite", "only an incorrect label"),
        ("maybe", None, "definite", "verdict must be one of"),
        ("correct", None, "sure", "certainty must be one of"),
    ],
)
def test_bad_verdicts_are_refused_and_store_nothing(tmp_path, verdict, reason, certainty, message):
    path = tmp_path / "s.db"
    make_study(path, n_lesions=1)
    with Study.open(path) as study:
        with pytest.raises(StudyError, match=message):
            study.record_verdict(study.lesions()[0].id, study.reader_id("ana"), verdict, reason, certainty)
        assert study.history() == []


def test_reader_names_are_file_safe(tmp_path):
    with Study.create(tmp_path / "s.db") as study:
        for bad in ("", "a b", "../x", "é"):
            with pytest.raises(StudyError, match="reader name"):
                study.add_reader(bad)
        assert study.add_reader("dr_ana-2") == study.add_reader("dr_ana-2")


def _volume(shape=(6, 20, 24)) -> Volume:
    return Volume(np.full(shape, 400.0, np.float32), Geometry((0.5, 0.6, 2.0), (10.0, -5.0, 3.0)))


def test_voxel_files_are_per_reader_never_overwritten_and_checked(tmp_path):
    path = tmp_path / "s.db"
    make_study(path, n_lesions=0)
    image = _volume()
    mask = np.zeros(image.shape, bool)
    mask[3, 10:13, 10:13] = True
    with Study.open(path) as study:
        a = add_missed(study, "case1", "ana", mask, image)
        b = add_missed(study, "case1", "ben", mask, image)
        files = {l.id: study.file(l.file_id) for l in study.lesions() if l.source == "reader"}
        (pa, sha_a), (pb, _) = files[a], files[b]
        assert pa != pb and ".ana." in pa.name and ".ben." in pb.name and pa.parent.name == "case1"
        assert np.array_equal(voxelfiles.read_checked(pa, sha_a, "case1", image) > 0, mask)
        # a second labelling by the same reader is a new file; the first stays as it was
        g1 = save_groundtruth(study, "case1", "ana", mask.astype(np.uint16), image)
        g2 = save_groundtruth(study, "case1", "ana", mask.astype(np.uint16) * 2, image)
        gts = study.groundtruths(1)
        assert [g["id"] for g in gts] == [g1, g2] and len({g["path"] for g in gts}) == 2
        # endorsement needs a second reader
        with pytest.raises(StudyError, match="second reader"):
            study.endorse(g2, study.reader_id("ana"))
        study.endorse(g2, study.reader_id("ben"))
        assert study.groundtruths(1)[-1]["endorsed_by"] == [study.reader_id("ben")]
        # a file changed behind the study's back is caught
        pa.write_bytes(pa.read_bytes() + b"\n")
        with pytest.raises(StudyError, match="sha256 differs"):
            voxelfiles.read_checked(pa, sha_a, "case1", image)
        with pytest.raises(StudyError, match="empty"):
            add_missed(study, "case1", "ana", np.zeros(image.shape, bool), image)


def test_resume_position_is_the_first_case_not_completed(tmp_path):
    with Study.create(tmp_path / "s.db") as study:
        ids = [study.add_case(f"c{n}", f"c{n}.nii.gz") for n in range(4)]
        ana = study.add_reader("ana")
        assert study.resume_position(ana) == 0
        study.record_reading(ids[0], ana, 30.0)
        study.record_reading(ids[1], ana, 12.0, completed=False)
        assert study.resume_position(ana) == 1
        study.record_reading(ids[1], ana, 20.0)
        study.record_reading(ids[2], ana, 5.0)
        assert study.resume_position(ana) == 3
        assert study.reading_seconds()[(ids[1], ana)] == 32.0


def _foreign_sqlite(path) -> None:
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE people (name TEXT); INSERT INTO people VALUES ('x');")
    con.close()


def _other_program(path) -> None:
    _foreign_sqlite(path)
    con = sqlite3.connect(path)
    con.execute("PRAGMA application_id = 1234")
    con.close()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("case,reader\n"), "not a SQLite file"),
        (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
        (_foreign_sqlite, "not a CMBReview study"),
        (_other_program, "another program's SQLite file"),
    ],
    ids=["text", "empty", "foreign-sqlite", "other-application"],
)
def test_a_file_that_is_not_a_study_is_refused_and_left_untouched(tmp_path, capsys, make, message):
    from CMBDetectLib.cli import main as cmbdetect

    path = tmp_path / "study.db"
    make(path)
    before = path.read_bytes()
    for action in (["status"], ["add-reader", None, "ana"], ["report", None, "-o", str(tmp_path / "r")]):
        args = ["review", action[0], str(path), *action[2:]]
        assert cmbdetect(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and str(path) in err and "Traceback" not in err
    with pytest.raises(StudyError, match=re.escape(message)):
        Study.open(path)
    assert path.read_bytes() == before, "the file is not modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.db"], "no WAL or journal left beside it"


def _corrupt_a_page(path) -> None:
    """Overwrite most of one b-tree page, as a failing disk or a bad copy would."""
    con = sqlite3.connect(path)
    page_size, pages = con.execute("PRAGMA page_size").fetchone()[0], con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    data = bytearray(path.read_bytes())
    start = (pages - 3) * page_size  # a page of the detector lesions' table or its index
    data[start + 8 : start + page_size // 2] = b"\xff" * (page_size // 2 - 8)
    path.write_bytes(bytes(data))


def test_a_damaged_study_is_named_and_not_deepened(tmp_path, capsys):
    from CMBDetectLib.cli import main as cmbdetect

    path = tmp_path / "study.db"
    make_study(path, n_lesions=400)
    _corrupt_a_page(path)
    before = path.read_bytes()
    assert cmbdetect(["review", "status", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "damaged" in err and "backup" in err and "Traceback" not in err
    with pytest.raises(StudyError, match="damaged"):
        Study.open(path)
    assert path.read_bytes() == before


def test_status_names_voxel_files_missing_or_changed(tmp_path, capsys):
    from CMBDetectLib.cli import main as cmbdetect

    path = tmp_path / "study.db"
    make_study(path, n_lesions=1)
    image = _volume()
    mask = np.zeros(image.shape, bool)
    mask[3, 10:13, 10:13] = True
    with Study.open(path) as study:
        add_missed(study, "case1", "ana", mask, image)
        file_a, _ = study.file(study.lesions()[-1].file_id)
        add_missed(study, "case1", "ben", mask, image)
        file_b, _ = study.file(study.lesions()[-1].file_id)
    assert cmbdetect(["review", "status", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    file_a.write_bytes(file_a.read_bytes() + b"\n")
    file_b.unlink()
    assert cmbdetect(["review", "status", str(path)]) == 1
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["problems"]) == 2
    assert f"error: voxel file {file_a.name} was changed" in captured.err and f"error: voxel file {file_b.name} is missing" in captured.err


def test_backup_copies_the_study_and_its_voxel_files(tmp_path, capsys):
    from CMBDetectLib.cli import main as cmbdetect

    path = tmp_path / "study.db"
    make_study(path, n_lesions=3)
    image = _volume()
    mask = np.zeros(image.shape, bool)
    mask[3, 10:13, 10:13] = True
    with Study.open(path) as study:  # open while the backup runs: a reader at work
        add_missed(study, "case1", "ana", mask, image)
        study.record_verdict(study.lesions()[0].id, study.reader_id("ben"), "correct")
        dest = tmp_path / "elsewhere" / "copy.db"
        assert cmbdetect(["review", "backup", str(path), str(dest)]) == 0
        history = study.history()
    with Study.open(dest) as copy:
        assert copy.history() == history and copy.integrity_ok()
        (added,) = [l for l in copy.lesions() if l.source == "reader"]
        file, digest = copy.file(added.file_id)
        assert np.array_equal(voxelfiles.read_checked(file, digest, "case1", image) > 0, mask)
    assert cmbdetect(["review", "backup", str(path), str(dest)]) == 2
    assert "exists already" in capsys.readouterr().err
