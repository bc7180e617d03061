"""CMBReview on new-bleed calls: `cmbdetect review create --longitudinal OUT` makes a study whose
cases are the pairs' follow-ups and whose detections are only the lesions the comparison called
new; readers judge them correct / incorrect and add the new bleeds the tool missed, as for any
detection, and Table 4 and the export read those verdicts back."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from CMBDetectLib.cli import main
from CMBReviewLib.store import Study
from test_longitudinal import NEW, OLD, baseline_scan, detector, expected_in_followup, followup_of, rows  # noqa: F401 - detector is a fixture


@pytest.fixture(scope="module")
def longitudinal_out(tmp_path_factory, detector):  # noqa: F811 - the fixture imported above
    """Two pairs of one baseline: `grown` with every NEW bleed added, `same` the baseline again (nothing new)."""
    folder = tmp_path_factory.mktemp("pairs")
    baseline_scan(folder / "m0.nii.gz")
    followup_of(OLD + NEW, folder / "m6.nii.gz")
    (folder / "pairs.csv").write_text("baseline,followup,case\nm0.nii.gz,m6.nii.gz,grown\nm0.nii.gz,m0.nii.gz,same\n")
    assert main(["longitudinal", "--pairs-csv", str(folder / "pairs.csv"), "-o", str(folder / "out"), *detector]) == 0
    return folder / "out"


def lesion_rows(out, case) -> list[dict]:
    return rows(out / "followup" / f"{case}_lesions.csv")


def table(path) -> dict[str, dict]:
    return {r["label"]: r for r in csv.DictReader(open(path))}


def test_a_study_of_new_bleed_calls_records_verdicts_and_reads_table4_and_the_export_back(tmp_path, longitudinal_out, capsys):
    out, study_path = longitudinal_out, tmp_path / "newbleeds.db"
    assert main(["review", "create", str(study_path), "--longitudinal", str(out)]) == 0
    with Study.open(study_path) as study:
        cases = {c.name: c for c in study.cases()}
        # The follow-ups, by the case names of their outputs: m6 (grown) and m0 (same, the baseline again).
        assert set(cases) == {"m6", "m0"}
        grown = [l for l in study.lesions(cases["m6"].id) if l.source == "detector"]
        assert study.lesions(cases["m0"].id) == []  # nothing new: nothing to judge, but missed bleeds can be added
    # Only the new lesions, with the follow-up's own ids, at the new bleeds' places; not the persisting ones.
    assert len(grown) == len(NEW) and len(lesion_rows(out, "m6")) == len(OLD) + len(NEW)
    new_places = expected_in_followup(NEW) * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS
    for lesion in grown:
        assert np.min(np.linalg.norm(new_places - np.array(lesion.ras), axis=1)) < 1.5
        row = next(r for r in lesion_rows(out, "m6") if int(r["id"]) == lesion.detector_label)
        assert abs(float(row["centroid_r"]) - lesion.ras[0]) < 1e-3
    ids = sorted(l.detector_label for l in grown)

    assert main(["review", "add-reader", str(study_path), "ana"]) == 0
    missed_at = expected_in_followup(OLD[:1])[0] * np.array([-1.0, -1.0, 1.0])  # a reader's own call, as a 3 mm sphere
    decisions = tmp_path / "ana.csv"
    with open(decisions, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "reader", "decision", "lesion", "reason", "r", "a", "s", "diameter_mm", "seconds", "completed"])
        w.writerow(["m6", "ana", "correct", ids[0], "", "", "", "", "", "", ""])
        w.writerow(["m6", "ana", "correct", ids[1], "", "", "", "", "", "", ""])
        w.writerow(["m6", "ana", "incorrect", ids[2], "vessel", "", "", "", "", "", ""])
        w.writerow(["m0", "ana", "missed", "", "", *(round(float(v), 2) for v in missed_at), 3.0, "", ""])
        w.writerow(["m6", "ana", "reading", "", "", "", "", "", "", 40, 1])
        w.writerow(["m0", "ana", "reading", "", "", "", "", "", "", 25, 1])
    assert main(["review", "import", str(study_path), str(decisions)]) == 0
    assert main(["review", "report", str(study_path), "-o", str(tmp_path / "report"), "--bootstrap", "0", "--no-html"]) == 0
    t4 = table(tmp_path / "report" / "table4.csv")
    assert (t4["correct"]["ana_count"], t4["incorrect"]["ana_count"], t4["missed"]["ana_count"], t4["cases"]["ana_count"]) == ("2", "1", "1", "2")
    per_case = {r["case"]: r for r in csv.DictReader(open(tmp_path / "report" / "cases.csv"))}
    assert (per_case["m6"]["detector_lesions"], per_case["m0"]["detector_lesions"]) == ("3", "0")
    assert main(["review", "export", str(study_path), str(tmp_path / "export.csv")]) == 0
    exported = list(csv.DictReader(open(tmp_path / "export.csv")))
    verdicts = sorted((r["case"], r["decision"], r["lesion"], r["reason"]) for r in exported if r["decision"] in ("correct", "incorrect"))
    assert verdicts == [("m6", "correct", str(ids[0]), ""), ("m6", "correct", str(ids[1]), ""), ("m6", "incorrect", str(ids[2]), "vessel")]
    assert [r["case"] for r in exported if r["decision"] == "missed"] == ["m0"]


def test_a_pair_whose_changes_do_not_fit_its_followup_is_named_and_the_others_go_on(tmp_path, longitudinal_out, capsys):
    out = tmp_path / "out"
    shutil.copytree(longitudinal_out, out)
    changes = rows(out / "grown_changes.csv")
    first_new = next(r for r in changes if r["status"] == "new")
    first_new["centroid_r"] = str(float(first_new["centroid_r"]) + 4.0)  # no longer a lesion of the follow-up
    with open(out / "grown_changes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(changes[0]))
        writer.writeheader()
        writer.writerows(changes)
    assert main(["review", "create", str(tmp_path / "s.db"), "--longitudinal", str(out)]) == 1
    err = capsys.readouterr().err
    assert "m6" in err and "grown_changes.csv has a new lesion at RAS" in err and "different runs" in err
    with Study.open(tmp_path / "s.db") as study:
        assert [c.name for c in study.cases()] == ["m0"]


def test_review_create_refuses_a_folder_that_is_not_a_longitudinal_output_and_mixed_sources(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["review", "create", str(tmp_path / "s.db"), "--longitudinal", str(tmp_path / "empty")]) == 2
    assert "holds no pair of `cmbdetect longitudinal`" in capsys.readouterr().err
    assert main(["review", "create", str(tmp_path / "s.db"), "--longitudinal", str(tmp_path / "empty"), "--images", str(tmp_path)]) == 2
    assert "give --longitudinal OUT alone" in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()
