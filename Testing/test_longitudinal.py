"""`cmbdetect longitudinal`: two scans of one head, detected by the hand-wired dark-spot network
(every dark sphere is a candidate, and a constant classifier keeps them all at the count point),
the follow-up made from the baseline's anatomy through a known rigid motion."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from CMBDetectLib.cli import main
from CMBDetectLib.io import Geometry, geometry_of, to_sitk, write_volume
from CMBDetectLib.longitudinal.grade import aria_h_grade
from handmade import (
    constant_classifier,
    oblique_geometry,
    phantom,
    save_dark_spot_model,
)
from test_operating_points import calibrated_copy

SHAPE = (16, 96, 112)
GRID = Geometry((1.0, 1.0, 1.5), (-56.0, -48.0, -12.0))
OLD = [((8, 48, 30), 5.0), ((8, 30, 70), 5.0)]  # (k, j, i), diameter mm
NEW = [((8, 66, 62), 5.0), ((7, 40, 52), 5.0), ((9, 62, 86), 5.0)]
# Follow-up space -> baseline space: what sitk.Resample takes, so the follow-up shows the head
# moved by the inverse. A few degrees about each axis and a few millimetres.
MOTION = sitk.Euler3DTransform((0.0, 0.0, 0.0), np.radians(1.0), np.radians(-1.5), np.radians(4.0), (2.0, -1.5, 0.75))


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("models")
    # P(microbleed) of every candidate 0.84 (the constant classifier favouring microbleed): counted at 0.8.
    classifier = calibrated_copy(constant_classifier(folder / "c.safetensors", keep_at=0.5, favourite="microbleed"), review=0.5, count=0.8)
    return ["--model", str(save_dark_spot_model(folder / "dark.safetensors")), "--candidate-model", str(classifier), "--device", "cpu"]


def head(spheres, seed: int) -> sitk.Image:
    """The phantom's head narrowed towards the slab's ends: an ellipsoid, not a cylinder, whose
    position along the slices a registration can find."""
    array, _, _ = phantom(SHAPE, GRID, spheres, seed=seed)
    k, j, i = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]]
    c = (np.asarray(SHAPE) - 1) / 2
    outside = ((k - c[0]) / (0.8 * SHAPE[0])) ** 2 + ((j - c[1]) / (0.45 * SHAPE[1])) ** 2 + ((i - c[2]) / (0.45 * SHAPE[2])) ** 2 >= 1
    array[outside] = 8.0
    return to_sitk(array, GRID)


def followup_of(spheres, path: Path, seed: int = 1, grid: Geometry = GRID, shape=SHAPE) -> Path:
    """The baseline's head with `spheres`, other noise, seen after MOTION on `grid`."""
    reference = to_sitk(np.zeros(shape, np.float32), grid)
    moved = sitk.Resample(head(spheres, seed), reference, MOTION, sitk.sitkLinear, 8.0, sitk.sitkFloat32, True)
    write_volume(sitk.GetArrayFromImage(moved), geometry_of(moved), path)
    return path


def baseline_scan(path: Path, spheres=OLD) -> Path:
    write_volume(sitk.GetArrayFromImage(head(spheres, 0)), GRID, path)
    return path


def rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def expected_in_followup(spheres) -> np.ndarray:
    """Where the spheres (baseline grid) appear in the follow-up's space, LPS mm."""
    inverse = MOTION.GetInverse()
    return np.array([inverse.TransformPoint(tuple(GRID.index_to_lps(np.array(c[::-1], float)))) for c, _ in spheres])


def nearest(points: np.ndarray, row: dict) -> float:
    p = np.array([float(row["centroid_l"]), float(row["centroid_p"]), float(row["centroid_s_lps"])])
    return float(np.min(np.linalg.norm(points - p, axis=1)))


def test_known_motion_and_new_bleeds_give_statuses_and_grade(tmp_path, detector):
    base = baseline_scan(tmp_path / "sub01_m0.nii.gz")
    follow = followup_of(OLD + NEW, tmp_path / "sub01_m6.nii.gz")
    assert main(["longitudinal", str(base), str(follow), "-o", str(tmp_path / "out"), *detector]) == 0
    summary = json.loads((tmp_path / "out" / "sub01_m6_summary.json").read_text())
    assert (summary["new_microbleeds"], summary["persisting"], summary["resolved"]) == (len(NEW), len(OLD), 0)
    assert summary["aria_h"] == aria_h_grade(len(NEW)) == "mild"
    assert any("siderosis" in n for n in summary["notes"]) and any("resolved" in n for n in summary["notes"])
    assert summary["registration"]["correlation"] >= summary["registration"]["min_correlation"]
    changes = rows(tmp_path / "out" / "sub01_m6_changes.csv")
    for status, spheres in (("new", NEW), ("persisting", OLD)):
        found = [r for r in changes if r["status"] == status]
        assert len(found) == len(spheres) and all(nearest(expected_in_followup(spheres), r) < 1.5 for r in found)
    r = changes[0]  # RAS is LPS with the first two axes negated
    assert float(r["centroid_r"]) == -float(r["centroid_l"]) and float(r["centroid_s"]) == float(r["centroid_s_lps"])
    # Each scan's own outputs, in the layout detect writes.
    assert (tmp_path / "out" / "baseline" / "sub01_m0_lesions.csv").is_file()
    assert (tmp_path / "out" / "followup" / "sub01_m6_prob.nii.gz").is_file()


def test_a_bleed_missed_at_followup_is_resolved_not_lost(tmp_path, detector):
    base = baseline_scan(tmp_path / "b.nii.gz")
    follow = followup_of(OLD[:1], tmp_path / "f.nii.gz")
    assert main(["longitudinal", str(base), str(follow), "-o", str(tmp_path / "out"), *detector]) == 0
    summary = json.loads((tmp_path / "out" / "f_summary.json").read_text())
    assert (summary["new_microbleeds"], summary["persisting"], summary["resolved"], summary["aria_h"]) == (0, 1, 1, "none")
    resolved = [r for r in rows(tmp_path / "out" / "f_changes.csv") if r["status"] == "resolved"]
    # Its baseline position, mapped through the registration into the follow-up's space.
    assert len(resolved) == 1 and nearest(expected_in_followup(OLD[1:]), resolved[0]) < 1.5
    assert float(resolved[0]["p_microbleed"]) > 0.8


def test_identical_scans_give_no_new_bleed(tmp_path, detector):
    base = baseline_scan(tmp_path / "b.nii.gz")
    assert main(["longitudinal", str(base), str(base), "-o", str(tmp_path / "out"), "--case", "same", *detector]) == 0
    summary = json.loads((tmp_path / "out" / "same_summary.json").read_text())
    assert (summary["new_microbleeds"], summary["persisting"], summary["resolved"], summary["aria_h"]) == (0, len(OLD), 0, "none")


def test_a_bleed_seen_at_baseline_below_the_count_point_is_persisting(tmp_path, detector):
    # At baseline the spot is too small to be a lesion (under 2 mm): not counted, but dark there.
    base = baseline_scan(tmp_path / "b.nii.gz", OLD + [(NEW[0][0], 1.6)])
    follow = followup_of(OLD + NEW[:1], tmp_path / "f.nii.gz")
    assert main(["longitudinal", str(base), str(follow), "-o", str(tmp_path / "out"), *detector]) == 0
    summary = json.loads((tmp_path / "out" / "f_summary.json").read_text())
    assert (summary["new_microbleeds"], summary["persisting"], summary["persisting_seen_below_count_point"]) == (0, 3, 1)
    seen = [r for r in rows(tmp_path / "out" / "f_changes.csv") if r["evidence"].startswith("seen at baseline below the count point")]
    assert len(seen) == 1 and nearest(expected_in_followup(NEW[:1]), seen[0]) < 1.5


def test_an_oblique_followup_on_another_grid_is_handled(tmp_path, detector):
    base = baseline_scan(tmp_path / "b.nii.gz")
    oblique = oblique_geometry(spacing=(1.1, 1.1, 1.4), angles_deg=(3.0, -2.0, 10.0), origin=(-52.0, -58.0, -11.0))
    follow = followup_of(OLD + NEW[:2], tmp_path / "f.nii.gz", grid=oblique, shape=(18, 100, 104))
    assert main(["longitudinal", str(base), str(follow), "-o", str(tmp_path / "out"), *detector]) == 0
    summary = json.loads((tmp_path / "out" / "f_summary.json").read_text())
    assert (summary["new_microbleeds"], summary["persisting"], summary["resolved"]) == (2, len(OLD), 0)


def test_a_followup_that_does_not_register_is_refused_not_graded(tmp_path, detector, capsys):
    baseline_scan(tmp_path / "b.nii.gz")
    noise = np.abs(np.random.default_rng(3).normal(200, 120, SHAPE)).astype(np.float32)
    write_volume(noise, GRID, tmp_path / "noise.nii.gz")
    followup_of(OLD + NEW[:1], tmp_path / "good.nii.gz")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("baseline,followup,case\nb.nii.gz,noise.nii.gz,bad\nb.nii.gz,good.nii.gz,good\n")
    assert main(["longitudinal", "--pairs-csv", str(pairs), "-o", str(tmp_path / "out"), *detector]) == 1
    err = capsys.readouterr().err
    assert "error: bad:" in err and "does not register to the baseline" in err and "not graded" in err
    assert not (tmp_path / "out" / "bad_summary.json").exists() and not (tmp_path / "out" / "bad_changes.csv").exists()
    assert json.loads((tmp_path / "out" / "good_summary.json").read_text())["new_microbleeds"] == 1  # the other pair went on


def test_two_followups_of_one_baseline_detect_it_once_and_resume(tmp_path, detector, capsys):
    baseline_scan(tmp_path / "b.nii.gz")
    followup_of(OLD + NEW[:1], tmp_path / "f1.nii.gz")
    followup_of(OLD + NEW, tmp_path / "f2.nii.gz", seed=2)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("baseline,followup,case\nb.nii.gz,f1.nii.gz,m6\nb.nii.gz,f2.nii.gz,m12\n")
    out = tmp_path / "out"
    assert main(["longitudinal", "--pairs-csv", str(pairs), "-o", str(out), *detector]) == 0
    assert sorted(p.name for p in (out / "baseline").glob("*_summary.json")) == ["b_summary.json"]
    detected_at = (out / "baseline" / "b_summary.json").stat().st_mtime_ns
    assert [json.loads((out / f"{c}_summary.json").read_text())["new_microbleeds"] for c in ("m6", "m12")] == [1, len(NEW)]
    assert capsys.readouterr().out.count("(done)") == 2
    # The second follow-up reused the baseline's detection; a rerun redoes nothing.
    written = {c: (out / f"{c}_summary.json").stat().st_mtime_ns for c in ("m6", "m12")}
    assert main(["longitudinal", "--pairs-csv", str(pairs), "-o", str(out), *detector]) == 0
    assert capsys.readouterr().out.count("(skipped)") == 2
    assert {c: (out / f"{c}_summary.json").stat().st_mtime_ns for c in ("m6", "m12")} == written
    assert (out / "baseline" / "b_summary.json").stat().st_mtime_ns == detected_at


@pytest.mark.parametrize("new, grade", [(0, "none"), (1, "mild"), (4, "mild"), (5, "moderate"), (9, "moderate"), (10, "severe"), (31, "severe")])
def test_aria_h_grade_follows_the_prescribing_information(new, grade):
    assert aria_h_grade(new) == grade


def test_scans_of_one_name_in_different_folders_are_kept_apart(tmp_path, detector):
    # A cohort laid out sub/ses/swi.nii.gz: every baseline has one file name, every follow-up another.
    for sub, old in (("s1", OLD), ("s2", OLD[:1])):
        (tmp_path / sub).mkdir()
        baseline_scan(tmp_path / sub / "m0.nii.gz", old)
        followup_of(OLD + NEW[:1], tmp_path / sub / "m6.nii.gz")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("baseline,followup,case\ns1/m0.nii.gz,s1/m6.nii.gz,s1\ns2/m0.nii.gz,s2/m6.nii.gz,s2\n")
    out = tmp_path / "out"
    assert main(["longitudinal", "--pairs-csv", str(pairs), "-o", str(out), *detector]) == 0
    s1, s2 = (json.loads((out / f"{c}_summary.json").read_text()) for c in ("s1", "s2"))
    assert (s1["new_microbleeds"], s2["new_microbleeds"]) == (1, 2)  # s2's baseline lacks one of OLD
    assert s1["baseline_case"] != s2["baseline_case"] and s1["followup_case"] != s2["followup_case"]
    assert len(list((out / "baseline").glob("*_summary.json"))) == 2


def test_a_pairs_row_without_a_scan_or_with_a_taken_case_is_refused_and_the_others_go_on(tmp_path, detector, capsys):
    baseline_scan(tmp_path / "b.nii.gz")
    followup_of(OLD, tmp_path / "f.nii.gz")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("baseline,followup,case\n,f.nii.gz,empty\nb.nii.gz,f.nii.gz,ok\nb.nii.gz,f.nii.gz,ok\n")
    assert main(["longitudinal", "--pairs-csv", str(pairs), "-o", str(tmp_path / "out"), *detector]) == 1
    err = capsys.readouterr().err
    assert "error: empty: row 2 of pairs.csv: the baseline cell is empty" in err
    assert "error: ok: row 4 of pairs.csv: case ok is also row 3's" in err
    assert not (tmp_path / "out" / "empty_summary.json").exists()
    assert json.loads((tmp_path / "out" / "ok_summary.json").read_text())["new_microbleeds"] == 0


def test_a_bleed_outside_the_baselines_field_of_view_is_not_called_new(tmp_path, detector):
    # The baseline stops at column 76: NEW[2] (column 86) was never imaged at baseline.
    write_volume(sitk.GetArrayFromImage(head(OLD, 0))[:, :, :76], GRID, tmp_path / "b.nii.gz")
    follow = followup_of(OLD + NEW, tmp_path / "f.nii.gz")
    assert main(["longitudinal", str(tmp_path / "b.nii.gz"), str(follow), "-o", str(tmp_path / "out"), *detector]) == 0
    summary = json.loads((tmp_path / "out" / "f_summary.json").read_text())
    assert (summary["new_microbleeds"], summary["persisting"], summary["not_compared"]) == (2, len(OLD), 1)
    outside = [r for r in rows(tmp_path / "out" / "f_changes.csv") if r["status"] == "not_compared"]
    assert len(outside) == 1 and nearest(expected_in_followup(NEW[2:]), outside[0]) < 1.5
    assert outside[0]["evidence"] == "outside the baseline's field of view"


def test_a_pair_is_redone_when_the_classifier_changes_at_the_same_path(tmp_path, detector, capsys):
    base = baseline_scan(tmp_path / "b.nii.gz")
    follow = followup_of(OLD + NEW[:1], tmp_path / "f.nii.gz")
    folder = tmp_path / "models"
    folder.mkdir()
    classifier = calibrated_copy(constant_classifier(folder / "c.safetensors", keep_at=0.5, favourite="microbleed"), review=0.5, count=0.8)
    args = ["longitudinal", str(base), str(follow), "-o", str(tmp_path / "out"), *detector[:2], "--candidate-model", str(classifier), "--device", "cpu"]
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "f_summary.json").read_text())["new_microbleeds"] == 1
    # Retrained in place: now no candidate reaches the count point (uniform P(microbleed) 0.4).
    calibrated_copy(constant_classifier(folder / "c.safetensors", keep_at=0.5), review=0.5, count=0.8)
    capsys.readouterr()
    assert main(args) == 0
    assert "(done)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "f_summary.json").read_text())
    assert (summary["new_microbleeds"], summary["persisting"]) == (0, 0)


def test_a_case_name_that_would_climb_out_of_the_output_folder_is_refused(tmp_path, detector, capsys):
    base = baseline_scan(tmp_path / "b.nii.gz")
    out = tmp_path / "deep" / "out"
    assert main(["longitudinal", str(base), str(base), "-o", str(out), "--case", "../escape", *detector]) == 1
    assert "error: ../escape: the case name holds a path separator" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escape_*"))


def test_changes_carry_each_lesions_mars_location(tmp_path, detector):
    """`mars_region`, `mars_structure`, `side` in the changes CSV: the follow-up's for what it
    shows, the baseline's for a resolved lesion (read from each scan's lesion CSV)."""
    base = baseline_scan(tmp_path / "b.nii.gz")
    follow = followup_of(OLD[:1], tmp_path / "f.nii.gz")
    out = tmp_path / "out"
    assert main(["longitudinal", str(base), str(follow), "-o", str(out), *detector]) == 0
    # Distinct locations in the two scans' CSVs (the phantoms are not heads: their own are unknown).
    for path, where in ((out / "baseline" / "b_lesions.csv", ("deep", "thalamus", "left")),
                        (out / "followup" / "f_lesions.csv", ("lobar", "frontal_cortex", "right"))):  # fmt: skip
        table = rows(path)
        assert table and all(r["mars_region"] == "unknown" for r in table)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows({**r, "mars_region": where[0], "mars_structure": where[1], "side": where[2]} for r in table)
    (out / "f_summary.json").unlink()  # the pair is redone; each scan's detection is not
    assert main(["longitudinal", str(base), str(follow), "-o", str(out), *detector]) == 0
    changes = {r["status"]: r for r in rows(out / "f_changes.csv")}
    assert set(changes) == {"persisting", "resolved"}
    assert [changes["persisting"][k] for k in ("mars_region", "mars_structure", "side")] == ["lobar", "frontal_cortex", "right"]
    assert [changes["resolved"][k] for k in ("mars_region", "mars_structure", "side")] == ["deep", "thalamus", "left"]
