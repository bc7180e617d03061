"""Stage 2's calibrated P(microbleed), its named operating points, one detection per bleed, and
the phase sign read from the image itself (issue 21)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from CMBDetectLib.commands.detect import main as detect_main
from CMBDetectLib.detection.candidates import (
    Calibration,
    StageSettings,
    find_candidates,
    load_classifier_file,
    run_candidate_stage,
)
from CMBDetectLib.io import write_volume
from CMBDetectLib.training.calibration import (
    CaseCandidates,
    choose_operating_points,
    expected_calibration_error,
    fit_calibration,
    fit_mode,
)
from handmade import constant_classifier, oblique_geometry, phantom, save_dark_spot_model


def calibrated_copy(path: Path, review: float, count: float, default: str = "count", bridge: int = 1) -> Path:
    """The classifier at `path` with an identity calibration and the given operating points."""
    card = json.loads(path.with_suffix(".json").read_text())
    identity = {"x": [0.0, 1.0], "y": [0.0, 1.0]}
    card["calibration"] = {"no_phase": identity, "phase": identity}
    card["operating_points"] = {"default": default, "review": {"no_phase": review, "phase": review}, "count": {"no_phase": count, "phase": count}}
    card["stage"] = {**card.get("stage", {}), "bridge_slices": bridge}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


@pytest.fixture
def dark_spot_model(tmp_path) -> str:
    return str(save_dark_spot_model(tmp_path / "dark.safetensors"))


# ------------------------------------------------------------------ operating points


def test_operating_point_changes_the_outputs_as_the_card_says(tmp_path, dark_spot_model):
    array, geometry, _ = phantom()
    write_volume(array, geometry, tmp_path / "in" / "obl.nii.gz")
    # P(microbleed) of the constant classifier favouring microbleed, calcification folded in (no phase): (e^3 + 1) / (e^3 + 5) = 0.84.
    classifier = calibrated_copy(constant_classifier(tmp_path / "c.safetensors", keep_at=0.5, favourite="microbleed"), review=0.5, count=0.9)
    common = [str(tmp_path / "in"), "--model", dark_spot_model, "--candidate-model", str(classifier), "-q"]
    assert detect_main([*common, "-o", str(tmp_path / "review"), "--operating-point", "review"]) == 0
    assert detect_main([*common, "-o", str(tmp_path / "count"), "--operating-point", "count"]) == 0
    assert detect_main([*common, "-o", str(tmp_path / "default")]) == 0
    review = list(csv.DictReader(open(tmp_path / "review" / "obl_lesions.csv")))
    count = list(csv.DictReader(open(tmp_path / "count" / "obl_lesions.csv")))
    assert len(review) == 2 and count == []
    rejected = list(csv.DictReader(open(tmp_path / "count" / "obl_rejected.csv")))
    assert len(rejected) == 2 and all(abs(float(r["p_microbleed"]) - (np.exp(3) + 1) / (np.exp(3) + 5)) < 1e-3 for r in rejected)
    for name, keep_at in (("review", 0.5), ("count", 0.9), ("default", 0.9)):
        stage = json.loads((tmp_path / name / "obl_summary.json").read_text())["candidate_stage"]
        assert stage["keep_at"] == keep_at and stage["calibrated"] is True
        assert stage["operating_point"] == ("count" if name == "default" else name)
    # Calibrated P: definite from 0.8 on.
    assert all(r["certainty"] == ("definite" if float(r["p_microbleed"]) >= 0.8 else "possible") for r in review)


def test_operating_point_is_refused_with_the_single_stage_pipeline(tmp_path, dark_spot_model, capsys):
    array, geometry, _ = phantom(shape=(6, 80, 90), spheres_mm=[((3, 40, 45), 4.0)])
    write_volume(array, geometry, tmp_path / "in.nii.gz")
    code = detect_main([str(tmp_path / "in.nii.gz"), "-o", str(tmp_path / "out"), "--model", dark_spot_model, "--single-stage", "--operating-point", "count", "-q"])
    assert code == 2
    assert "--single-stage" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_uncalibrated_classifier_refuses_a_named_operating_point(tmp_path, dark_spot_model, capsys):
    array, geometry, _ = phantom(shape=(6, 80, 90), spheres_mm=[((3, 40, 45), 4.0)])
    write_volume(array, geometry, tmp_path / "in.nii.gz")
    plain = constant_classifier(tmp_path / "c.safetensors", keep_at=0.5)
    code = detect_main([str(tmp_path / "in.nii.gz"), "-o", str(tmp_path / "out"), "--model", dark_spot_model, "--candidate-model", str(plain), "--operating-point", "review", "-q"])
    assert code == 2
    assert "no operating point 'review'" in capsys.readouterr().err


# ------------------------------------------------------------------ calibration


def _cases(rng, n_cases=20, per_case=30):
    """Candidates whose true share rises with P but is far below it: an overconfident classifier."""
    cases = []
    for c in range(n_cases):
        p = rng.uniform(0, 1, per_case).astype(np.float32)
        is_true = rng.uniform(0, 1, per_case) < p**4
        coverage = np.diag(is_true.astype(float))[:, is_true] * 0.9
        cases.append(CaseCandidates(f"c{c}", p, is_true, coverage, np.zeros(int(is_true.sum()), bool)))
    return cases


def test_isotonic_calibration_is_monotone_and_lowers_the_calibration_error():
    cases = _cases(np.random.default_rng(0))
    calibration = fit_calibration(cases)
    assert calibration.x[0] == 0.0 and calibration.x[-1] == 1.0
    assert all(b >= a for a, b in zip(calibration.y, calibration.y[1:]))
    p = np.concatenate([c.p_stage for c in cases])
    y = np.concatenate([c.is_true for c in cases])
    before, after = expected_calibration_error(p, y), expected_calibration_error(calibration(p), y)
    assert before > 0.15 and after < 0.05  # overconfident by construction; isotonic fixes it in-sample
    fit = fit_mode(cases)
    assert fit.ece_after < fit.ece_before
    from CMBDetectLib.training.calibration import describe_fits

    lines = describe_fits({"no_phase": fit}, "tuning set")
    assert lines[0].startswith("no_phase: 600 candidates") and [l.split(":")[0].strip() for l in lines[1:]] == ["review", "count"]


def test_operating_points_meet_their_rules_on_the_tuning_set():
    cases = _cases(np.random.default_rng(1))
    calibration = fit_calibration(cases)
    points = choose_operating_points(cases, calibration)
    review, count = points["review"], points["count"]
    assert review.threshold < count.threshold
    assert count.fp_per_scan <= 0.5
    assert review.sensitivity_small >= 1.0 - 0.02  # every true candidate is within reach at P >= 0
    assert count.precision >= 0.85 or count.fp_per_scan <= 0.5


def test_calibration_knots_are_checked():
    with pytest.raises(ValueError):
        Calibration.from_dict({"x": [0.0, 0.5, 0.4], "y": [0, 0.5, 1]})
    with pytest.raises(ValueError):
        Calibration.from_dict({"x": [0.0, 1.0], "y": [0.6, 0.5]})
    assert np.allclose(Calibration.from_dict({"x": [0, 0.5, 1], "y": [0, 0.1, 1]})(np.array([0.25, 0.75])), [0.05, 0.55])


# ------------------------------------------------------------------ one detection per bleed


def split_bleed_probability(shape=(14, 90, 100), gap_slice=7):
    """A 6-slice tall bleed whose probability dips below the candidate threshold on one slice."""
    probability = np.zeros(shape, np.float32)
    kk, jj, ii = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    inside = ((kk - gap_slice) / 3.2) ** 2 + ((jj - 45) / 5.0) ** 2 + ((ii - 50) / 5.0) ** 2 <= 1.0
    probability[inside] = 0.9
    probability[gap_slice][inside[gap_slice]] = 0.05
    return probability


def test_a_bleed_whose_probability_dips_on_one_slice_is_one_candidate():
    geometry = oblique_geometry(spacing=(0.5, 0.5, 1.0))
    probability = split_bleed_probability()
    assert len(find_candidates(probability, geometry, StageSettings(bridge_slices=0))[1]) == 2
    labels, cands = find_candidates(probability, geometry, StageSettings(bridge_slices=1))
    assert len(cands) == 1
    assert (labels > 0).sum() >= (probability >= 0.15).sum()


def test_a_split_bleed_becomes_one_detection_end_to_end(tmp_path):
    geometry = oblique_geometry(spacing=(0.5, 0.5, 1.0))
    probability = split_bleed_probability()
    image = np.where(probability > 0.5, 40.0, 420.0).astype(np.float32)
    classifier = load_classifier_file(calibrated_copy(constant_classifier(tmp_path / "c.safetensors", keep_at=0.5, favourite="microbleed"), 0.5, 0.5))
    stage = run_candidate_stage(image, probability, geometry, classifier)
    assert stage.n_candidates == 1 and len(stage.lesions) == 1


# ------------------------------------------------------------------ the phase's sign


def _phantom_with_phase():
    from test_candidates import dipole_phase

    geometry = oblique_geometry()
    bleeds = [(6, 60, 70), (6, 130, 160), (5, 100, 110), (7, 70, 170)]
    array, _, _ = phantom(geometry=geometry, spheres_mm=[(c, 4.0) for c in bleeds], seed=5)
    phase = sum(dipole_phase(array.shape, geometry, c, 2.0, +0.4) for c in bleeds)
    return array, geometry, phase.astype(np.float32), bleeds


@pytest.fixture(scope="module")
def shipped_classifier():
    import handmade

    return handmade.shipped_classifier()


def test_a_flipped_phase_gives_the_same_detections_under_auto(shipped_classifier):
    from handmade import dark_spot_probability

    array, geometry, phase, bleeds = _phantom_with_phase()
    probability = dark_spot_probability(array)
    as_given = run_candidate_stage(array, probability, geometry, shipped_classifier, phase=phase, phase_sign="auto")
    flipped = run_candidate_stage(array, probability, geometry, shipped_classifier, phase=-phase, phase_sign="auto")
    assert as_given.phase_sign.used == "kept" and flipped.phase_sign.used == "flipped"
    assert as_given.phase_sign.evidence == pytest.approx(-flipped.phase_sign.evidence, abs=1e-5)
    assert len(as_given.lesions) == len(bleeds)
    assert [c.centroid_ijk for c in as_given.lesions] == [c.centroid_ijk for c in flipped.lesions]
    assert [c.p_microbleed for c in as_given.lesions] == pytest.approx([c.p_microbleed for c in flipped.lesions], abs=1e-5)
    # Read in the wrong sign on purpose, the bleeds turn into calcifications: what auto prevents.
    wrong = run_candidate_stage(array, probability, geometry, shipped_classifier, phase=-phase, phase_sign="keep")
    assert len(wrong.lesions) < len(bleeds)
    assert sum(c.reason == "calcification" for c in wrong.rejected) >= 1


def test_weak_phase_evidence_falls_back_to_the_no_phase_rule(tmp_path):
    geometry = oblique_geometry(spacing=(0.5, 0.5, 1.0))
    probability = split_bleed_probability()
    image = np.where(probability > 0.5, 40.0, 420.0).astype(np.float32)
    classifier = load_classifier_file(constant_classifier(tmp_path / "c.safetensors", keep_at=0.5, favourite="calcification"))
    stage = run_candidate_stage(image, probability, geometry, classifier, phase=np.zeros_like(image), phase_sign="auto")
    # A constant classifier gives no evidence: the phase is ignored and calcification counts as microbleed.
    assert stage.phase_sign.used == "ignored" and not stage.phase_used
    assert len(stage.lesions) == stage.n_candidates


# ------------------------------------------------------------------ scoring both points from one run


def test_keep_p_drops_the_lesions_below_the_point():
    from CMBDetectLib.evaluation.evaluate import keep_probable

    prediction = np.zeros((5, 20, 20), np.uint16)
    prediction[1:3, 2:5, 2:5] = 1
    prediction[1:3, 10:13, 10:13] = 2
    probability = np.where(prediction == 1, 0.95, np.where(prediction == 2, 0.6, 0.01)).astype(np.float32)
    kept = keep_probable(prediction, probability, 0.9)
    assert set(np.unique(kept)) == {0, 1} and (kept == 1).sum() == (prediction == 1).sum()
    assert (keep_probable(prediction, probability, 0.5) == prediction).all()


def test_count_icc_is_one_for_agreement_and_lower_for_a_bias():
    from CMBDetectLib.evaluation.evaluate import count_icc

    truth = [0, 1, 3, 5, 8, 2, 0, 4]
    assert count_icc(truth, truth) == pytest.approx(1.0)
    biased = count_icc(truth, [t + 5 for t in truth])
    assert biased < 0.6  # absolute agreement: a constant excess of 5 per scan is disagreement
    assert count_icc(truth, [t + 1 for t in truth]) > biased
