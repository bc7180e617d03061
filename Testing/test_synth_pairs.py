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
