"""The context a reader uses and the classifier's patch lacks (issue 21, item 5): continuity along a
vein, multi-scale shape, position; the logistic context model, its fit and its place in stage 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CMBDetectLib.detection.candidates import load_classifier_file, run_candidate_stage
from CMBDetectLib.detection.context import FEATURES, ContextModel, context_features
from CMBDetectLib.detection.lesions import extract_lesions
from CMBDetectLib.io import Geometry
from CMBDetectLib.training.calibration import CaseCandidates, calibrated_card, fit_mode
from handmade import constant_classifier, oblique_geometry

SPHERE_LPS = np.array([-14.0, 0.0, 0.0])
TUBE_POINT_LPS = np.array([16.0, 2.0, 0.0])
TUBE_AXIS = np.array([0.3, 0.2, 1.0]) / np.linalg.norm([0.3, 0.2, 1.0])  # a vein running mostly along S


def head_with_bleed_and_vein(geometry: Geometry, shape: tuple[int, int, int], seed: int = 0):
    """(magnitude, candidate map) drawn in patient space on any grid: a tissue ellipsoid with a
    4 mm dark sphere (a bleed) and a 2 mm dark tube through the whole head (a vein); the
    candidate map marks the sphere and a 5 mm stretch of the tube, as a U-Net would."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    lps = geometry.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)).reshape(*shape, 3)
    head = ((lps[..., 0] / 42.0) ** 2 + (lps[..., 1] / 42.0) ** 2 + (lps[..., 2] / 60.0) ** 2) < 1.0
    sphere = np.linalg.norm(lps - SPHERE_LPS, axis=-1) < 2.0
    along = (lps - TUBE_POINT_LPS) @ TUBE_AXIS
    across = np.linalg.norm(lps - TUBE_POINT_LPS - along[..., None] * TUBE_AXIS, axis=-1)
    tube = (across < 1.0) & head
    rng = np.random.default_rng(seed)
    image = np.where(head, 400.0, 5.0) + rng.normal(0.0, 8.0, shape)
    image[sphere] = 80.0
    image[tube] = 120.0
    candidates = (sphere | (tube & (np.abs(along) < 2.5))).astype(np.float32)
    return np.abs(image).astype(np.float32), candidates


def features_of(geometry: Geometry, shape: tuple[int, int, int]) -> dict[str, dict[str, float]]:
    image, marked = head_with_bleed_and_vein(geometry, shape)
    labels, cands = extract_lesions(marked, geometry, 0.5, 1.0, 10.0)
    assert len(cands) == 2
    f = context_features(image / 400.0, geometry, labels, cands, np.full((2, 6), 1 / 6))
    which = {("bleed" if c.centroid_lps[0] < 0 else "vein"): row for c, row in zip(cands, f)}
    return {name: dict(zip(FEATURES, map(float, row))) for name, row in which.items()}


def centred(geometry: Geometry, shape: tuple[int, int, int]) -> tuple[Geometry, tuple[int, int, int]]:
    """The grid moved so that its centre lies at the patient origin, where the head is drawn."""
    half = geometry.direction_matrix @ ((np.array(shape[::-1]) - 1) / 2.0 * np.array(geometry.spacing))
    return Geometry(geometry.spacing, tuple(-half), geometry.direction), shape


AXIAL = centred(Geometry(spacing=(0.8, 0.8, 0.8), origin=(0.0, 0.0, 0.0)), (150, 120, 120))
OBLIQUE = centred(oblique_geometry(spacing=(0.6, 0.7, 2.0)), (64, 170, 170))


def test_a_vein_runs_on_beyond_the_patch_and_a_bleed_stops_at_its_rim():
    f = features_of(*AXIAL)
    bleed, vein = f["bleed"], f["vein"]
    assert vein["tube_leaves_patch"] == 1.0 and bleed["tube_leaves_patch"] == 0.0
    assert vein["tube_reach_mm"] > 14.0 and bleed["tube_reach_mm"] < 4.0
    assert vein["tube_elongation"] > bleed["tube_elongation"] + 1.0
    assert bleed["blob_2mm"] > 0.5 and vein["blob_2mm"] < 0.2  # blob: three eigenvalues alike; tube: one near 0
    assert bleed["contrast"] > 0.6 and vein["contrast"] > 0.5
    assert abs(bleed["midline_mm"] - 14.0) < 2.5 and abs(vein["midline_mm"] - 16.0) < 2.5
    assert 25.0 < bleed["depth_mm"] < 31.0  # 42 mm half-axis, 14 mm from the centre: 28 mm deep


def test_context_is_measured_in_patient_space_whatever_the_grid():
    """The same head on an oblique grid of 2 mm slices reads as on an isotropic axial one."""
    axial, oblique = features_of(*AXIAL), features_of(*OBLIQUE)
    for name in ("bleed", "vein"):
        a, o = axial[name], oblique[name]
        assert a["tube_leaves_patch"] == o["tube_leaves_patch"]
        assert abs(a["tube_reach_mm"] - o["tube_reach_mm"]) < 3.0
        assert abs(a["midline_mm"] - o["midline_mm"]) < 3.0 and abs(a["depth_mm"] - o["depth_mm"]) < 4.0
    assert oblique["bleed"]["blob_2mm"] > 0.4 and oblique["vein"]["blob_2mm"] < 0.2


def test_a_context_model_is_read_back_and_refuses_features_it_does_not_know():
    model = ContextModel(FEATURES, (0.0,) * len(FEATURES), (1.0,) * len(FEATURES), (0.0,) * len(FEATURES), 0.0)
    again = ContextModel.from_dict(json.loads(json.dumps(model.as_dict())))
    assert again == model and np.allclose(again(np.zeros((3, len(FEATURES)))), 0.5)
    with pytest.raises(ValueError, match="does not compute"):
        ContextModel.from_dict({**model.as_dict(), "features": ["curvature_of_the_moon"]})
    with pytest.raises(ValueError, match="one mean"):
        ContextModel.from_dict({**model.as_dict(), "coef": [1.0]})


def _cases(rng: np.random.Generator, n_cases: int = 12, with_tube: bool = True) -> list[CaseCandidates]:
    """Tuning cases whose stage P cannot tell veins from bleeds but whose tube reach can."""
    cases = []
    for c in range(n_cases):
        n = 30
        is_true = rng.random(n) < 0.3
        p = rng.uniform(0.3, 1.0, n).astype(np.float32)  # no information in the stage's P
        features = rng.normal(0.0, 1.0, (n, len(FEATURES))).astype(np.float32)
        features[:, FEATURES.index("logit_p_microbleed")] = np.log(p / (1 - p))
        if with_tube:
            features[:, FEATURES.index("tube_reach_mm")] = np.where(is_true, rng.uniform(1, 4, n), rng.uniform(8, 16, n))
        coverage = np.diag(is_true.astype(float))[:, is_true] * 0.9
        cases.append(CaseCandidates(f"c{c}", p, is_true, coverage, np.zeros(int(is_true.sum()), bool), features))
    return cases


def test_the_context_model_learns_what_the_stage_p_misses_out_of_fold():
    rng = np.random.default_rng(3)
    plain = fit_mode(_cases(rng))
    with_context = fit_mode(_cases(np.random.default_rng(3)), extra=_cases(rng, 6))
    report = with_context.context_report
    assert 0.4 < report["stage_auc"] < 0.65 and report["oof_auc"] > 0.95
    assert with_context.context.coef[FEATURES.index("tube_reach_mm")] < 0  # far-reaching: not a bleed
    assert with_context.points["count"].sensitivity_small > plain.points["count"].sensitivity_small + 0.3
    # Platt scaling of the out-of-fold P: a smooth, rising map (an isotonic staircase would leave
    # the operating points a few cuts to choose from), calibrated on those P.
    calibration = with_context.calibration
    assert len(calibration.x) > 100 and len(set(calibration.y)) > 30
    assert all(b >= a for a, b in zip(calibration.y, calibration.y[1:]))
    assert with_context.ece_after < 0.05
    # In the card: the model per mode, the calibration after it, and a later calibration without
    # a context model (adapt) drops it rather than keep one fitted on another classifier's P.
    card = calibrated_card({"stage": {}}, {"no_phase": with_context, "phase": with_context}, {"tuning_set": "t"})
    assert ContextModel.from_dict(card["context"]["no_phase"]) == with_context.context
    assert "context_model" in card["calibration_fit"]["no_phase"]
    assert "context" not in calibrated_card(card, {"no_phase": plain, "phase": plain}, {"tuning_set": "t"})


SHARED = {"tube_reach_mm": -0.8, "blob_2mm": 0.7, "line_2mm": -0.6, "depth_mm": 0.5, "log_p_vein": -0.7, "elongation": -0.5}


def _site_cases(rng: np.random.Generator, n_cases: int, contrast_shift: float) -> list[CaseCandidates]:
    """Cases whose bleeds differ from the rest a little in six features, as the base learned them,
    and, at a site, also in contrast; the stage's P carries nothing."""
    cases = []
    for c in range(n_cases):
        n = 30
        is_true = rng.random(n) < 0.3
        features = rng.normal(0.0, 1.0, (n, len(FEATURES)))
        for name, shift in SHARED.items():
            features[:, FEATURES.index(name)] += np.where(is_true, shift, 0.0)
        features[:, FEATURES.index("contrast")] += np.where(is_true, contrast_shift, 0.0)
        coverage = np.diag(is_true.astype(float))[:, is_true] * 0.9
        cases.append(CaseCandidates(f"c{c}", np.full(n, 0.5, np.float32), is_true, coverage, np.zeros(int(is_true.sum()), bool), features.astype(np.float32)))
    return cases


def test_refitting_towards_the_base_learns_what_a_site_shows_and_keeps_what_it_does_not():
    from sklearn.metrics import roc_auc_score

    base = fit_mode(_site_cases(np.random.default_rng(100), 40, 0.0), extra=[]).context
    site = fit_mode(_site_cases(np.random.default_rng(200), 6, 2.0), prior=base)  # a few cases of a site
    held = _site_cases(np.random.default_rng(300), 30, 2.0)
    x, y = np.concatenate([c.features for c in held]), np.concatenate([c.is_true for c in held])
    assert roc_auc_score(y, site.context(x)) > roc_auc_score(y, base(x)) + 0.04
    contrast = FEATURES.index("contrast")
    assert site.context.coef[contrast] > base.coef[contrast] + 0.7
    assert all(np.sign(site.context.coef[FEATURES.index(f)]) == np.sign(base.coef[FEATURES.index(f)]) for f in SHARED)
    assert site.context.features == base.features and site.context.mean == base.mean  # the base's standardisation
    report = site.context_report
    assert set(report) >= {"ridge_alpha", "oof_auc", "prior_auc", "largest_corrections"} and "contrast" in report["largest_corrections"]
    # A site like the base's data: strong shrinkage, corrections small.
    same = fit_mode(_site_cases(np.random.default_rng(400), 6, 0.0), prior=base)
    assert same.context_report["ridge_alpha"] >= 10
    assert np.abs(np.array(same.context.coef) - np.array(base.coef)).max() < 0.4
    with pytest.raises(ValueError, match="two or more cases"):
        fit_mode(_site_cases(np.random.default_rng(5), 1, 2.0), prior=base)


def test_stage_two_decides_by_the_card_s_context_model(tmp_path):
    """Same classifier, same candidates: a context model that rejects what reaches far keeps the
    bleed and rejects the vein the classifier alone would keep."""
    geometry, shape = OBLIQUE
    image, marked = head_with_bleed_and_vein(geometry, shape)
    path = constant_classifier(tmp_path / "c.safetensors", keep_at=0.5, favourite="microbleed")
    card_file = path.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card["stage"] = {**card.get("stage", {}), "candidate_threshold": 0.5, "min_diameter_mm": 1.0}
    card_file.write_text(json.dumps(card))
    plain = run_candidate_stage(image, marked, geometry, load_classifier_file(path))
    assert len(plain.lesions) == 2 and not plain.rejected
    reach = FEATURES.index("tube_reach_mm")
    coef = [0.0] * len(FEATURES)
    coef[reach] = -4.0
    model = ContextModel(FEATURES, (0.0,) * len(FEATURES), tuple(4.0 if n == reach else 1.0 for n in range(len(FEATURES))), tuple(coef), 8.0)
    card["context"] = {"no_phase": model.as_dict(), "phase": model.as_dict()}
    card_file.write_text(json.dumps(card))
    decided = run_candidate_stage(image, marked, geometry, load_classifier_file(path))
    assert len(decided.lesions) == 1 and len(decided.rejected) == 1
    assert decided.lesions[0].centroid_lps[0] < 0 < decided.rejected[0].centroid_lps[0]  # the bleed kept, the vein not
    assert decided.lesions[0].p_microbleed > 0.9 and decided.rejected[0].p_microbleed < 0.1


def _labelled_set(root, seed: int, n: int, domain: str):
    from CMBDetectLib.io import write_volume
    from CMBDetectLib.synth import generate_case

    for index in range(n):
        case = generate_case(seed=seed, index=index, matrix=(160, 160), n_slices=16, n_microbleeds=14, field_strength_t=3.0,
                             slice_thickness_mm=1.5, domain=domain, vein_density=2.0)  # fmt: skip
        write_volume(case.image.array, case.image.geometry, root / "images" / f"{case.name}.nii.gz")
        write_volume(case.labels.astype(np.uint16), case.image.geometry, root / "labels" / f"{case.name}.nii.gz")
    return root


def test_calibrate_with_context_writes_a_classifier_that_detect_decides_with(tmp_path):
    """`calibrate TUNE --context EXTRA` end to end on tiny synthetic sets with the shipped U-Net:
    the card gains a context model per phase mode and its provenance, the shipped files are
    untouched, and `detect` with the new classifier says it decided with it."""
    from CMBDetectLib import models
    from CMBDetectLib.cli import main

    shipped = {p.name: p.read_bytes() for p in models.models_dir().iterdir() if p.is_file()}
    tune = _labelled_set(tmp_path / "tune", 21, 3, "shifted")
    extra = _labelled_set(tmp_path / "extra", 22, 1, "train")
    out = tmp_path / "cls"
    assert main(["calibrate", str(tune), "-o", str(out), "--version", "9.9.9", "--context", str(extra), "-q"]) == 0
    card = json.loads((out / "cmbdetect-candidates-v9.9.9.json").read_text())
    for mode in ("no_phase", "phase"):
        model = ContextModel.from_dict(card["context"][mode])
        assert model.features == FEATURES and any(c != 0 for c in model.coef)
        fit = card["calibration_fit"][mode]["context_model"]
        assert fit["n_tuning_candidates"] > fit["n_extra_candidates"] > 0 and 0.0 <= fit["oof_auc"] <= 1.0
    assert card["calibration_fit"]["context_sets"] == [str(extra)] and card["calibration_fit"]["tuning_set"] == str(tune)
    assert "out-of-fold" in card["calibration"]["method"]
    assert main(["detect", str(tune / "images"), "-o", str(tmp_path / "det"), "--candidate-model",
                 str(out / "cmbdetect-candidates-v9.9.9.safetensors"), "--no-regions", "-q"]) == 0  # fmt: skip
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "det").glob("*_summary.json")]
    assert len(summaries) == 3 and all(s["candidate_stage"]["context_model"] is True for s in summaries)
    assert {p.name: p.read_bytes() for p in models.models_dir().iterdir() if p.is_file()} == shipped
