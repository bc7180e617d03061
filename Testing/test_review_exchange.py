"""Decisions in and out (CSV, JSON) through `cmbdetect review`, and bad input refused whole, naming the problem."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from CMBDetectLib.cli import main as cmbdetect
from CMBReviewLib.analysis import analyse
from CMBReviewLib.store import Study, StudyError
from test_review_walkthrough import fake_detect, fake_synth

COLUMNS = ["case", "reader", "decision", "lesion", "reason", "certainty", "r", "a", "s", "diameter_mm", "seconds", "completed"]


@pytest.fixture
def study(tmp_path):
    fake_synth(tmp_path / "data", 2, seed=0)
    fake_detect(tmp_path / "data" / "images", tmp_path / "det")
    path = tmp_path / "study.db"
    assert cmbdetect(["review", "create", str(path), "--images", str(tmp_path / "data" / "images"), "--detections", str(tmp_path / "det")]) == 0
    assert cmbdetect(["review", "add-reader", str(path), "ana", "ben"]) == 0
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def test_a_file_with_one_bad_row_stores_nothing_and_says_where(study, tmp_path, capsys):
    rows = [
        {"case": "case0", "reader": "ana", "decision": "correct", "lesion": 1},
        {"case": "case0", "reader": "ana", "decision": "incorrect", "lesion": 2, "reason": "unicorn"},
    ]
    assert cmbdetect(["review", "import", str(study), str(write_csv(tmp_path / "bad.csv", rows))]) == 2
    err = capsys.readouterr().err
    assert "bad.csv line 3 (case0)" in err and "needs a reason" in err
    for bad, message in [
        ({"case": "nope", "reader": "ana", "decision": "correct", "lesion": 1}, "case 'nope' is not in the study"),
        ({"case": "case0", "reader": "zoe", "decision": "correct", "lesion": 1}, "reader 'zoe' is not in the study"),
        ({"case": "case0", "reader": "ana", "decision": "correct", "lesion": 99}, "no lesion 99"),
        ({"case": "case0", "reader": "ana", "decision": "missed", "r": 1e4, "a": 0, "s": 0}, "outside the image"),
        ({"case": "case0", "reader": "ana", "decision": "reading", "seconds": -3}, "seconds must be >= 0"),
    ]:
        assert cmbdetect(["review", "import", str(study), str(write_csv(tmp_path / "bad.csv", [rows[0], bad]))]) == 2
        assert message in capsys.readouterr().err
    with Study.open(study) as s:
        assert s.history() == [] and s.reading_seconds() == {}


def test_export_then_import_into_a_new_study_gives_the_same_table4(study, tmp_path):
    for reader, error in (("ana", 0.0), ("ben", 0.5)):
        out = tmp_path / f"{reader}.csv"
        assert cmbdetect(["review", "simulate", str(study), "--truth", str(tmp_path / "data"), "--reader", reader,
                          "--error-rate", str(error), "--seed", "3", "-o", str(out)]) == 0  # fmt: skip
        assert cmbdetect(["review", "import", str(study), str(out)]) == 0
    assert cmbdetect(["review", "export", str(study), str(tmp_path / "all.csv")]) == 0
    assert cmbdetect(["review", "export", str(study), str(tmp_path / "all.json")]) == 0
    history = json.loads((tmp_path / "all.json").read_text())
    assert len(history["history"]) >= len([r for r in history["decisions"] if r["decision"] != "reading"])

    copy = tmp_path / "copy.db"
    assert cmbdetect(["review", "create", str(copy), "--images", str(tmp_path / "data" / "images"), "--detections", str(tmp_path / "det")]) == 0
    assert cmbdetect(["review", "add-reader", str(copy), "ana", "ben"]) == 0
    assert cmbdetect(["review", "import", str(copy), str(tmp_path / "all.csv")]) == 0
    with Study.open(study) as a, Study.open(copy) as b:
        ta, tb = analyse(a, n_boot=0), analyse(b, n_boot=0)
        assert ta["table4"] == tb["table4"]
        assert ta["reading_time"] == tb["reading_time"]
        assert ta["lesion_agreement"]["reader_vs_detector"] == tb["lesion_agreement"]["reader_vs_detector"]


def test_json_decisions_import_like_csv(study, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"decisions": [
        {"case": "case1", "reader": "ben", "decision": "incorrect", "lesion": 3, "reason": "calcification", "certainty": "possible"},
        {"case": "case1", "reader": "ben", "decision": "reading", "seconds": 42, "completed": 0},
    ]}))  # fmt: skip
    assert cmbdetect(["review", "import", str(study), str(path)]) == 0
    with Study.open(study) as s:
        (v,) = s.current_verdicts()
        assert (v.verdict, v.reason, v.certainty) == ("incorrect", "calcification", "possible")
        assert list(s.reading_seconds().values()) == [42.0] and s.resume_position(s.reader_id("ben")) == 0


def test_create_reports_a_bad_case_and_keeps_the_others(tmp_path, capsys):
    fake_synth(tmp_path / "data", 2, seed=0)
    fake_detect(tmp_path / "data" / "images", tmp_path / "det")
    (tmp_path / "det" / "case1_summary.json").unlink()  # an incomplete CMBDetect result
    assert cmbdetect(["review", "create", str(tmp_path / "s.db"), "--images", str(tmp_path / "data" / "images"), "--detections", str(tmp_path / "det")]) == 1
    assert "case1: no complete CMBDetect result" in capsys.readouterr().err
    with Study.open(tmp_path / "s.db") as s:
        assert [c.name for c in s.cases()] == ["case0"] and len(s.lesions()) == 3
    assert cmbdetect(["review", "status", str(tmp_path / "s.db")]) == 0
    assert json.loads(capsys.readouterr().out)["cases"] == 1


def test_a_missed_lesion_from_a_point_is_grown_like_a_click(study, tmp_path):
    from CMBDetectLib.io import read_volume

    image = read_volume(tmp_path / "data" / "images" / "case0.nii.gz")
    truth = read_volume(tmp_path / "data" / "labels" / "case0.nii.gz").array == 3  # the undetected bleed
    centre = np.argwhere(truth).mean(axis=0)
    r, a, s = image.geometry.index_to_ras(centre[::-1])
    rows = [{"case": "case0", "reader": "ana", "decision": "missed", "r": r, "a": a, "s": s}]
    assert cmbdetect(["review", "import", str(study), str(write_csv(tmp_path / "m.csv", rows))]) == 0
    with Study.open(study) as st:
        (added,) = [l for l in st.lesions() if l.source == "reader"]
        from CMBReviewLib import voxelfiles

        grown = voxelfiles.read_checked(*st.file(added.file_id), "case0", image) > 0
        assert 2 * np.sum(grown & truth) / (grown.sum() + truth.sum()) > 0.9


def _stored(path) -> tuple[int, int, int, list]:
    """What a study holds: verdict rows, reading rows, reader-added lesions, voxel files on disk."""
    with Study.open(path) as s:
        verdicts = s.con.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
        readings = s.con.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
        added = len([l for l in s.lesions(include_withdrawn=True) if l.source == "reader"])
        files = sorted(p.name for p in s.files_dir.rglob("*") if p.is_file()) if s.files_dir.exists() else []
    return verdicts, readings, added, files


def test_a_multi_file_import_with_one_bad_file_stores_none_of_them(study, tmp_path, capsys):
    from CMBReviewLib.study import load_image

    with Study.open(study) as s:  # a point inside the image for the missed lesion
        r, a, s_ = load_image(s, "case0").geometry.index_to_ras(np.array([56.0, 48.0, 4.0]))
    good = write_csv(tmp_path / "ana.csv", [
        {"case": "case0", "reader": "ana", "decision": "correct", "lesion": 1},
        {"case": "case0", "reader": "ana", "decision": "missed", "r": r, "a": a, "s": s_, "diameter_mm": 3},
        {"case": "case0", "reader": "ana", "decision": "reading", "seconds": 80},
    ])  # fmt: skip
    bad = write_csv(tmp_path / "ben.csv", [
        {"case": "case0", "reader": "ben", "decision": "correct", "lesion": 1},
        {"case": "case0", "reader": "ben", "decision": "correct", "lesion": 99},
    ])  # fmt: skip
    assert cmbdetect(["review", "import", str(study), str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "ben.csv line 3 (case0)" in err and "no lesion 99" in err
    assert _stored(study) == (0, 0, 0, []), "neither file is stored, and no voxel file is left behind"

    assert cmbdetect(["review", "import", str(study), str(good)]) == 0
    once = _stored(study)
    assert once[:3] == (2, 1, 1) and len(once[3]) == 1
    copy = tmp_path / "ana-copy.csv"
    copy.write_bytes(good.read_bytes())  # the same decisions under another name
    capsys.readouterr()
    assert cmbdetect(["review", "import", str(study), str(good), str(copy)]) == 0
    out = capsys.readouterr().out
    assert out.count("already imported") == 2 and "ana.csv" in out and "nothing stored" in out
    assert _stored(study) == once

    # a reader who changes their mind does so through a new file, which supersedes
    changed = write_csv(tmp_path / "ana-2.csv", [{"case": "case0", "reader": "ana", "decision": "incorrect", "lesion": 1, "reason": "vessel"}])
    assert cmbdetect(["review", "import", str(study), str(changed)]) == 0
    with Study.open(study) as s:
        lesion1 = next(l.id for l in s.lesions() if l.detector_label == 1 and l.case_id == s.case("case0").id)
        assert [(v.verdict, v.reason) for v in s.current_verdicts() if v.lesion_id == lesion1] == [("incorrect", "vessel")]


def test_create_refuses_unsafe_case_names_as_detect_does(tmp_path, capsys):
    import shutil

    fake_synth(tmp_path / "data", 2, seed=0)
    det = tmp_path / "a" / "b" / "det"
    fake_detect(tmp_path / "data" / "images", det)
    for f in det.glob("case1_*"):  # the hostile case's results, where its name points
        shutil.copy(f, tmp_path / "a" / f.name.replace("case1", "escape"))
    listing = tmp_path / "cases.csv"
    listing.write_text("case,image,detections\ncase0,data/images/case0.nii.gz,a/b/det\n../../escape,data/images/case1.nii.gz,a/b/det\n")
    assert cmbdetect(["review", "create", str(tmp_path / "s.db"), "--cases", str(listing)]) == 1
    assert "../../escape: the case name holds a path separator" in capsys.readouterr().err
    with Study.open(tmp_path / "s.db") as s:
        assert [c.name for c in s.cases()] == ["case0"]


def test_a_case_name_stored_by_an_older_version_cannot_write_outside(tmp_path, capsys):
    from CMBReviewLib.study import add_missed, load_image

    fake_synth(tmp_path / "data", 2, seed=0)
    fake_detect(tmp_path / "data" / "images", tmp_path / "det")
    path = tmp_path / "study" / "s.db"
    assert cmbdetect(["review", "create", str(path), "--images", str(tmp_path / "data" / "images"), "--detections", str(tmp_path / "det")]) == 0
    with Study.open(path) as s:
        s.con.execute("UPDATE cases SET name = '../../escape' WHERE name = 'case1'")  # as an older CMBReview let it in
        ana = s.add_reader("ana")
        for case in s.cases():
            s.record_reading(case.id, ana, 10.0)
        image = load_image(s, "../../escape")
        with pytest.raises(StudyError, match="case name holds a path separator"):
            add_missed(s, "../../escape", "ana", np.ones(image.shape, bool), image)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert cmbdetect(["review", "consensus", str(path), "-o", str(tmp_path / "cons" / "out")]) == 1
    assert "../../escape: the case name holds a path separator" in capsys.readouterr().err
    outside = [p for p in sorted(tmp_path.rglob("*")) if p not in before and tmp_path / "cons" / "out" not in (p, *p.parents)]
    assert outside == [tmp_path / "cons"]  # only the output folder's parent, made for it
    assert (tmp_path / "cons" / "out" / "labels" / "case0.seg.nrrd").is_file()


def _regrid(path, **change) -> None:
    """Rewrite a volume with the same voxels on another grid (a shifted origin, another spacing)."""
    from dataclasses import replace

    from CMBDetectLib.io import read_volume, write_volume

    v = read_volume(path)
    write_volume(v.array, replace(v.geometry, **change), path)


def test_create_refuses_a_case_whose_detections_are_on_another_grid(tmp_path, capsys):
    fake_synth(tmp_path / "data", 3, seed=0)
    fake_detect(tmp_path / "data" / "images", tmp_path / "det")
    _regrid(tmp_path / "det" / "case1_lesions.nii.gz", origin=(5.0, 0.0, 0.0))
    (tmp_path / "det" / "case2_lesions.nii.gz").unlink()
    assert cmbdetect(["review", "create", str(tmp_path / "s.db"), "--images", str(tmp_path / "data" / "images"), "--detections", str(tmp_path / "det")]) == 1
    err = capsys.readouterr().err
    assert "case1: detections case1_lesions.nii.gz are not on the image's grid (origin" in err
    assert "case2: no complete CMBDetect result" in err and "case2_lesions.nii.gz" in err
    with Study.open(tmp_path / "s.db") as s:
        assert [c.name for c in s.cases()] == ["case0"]


def test_simulate_refuses_truth_on_another_grid(study, tmp_path, capsys):
    _regrid(tmp_path / "data" / "labels" / "case1.nii.gz", spacing=(0.5, 0.5, 2.0))
    out = tmp_path / "ana.csv"
    assert cmbdetect(["review", "simulate", str(study), "--truth", str(tmp_path / "data"), "--reader", "ana", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: case1: truth case1.nii.gz is not on the image's grid (spacing") and not out.exists()


def test_consensus_with_a_case_on_another_grid_writes_the_others_whole(study, tmp_path, capsys):
    for reader in ("ana", "ben"):
        out = tmp_path / f"{reader}.csv"
        assert cmbdetect(["review", "simulate", str(study), "--truth", str(tmp_path / "data"), "--reader", reader, "-o", str(out)]) == 0
        assert cmbdetect(["review", "import", str(study), str(out)]) == 0
    _regrid(tmp_path / "det" / "case0_lesions.nii.gz", origin=(5.0, 0.0, 0.0))  # changed after the study was made
    capsys.readouterr()
    cons = tmp_path / "cons"
    assert cmbdetect(["review", "consensus", str(study), "-o", str(cons)]) == 1
    assert "error: case0: label case0_lesions.nii.gz is on another grid" in capsys.readouterr().err
    with open(cons / "train.csv", newline="") as f:
        assert [row["case"] for row in csv.DictReader(f)] == ["case1"]
    assert sorted(p.relative_to(cons).as_posix() for p in cons.rglob("*")) == ["consensus.csv", "labels", "labels/case1.seg.nrrd", "train.csv"]


def test_create_with_missing_detections_creates_nothing(tmp_path, capsys):
    fake_synth(tmp_path / "data", 2, seed=0)
    images, path = tmp_path / "data" / "images", tmp_path / "s.db"
    assert cmbdetect(["review", "create", str(path), "--images", str(images), "--detections", str(tmp_path / "nope")]) == 2
    assert f"error: detections folder not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    listing = tmp_path / "cases.csv"  # every case of a list failing: no empty study either
    listing.write_text("image,detections\ndata/images/case0.nii.gz,det0\ndata/images/case1.nii.gz,det1\n")
    assert cmbdetect(["review", "create", str(path), "--cases", str(listing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no case could be added") and "case0: detections folder not found" in err and "case1:" in err
    assert not path.exists() and not path.with_name("s.db.files").exists()
    # so the same command works once the detections are there
    fake_detect(images, tmp_path / "det")
    assert cmbdetect(["review", "create", str(path), "--images", str(images), "--detections", str(tmp_path / "det")]) == 0


def test_simulated_readers_name_the_mimic_an_incorrect_detection_lies_on(study, tmp_path):
    """With the engine's mimic maps beside the truth, a detection on a vein is "incorrect:
    vessel", as a reader would say; without them the reason is "other"."""
    from CMBDetectLib.io import write_volume
    from handmade import oblique_geometry
    from test_review_walkthrough import FALSE_POSITIVE, SHAPE, sphere_mask

    def reasons(out):
        assert cmbdetect(["review", "simulate", str(study), "--truth", str(tmp_path / "data"), "--reader", "ana", "-o", str(out)]) == 0
        return {r["reason"] for r in csv.DictReader(open(out)) if r["decision"] == "incorrect"}

    assert reasons(tmp_path / "plain.csv") == {"other"}
    geometry = oblique_geometry()
    mimics = np.zeros(SHAPE, np.uint8)
    mimics[sphere_mask(SHAPE, geometry, FALSE_POSITIVE[0], FALSE_POSITIVE[1] / 2 + 1.0)] = 1  # a vein under the false positive
    for case in ("case0", "case1"):
        write_volume(mimics, geometry, tmp_path / "data" / "mimics" / f"{case}.nii.gz")
    assert reasons(tmp_path / "mimic.csv") == {"vessel"}


def test_the_scripted_readers_verdicts_equal_those_computed_from_the_truth_directly(study, tmp_path):
    """`review simulate` against the answer worked out here from the files alone: a detection is
    correct when it covers a true voxel, else incorrect with the reason of the mimic most of it
    lies on; every true bleed no detection touches is missed, at its centre."""
    from CMBDetectLib.io import read_volume, write_volume
    from handmade import oblique_geometry
    from scipy import ndimage
    from test_review_walkthrough import FALSE_POSITIVE, SHAPE, sphere_mask

    geometry = oblique_geometry()
    reason_of_code = {1: "vessel", 2: "calcification", 3: "iron_deposit", 4: "artefact"}
    for case, code in (("case0", 1), ("case1", 2)):
        mimics = np.zeros(SHAPE, np.uint8)
        mimics[sphere_mask(SHAPE, geometry, FALSE_POSITIVE[0], FALSE_POSITIVE[1] / 2 + 1.0)] = code
        mimics[sphere_mask(SHAPE, geometry, FALSE_POSITIVE[0], 1.0)] = 4  # a little air edge inside: the majority wins
        write_volume(mimics, geometry, tmp_path / "data" / "mimics" / f"{case}.nii.gz")
    out = tmp_path / "scripted.csv"
    assert cmbdetect(["review", "simulate", str(study), "--truth", str(tmp_path / "data"), "--reader", "ana", "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))

    expected_verdicts, expected_missed = set(), {}
    for case in ("case0", "case1"):
        truth = np.rint(read_volume(tmp_path / "data" / "labels" / f"{case}.nii.gz").array).astype(int)
        detections = np.rint(read_volume(tmp_path / "det" / f"{case}_lesions.nii.gz").array).astype(int)
        mimics = np.rint(read_volume(tmp_path / "data" / "mimics" / f"{case}.nii.gz").array).astype(int)
        for lesion in range(1, detections.max() + 1):
            inside = detections == lesion
            if (truth[inside] > 0).any():
                expected_verdicts.add((case, "correct", lesion, ""))
            else:
                codes = mimics[inside][mimics[inside] > 0]
                expected_verdicts.add((case, "incorrect", lesion, reason_of_code[int(np.bincount(codes).argmax())] if codes.size else "other"))
        untouched = set(np.unique(truth[truth > 0])) - set(np.unique(truth[detections > 0]))
        expected_missed[case] = sorted(tuple(np.round(geometry.index_to_ras(np.array(ndimage.center_of_mass(truth == t))[::-1]), 1)) for t in untouched)

    verdicts = {(r["case"], r["decision"], int(r["lesion"]), r["reason"]) for r in rows if r["decision"] in ("correct", "incorrect")}
    assert verdicts == expected_verdicts
    assert {v[3] for v in verdicts if v[1] == "incorrect"} == {"vessel", "calcification"}
    for case in ("case0", "case1"):
        missed = sorted(tuple(round(float(r[k]), 1) for k in "ras") for r in rows if r["decision"] == "missed" and r["case"] == case)
        assert len(missed) == len(expected_missed[case]) == 1
        assert np.allclose(missed, expected_missed[case], atol=0.15)
