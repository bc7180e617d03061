"""`cmbdetect longitudinal`: two scans of one head, detected by the hand-wired dark-spot network
(every dark sphere is a candidate, and a constant classifier keeps them all at the count point),
the follow-up made from the baseline's anatomy through a known rigid motion."""

from __future__ import annotations

import csv
import json
import time
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
    assert summary["registration"]["pose_ok"] and summary["seconds"]["pair"] > 0
    # The transform found (baseline -> follow-up), as a matrix: MOTION's inverse, to a fraction of a voxel.
    found = np.asarray(summary["registration"]["matrix_4x4"])
    corners = np.array([GRID.index_to_lps(np.array(c, float)) for c in ((0, 0, 0), (111, 0, 0), (0, 95, 15), (111, 95, 15))])
    truth = np.array([MOTION.GetInverse().TransformPoint(tuple(p)) for p in corners])
    assert np.abs(corners @ found[:3, :3].T + found[:3, 3] - truth).max() < 0.5
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


def test_no_regions_skips_each_scans_registration_to_the_template_and_redoes_a_pair_done_with_them(tmp_path, detector):
    base = baseline_scan(tmp_path / "b.nii.gz")
    out = tmp_path / "out"
    assert main(["longitudinal", str(base), str(base), "-o", str(out), "--case", "same", "--no-regions", *detector]) == 0
    summary = json.loads((out / "same_summary.json").read_text())
    scan = json.loads((out / "baseline" / "b_summary.json").read_text())
    assert scan["regions"] is None and summary["parameters"]["regions"] is False
    assert summary["new_microbleeds"] == 0 and summary["persisting"] == len(OLD)
    # With regions (the default) the pair's parameters differ: it is redone, its scan registered.
    assert main(["longitudinal", str(base), str(base), "-o", str(out), "--case", "same", *detector]) == 0
    scan = json.loads((out / "baseline" / "b_summary.json").read_text())
    assert scan["regions"] is not None and json.loads((out / "same_summary.json").read_text())["parameters"]["regions"] is True


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


def test_a_partial_slab_followup_of_a_whole_head_is_compared_not_refused(tmp_path, detector):
    """A follow-up that covers a third of the baseline's head (another protocol's slab): the QC
    judges the overlap on the slab's grid, where the baseline covers all of it. (It was refused
    before, as if it were another head: the slab covered under half of the baseline's head.)"""
    base = baseline_scan(tmp_path / "b.nii.gz")
    slab = Geometry(GRID.spacing, (GRID.origin[0], GRID.origin[1], GRID.origin[2] + 5 * GRID.spacing[2]))
    follow = followup_of(OLD + NEW[:1], tmp_path / "f.nii.gz", grid=slab, shape=(7, *SHAPE[1:]))
    assert main(["longitudinal", str(base), str(follow), "-o", str(tmp_path / "out"), *detector]) == 0
    summary = json.loads((tmp_path / "out" / "f_summary.json").read_text())
    assert summary["registration"]["correlation"] >= summary["registration"]["min_correlation"]
    assert (summary["new_microbleeds"], summary["persisting"], summary["resolved"], summary["aria_h"]) == (1, len(OLD), 0, "mild")
    new = [r for r in rows(tmp_path / "out" / "f_changes.csv") if r["status"] == "new"]
    assert len(new) == 1 and nearest(expected_in_followup(NEW[:1]), new[0]) < 1.5


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


def test_the_registration_qc_catches_a_pose_6_mm_off_along_the_slices(tmp_path):
    """The correlation of the whole overlap stays near 0.99 when the pose is 6 mm off along the
    slices of this phantom; the QC probes the pose's neighbours and refuses it."""
    from CMBDetectLib.io import read_volume
    from CMBDetectLib.registration.rigid import MIN_CORRELATION, pose_check, register_rigid

    baseline = read_volume(baseline_scan(tmp_path / "b.nii.gz"))
    followup = read_volume(followup_of(OLD + NEW, tmp_path / "f.nii.gz"))
    found = register_rigid(baseline, followup)
    assert found.qc()["pose_ok"]
    off = sitk.CompositeTransform(found.transform)
    off.AddTransform(sitk.TranslationTransform(3, (0.0, 0.0, 6.0)))  # applied first: 6 mm along S in the baseline
    check = pose_check(baseline, followup, off)
    assert check["correlation"] > MIN_CORRELATION  # what the old QC looked at, and passed
    assert not check["pose_ok"] and check["better_neighbour"] == "shift -2 mm along S"


def test_slicer_shows_the_pair_registered_side_by_side_with_the_new_bleeds_and_grade(tmp_path, detector, mrml):
    """The comparison's own outputs into slicer-core's real scene: the follow-up under the
    registration's transform, its new bleeds landing on the baseline's places, the grade."""
    import slicer.util
    from CMBDetectLib.io import read_volume
    from CMBDetectLib.mrml.longitudinal import GRADE_ATTRIBUTE, new_bleed_position_world, show_comparison

    base = baseline_scan(tmp_path / "b.nii.gz")
    follow = followup_of(OLD + NEW, tmp_path / "f.nii.gz")
    assert main(["longitudinal", str(base), str(follow), "-o", str(tmp_path / "out"), *detector]) == 0
    summary = json.loads((tmp_path / "out" / "f_summary.json").read_text())
    nodes = {}
    for role, path in (("baseline", base), ("followup", follow)):
        volume = read_volume(path)
        nodes[role] = slicer.util.addVolumeFromArray(volume.array, volume.geometry.ijk_to_ras(), role)
    comparison = show_comparison(nodes["baseline"], nodes["followup"], summary, rows(tmp_path / "out" / "f_changes.csv"))
    assert comparison.grade == "mild" == comparison.table.GetAttribute(GRADE_ATTRIBUTE)
    assert comparison.table.GetNumberOfRows() == len(OLD) + len(NEW)
    assert nodes["followup"].GetParentTransformNode() is comparison.transform
    # Each new bleed, shown in the baseline's frame, lies where the baseline's grid had it.
    expected = np.array([GRID.index_to_ras(np.array(c[::-1], float)) for c, _ in NEW])
    assert comparison.new_bleeds.GetNumberOfControlPoints() == len(NEW)
    for index in range(len(NEW)):
        assert np.min(np.linalg.norm(expected - new_bleed_position_world(comparison, index), axis=1)) < 1.5
    layout = mrml.scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    shown = {}
    for i in range(mrml.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = mrml.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        shown[composite.GetLayoutName()] = (composite.GetBackgroundVolumeID(), composite.GetLinkedControl())
    assert shown["Red"] == (nodes["baseline"].GetID(), 1) and shown["Yellow"] == (nodes["followup"].GetID(), 1)


# --- "Compare with baseline" in the CMBDetect module: the comparison in a child process ------------

JOB_TIMEOUT_S = 300  # generous: the machine is shared; a hang fails instead of blocking


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory) -> str:
    """The detector fixture's pair of models as the module names one: a detector whose card names its classifier."""
    folder = tmp_path_factory.mktemp("two-stage")
    classifier = calibrated_copy(constant_classifier(folder / "c.safetensors", keep_at=0.5, favourite="microbleed"), review=0.5, count=0.8)
    return str(save_dark_spot_model(folder / "dark.safetensors", candidate_classifier=classifier))


def pair_nodes(base: Path, follow: Path) -> dict:
    import slicer.util
    from CMBDetectLib.io import read_volume

    nodes = {}
    for role, path in (("baseline", base), ("followup", follow)):
        volume = read_volume(path)
        nodes[role] = slicer.util.addVolumeFromArray(volume.array, volume.geometry.ijk_to_ras(), f"{role} scan")
    return nodes


def test_slicer_compare_with_baseline_runs_in_a_child_process_and_shows_grade_and_new_bleeds(tmp_path, two_stage, mrml):
    """The module's "Compare with baseline": the worker calls what `cmbdetect longitudinal` calls;
    the scene is untouched until finish(), which shows the grade text, one row per change, and a
    click on a new bleed's row jumps to where that lesion lies in the follow-up."""
    from CMBDetectLib.detection.runner import SUCCEEDED
    from CMBDetectLib.longitudinal.pairs import STAGES
    from CMBDetectLib.mrml.job import ComparisonJob, InputGone
    from CMBDetectLib.mrml.longitudinal import (
        change_position_world,
        comparison_summary,
        comparison_text,
        followup_to_baseline_ras,
        new_bleed_position_world,
    )

    nodes = pair_nodes(baseline_scan(tmp_path / "b.nii.gz"), followup_of(OLD + NEW, tmp_path / "f.nii.gz"))
    before = mrml.scene.GetNumberOfNodes()
    job = ComparisonJob(nodes["baseline"], nodes["followup"], tmp_path / "work", model=two_stage, operating_point="count")
    job.start()
    fractions = []
    while not job.run.finished:
        fractions += [e.fraction for e in job.poll() if e.kind == "PROGRESS"]
        assert mrml.scene.GetNumberOfNodes() == before  # nothing written while the child runs
        time.sleep(0.05)
    assert job.run.state == SUCCEEDED, job.run.error + "\n" + "\n".join(job.run.log)
    assert job.run.stages_seen == list(STAGES)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and np.all(np.diff(fractions) >= 0)
    summary, changes = job.outputs()
    assert (summary["new_microbleeds"], summary["persisting"], summary["aria_h"], summary["operating_point"]) == (len(NEW), len(OLD), "mild", "count")

    comparison = job.finish()
    assert nodes["followup"].GetParentTransformNode() is comparison.transform
    assert comparison.table.GetName() == "followup scan changes" and comparison.table.GetNumberOfRows() == len(changes)
    shown = comparison_summary(comparison.table)
    text = comparison_text(shown)
    assert "ARIA-H (microhaemorrhage): mild" in text and f"{len(NEW)} new microbleed(s)" in text
    assert "Superficial siderosis is not assessed" in text and "Research software" in text and "never a treatment decision" in text
    # The changes table's rows, by their id; a new bleed's row jumps to that lesion: its follow-up
    # position (the CSV's) shown through the registration, which is where its point lies.
    to_baseline = followup_to_baseline_ras(summary)
    new_rows = [n + 1 for n, r in enumerate(changes) if r["status"] == "new"]
    assert len(new_rows) == len(NEW)
    expected = np.array([GRID.index_to_ras(np.array(c[::-1], float)) for c, _ in NEW])
    for index, row_id in enumerate(new_rows):
        row = changes[row_id - 1]
        jump = change_position_world(comparison.table, row_id)
        followup_ras = np.array([float(row[k]) for k in ("centroid_r", "centroid_a", "centroid_s")])
        np.testing.assert_allclose(jump, (to_baseline @ np.append(followup_ras, 1.0))[:3], atol=1e-6)
        np.testing.assert_allclose(jump, new_bleed_position_world(comparison, index), atol=1e-6)
        assert np.min(np.linalg.norm(expected - jump, axis=1)) < 1.5  # on the baseline's place of that bleed
    assert change_position_world(comparison.table, len(changes) + 1) is None
    mrml.scene.RemoveNode(nodes["baseline"])  # an input gone before finish(): nothing more is shown
    with pytest.raises(InputGone):
        job.finish()
    job.cleanup()
    assert not (tmp_path / "work").exists()


def test_slicer_compare_refuses_a_followup_that_does_not_register_and_leaves_the_scene(tmp_path, two_stage, mrml):
    from CMBDetectLib.detection.runner import FAILED
    from CMBDetectLib.mrml.job import ComparisonJob

    noise = np.abs(np.random.default_rng(3).normal(200, 120, SHAPE)).astype(np.float32)
    write_volume(noise, GRID, tmp_path / "noise.nii.gz")
    nodes = pair_nodes(baseline_scan(tmp_path / "b.nii.gz"), tmp_path / "noise.nii.gz")
    before = mrml.scene.GetNumberOfNodes()
    job = ComparisonJob(nodes["baseline"], nodes["followup"], tmp_path / "work", model=two_stage)
    job.start()
    state = job.wait(JOB_TIMEOUT_S)
    log = job.run.error + "\n" + "\n".join(job.run.log)
    assert state == FAILED, log
    # Refused by the correlation after registration, or because the optimiser could not proceed at all.
    assert "not graded" in job.run.error and ("does not register to the baseline" in job.run.error or "cannot be registered" in job.run.error), log
    assert "Traceback" not in log  # a refusal is a message, not a crash
    with pytest.raises(RuntimeError, match="not graded"):
        job.finish()
    assert mrml.scene.GetNumberOfNodes() == before and nodes["followup"].GetParentTransformNode() is None
    job.cleanup()


def test_slicer_compare_cancel_kills_the_worker_and_a_scan_is_never_its_own_baseline(tmp_path, two_stage, mrml):
    import os

    from CMBDetectLib.detection.runner import CANCELLED
    from CMBDetectLib.detection.worker import HOLD_ENV
    from CMBDetectLib.mrml.job import ComparisonJob

    nodes = pair_nodes(baseline_scan(tmp_path / "b.nii.gz"), followup_of(OLD + NEW, tmp_path / "f.nii.gz"))
    with pytest.raises(ValueError, match="both the baseline and the follow-up"):
        ComparisonJob(nodes["followup"], nodes["followup"], tmp_path / "same")
    before = mrml.scene.GetNumberOfNodes()
    job = ComparisonJob(nodes["baseline"], nodes["followup"], tmp_path / "work", model=two_stage,
                        env={**os.environ, HOLD_ENV: "registration"})  # fmt: skip
    job.start()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while job.run.stage != "registration" and not job.run.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.run.stage == "registration", job.run.error + "\n" + "\n".join(job.run.log)
    pid = job.run.pid
    job.cancel()
    assert job.run.state == CANCELLED and not job.run.alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (tmp_path / "work" / "out" / "followup_summary.json").exists()
    assert mrml.scene.GetNumberOfNodes() == before
    job.cleanup()


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
