"""`cmbdetect synth --pairs N`: baseline / follow-up pairs of one subject with the truth of what
is new, how the head moved, and the grade; read back from the files, as a user would."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from CMBDetectLib.cli import main
from CMBDetectLib.io import read_volume, to_sitk
from CMBDetectLib.longitudinal.grade import aria_h_grade
from CMBDetectLib.longitudinal.pairs import read_pairs_csv

N_PAIRS = 8
SMALL = ["--matrix", "80x80", "--slices", "20", "--space", "p_oblique=0"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    assert main(["synth", "--pairs", str(N_PAIRS), "--seed", "3", "--out", str(out), "--quiet", *SMALL]) == 0
    return out


def truths(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "truth").glob("*.json"))]


def centroids_lps(path: Path) -> dict[int, np.ndarray]:
    volume = read_volume(path)
    ids = [int(v) for v in np.unique(volume.array) if v]
    kji = ndimage.center_of_mass(np.ones_like(volume.array), volume.array, ids)
    return {i: volume.geometry.index_to_lps(np.asarray(c)[::-1]) for i, c in zip(ids, kji)}


def to_baseline(truth: dict, lps: np.ndarray) -> np.ndarray:
    m = np.linalg.inv(np.asarray(truth["motion"]["matrix_4x4"]))
    return m[:3, :3] @ lps + m[:3, 3]


def test_the_pairs_list_is_usable_by_longitudinal_as_is(pairs):
    listed = read_pairs_csv(pairs / "pairs.csv")
    assert len(listed) == N_PAIRS and all(not p.problem for p in listed)
    assert all(p.baseline.is_file() and p.followup.is_file() for p in listed)
    rows = list(csv.DictReader(open(pairs / "pairs.csv")))
    assert {r["case"] for r in rows} == {t["case"] for t in truths(pairs)}
    assert {r["protocol"] for r in rows} == {"same", "other"}  # mixed: every other follow-up redrawn


def test_grades_cover_all_four_classes_and_follow_the_new_count(pairs):
    found = truths(pairs)
    assert {t["aria_h"] for t in found} == {"none", "mild", "moderate", "severe"}
    for t in found:
        assert t["aria_h"] == aria_h_grade(t["new_microbleeds"])
        assert t["new_microbleeds"] == sum(x["status"] == "new" for x in t["lesions"]) <= 15


def labels_near(volume, lps: np.ndarray, radius_mm: float) -> set[int]:
    """The label values of `volume` within `radius_mm` of an LPS point."""
    points = volume.geometry.index_to_lps(np.argwhere(volume.array > 0)[:, ::-1])
    values = volume.array[volume.array > 0]
    return {int(v) for v in values[np.linalg.norm(points - lps, axis=1) <= radius_mm]}


def test_new_bleeds_exist_only_in_the_followup_and_persisting_ones_in_both(pairs):
    checked = {"new": 0, "persisting": 0}
    for t in truths(pairs):
        baseline_labels = read_volume(pairs / t["baseline_labels"])
        followup_labels = read_volume(pairs / t["followup_labels"]).array
        sources = {x["label"]: np.asarray(x["centre_lps"]) for x in t["baseline_lesions"]}
        to_index = np.linalg.inv(baseline_labels.geometry.ijk_to_lps())
        for lesion in t["lesions"]:
            assert (followup_labels == lesion["label"]).any()
            at_baseline = to_baseline(t, np.asarray(lesion["centre_lps"], float))
            distances = {label: float(np.linalg.norm(c - at_baseline)) for label, c in sources.items()}
            if lesion["status"] == "new":
                # Inside the baseline's view; no bleed there at baseline, and nothing labelled.
                ijk = to_index[:3, :3] @ at_baseline + to_index[:3, 3]
                assert np.all(ijk >= 0) and np.all(ijk <= np.asarray(baseline_labels.array.shape[::-1]) - 1)
                assert min(distances.values(), default=np.inf) > 2.0
                assert not labels_near(baseline_labels, at_baseline, min(2.0, lesion["apparent_diameter_mm"] / 2))
            elif lesion["baseline_label"] is not None:
                # The baseline's bleed, moved with the head; outlined there too.
                assert distances[lesion["baseline_label"]] < 0.01
                assert lesion["baseline_label"] in labels_near(baseline_labels, at_baseline, 3 * max(baseline_labels.geometry.spacing))
            checked[lesion["status"]] += 1
    assert checked["new"] >= 10 and checked["persisting"] >= 10


def test_the_recorded_motion_is_the_one_applied(pairs):
    for t in truths(pairs)[:4]:
        m = np.asarray(t["motion"]["matrix_4x4"])
        assert np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-6)  # rigid
        assert t["motion"]["rotation_deg"] <= 10.0 and t["motion"]["shift_norm_mm"] <= 10.0
        base, follow = centroids_lps(pairs / t["baseline_labels"]), centroids_lps(pairs / t["followup_labels"])
        spacing = max(read_volume(pairs / t["followup_labels"]).geometry.spacing)
        # A bleed's outline centre at baseline, mapped through the motion, lands on its follow-up
        # outline's centre, up to the outlines' voxels (1-4 voxels of ~2.7 mm on these small grids).
        errors = [np.linalg.norm(m[:3, :3] @ base[x["baseline_label"]] + m[:3, 3] - follow[x["label"]])
                  for x in t["lesions"] if x["baseline_label"] is not None]
        assert errors and np.median(errors) < 0.8 * spacing and max(errors) < 1.5 * spacing


def test_the_anatomy_moves_with_the_recorded_motion(pairs):
    """The follow-up pulled back through the recorded motion lies on the baseline: better than
    without the motion, and better than the motion shifted by 2 mm along any axis."""
    t = truths(pairs)[4]  # same protocol, a 50 mm slab (a 20 mm one overlaps too little when tilted)
    assert t["protocol"] == "same"
    base, follow = (to_sitk(read_volume(pairs / t[k]).array, read_volume(pairs / t[k]).geometry) for k in ("baseline", "followup"))
    m = np.asarray(t["motion"]["matrix_4x4"])

    def correlation(matrix: np.ndarray) -> float:
        transform = sitk.AffineTransform(matrix[:3, :3].ravel().tolist(), matrix[:3, 3].tolist())
        a = sitk.GetArrayFromImage(base)
        b = sitk.GetArrayFromImage(sitk.Resample(follow, base, transform, sitk.sitkLinear, np.nan, sitk.sitkFloat32))
        ok = np.isfinite(b) & (a > np.percentile(a, 30))
        return float(np.corrcoef(a[ok], b[ok])[0, 1])

    at_truth = correlation(m)
    assert at_truth > correlation(np.eye(4)) + 0.1
    for axis in range(3):
        for step in (-2.0, 2.0):
            shifted = m.copy()
            shifted[axis, 3] += step
            assert at_truth > correlation(shifted)


def test_pairs_refuse_options_of_single_cases(tmp_path, capsys):
    assert main(["synth", "--pairs", "2", "--controls", "1", "--out", str(tmp_path)]) == 2
    assert "--pairs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def write_longitudinal_output(out: Path, truth: dict, calls: list[list[float]], grade: str, matrix) -> None:
    """A pair's results in the layout `cmbdetect longitudinal` writes (summary and changes CSV)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{truth['case']}_changes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["status", "centroid_l", "centroid_p", "centroid_s_lps"])
        writer.writeheader()
        for status, lps in calls:
            writer.writerow({"status": status, "centroid_l": lps[0], "centroid_p": lps[1], "centroid_s_lps": lps[2]})
    summary = {"aria_h": grade, "files": {"changes_csv": f"{truth['case']}_changes.csv"},
               "registration": {"matrix_4x4": np.asarray(matrix).tolist()}, "seconds": {"pair": 4.0}}
    (out / f"{truth['case']}_summary.json").write_text(json.dumps(summary))


def test_evaluate_pairs_counts_hits_false_new_bleeds_grades_and_registration_error(pairs, tmp_path, capsys):
    found = truths(pairs)
    out = tmp_path / "changes"
    shifted = np.eye(4)
    shifted[0, 3] = 1.5  # a registration 1.5 mm off along L everywhere
    for k, t in enumerate(found[:-1]):  # the last pair was refused: no summary
        new = [x["centre_lps"] for x in t["lesions"] if x["status"] == "new"]
        persisting = [x["centre_lps"] for x in t["lesions"] if x["status"] == "persisting"]
        calls = [("new", list(np.asarray(c) + [1.0, 0.0, 0.0])) for c in new[1:]]  # the first new bleed missed
        calls += [("new", persisting[0])] if persisting and k == 0 else []  # a persisting bleed called new
        calls += [("new", [500.0, 500.0, 500.0])] if k == 1 else []  # a call on nothing
        calls += [("persisting", c) for c in persisting]
        matrix = np.asarray(t["motion"]["matrix_4x4"]) @ shifted if k == 2 else t["motion"]["matrix_4x4"]
        write_longitudinal_output(out, t, calls, aria_h_grade(max(len(new) - 1, 0)), matrix)
    assert main(["evaluate-pairs", "--pred", str(out), "--truth", str(pairs), "--bootstrap", "200"]) == 0
    result = json.loads((out / "evaluation_pairs.json").read_text())
    true_new = sum(t["new_microbleeds"] for t in found)
    missed = sum(1 for t in found[:-1] if t["new_microbleeds"]) + found[-1]["new_microbleeds"]
    assert result["new_bleeds"]["true"] == true_new and result["new_bleeds"]["found"] == true_new - missed
    assert result["new_bleeds"]["sensitivity"] == round((true_new - missed) / true_new, 4)
    ci = result["new_bleeds"]["intervals"]["sensitivity"]
    assert ci["low"] <= result["new_bleeds"]["sensitivity"] <= ci["high"]
    assert result["new_bleeds"]["false_new"] == 2 and result["new_bleeds"]["false_new_on_persisting_bleeds"] == 1
    assert result["new_bleeds"]["false_new_per_pair"] == round(2 / N_PAIRS, 4)
    assert result["not_graded"] == [found[-1]["case"]] and result["graded"] == N_PAIRS - 1
    right = sum(1 for t in found[:-1] if aria_h_grade(max(t["new_microbleeds"] - 1, 0)) == t["aria_h"])
    assert result["grade"]["exact"] == round(right / N_PAIRS, 4) and result["grade"]["kappa_weights"] == "linear"
    assert -1.0 <= result["grade"]["weighted_kappa"] <= 1.0
    assert result["registration_error_mm"]["max"] == pytest.approx(1.5, abs=1e-3)
    assert result["seconds_per_pair"]["median"] == 4.0
    printed = capsys.readouterr().out
    assert "new-bleed sensitivity" in printed and "grade kappa (linear)" in printed


def test_evaluate_pairs_refuses_a_folder_that_is_not_a_pairs_set(tmp_path, capsys):
    (tmp_path / "changes").mkdir()
    assert main(["evaluate-pairs", "--pred", str(tmp_path / "changes"), "--truth", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "changes" / "evaluation_pairs.json").exists()
