"""`cmbdetect evaluate` on real files written to a temporary folder, answers worked out by hand.

The cohort (grid 24 x 16 x 6 voxels of 0.5 x 0.5 x 2 mm, so a voxel is 0.5 mm3):

- a: two true lesions. L1 = 9 voxels in one slice (4.5 mm3, d 2.05 mm, small), found whole;
  L2 = 4 x 6 x 8 = 192 voxels (96 mm3, d 5.68 mm, large), half covered (50% > 40%);
  plus a 4-voxel false positive. Probabilities 0.75 / 0.625 / 0.5, missed half of L2 0.25,
  first slice of background 0.125 (all on the 2**-20 grid, so the pixel AUC is exact).
- ctl_clean: control, nothing true, nothing predicted (true negative).
- ctl_fp: control with one 4-voxel false positive of probability 0.75.
- b: another tool's plain mask (.nrrd, value 255, no probability map): 12 of 18 voxels.
- c: only a probability map (0.875 on the 48-voxel true lesion): thresholded here.
- d: prediction shifted by 1 mm (origin): grid mismatch. e: no prediction. f: no truth.
  g: a prediction file that is not an image.
"""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from CMBDetectLib.commands import evaluate as evaluate_cmd
from CMBDetectLib.evaluation.evaluate import Settings, discover, evaluate_arrays, evaluate_folders
from CMBDetectLib.io import Geometry, write_volume

SHAPE = (6, 16, 24)  # k, j, i
GEOM = Geometry(spacing=(0.5, 0.5, 2.0), origin=(1.0, 2.0, 3.0))


def zeros(dtype=np.uint16) -> np.ndarray:
    return np.zeros(SHAPE, dtype)


def build_cohort(root):
    truth_dir, pred_dir = root / "truth", root / "pred"
    (truth_dir / "labels").mkdir(parents=True)
    pred_dir.mkdir()
    arrays = {}

    t = zeros()
    t[2, 4:7, 4:7] = 1  # L1
    t[1:5, 8:14, 12:20] = 2  # L2
    p = zeros()
    p[2, 4:7, 4:7] = 1
    p[1:5, 8:14, 12:16] = 2
    p[5, 0:2, 0:2] = 3
    prob = zeros(np.float32)
    prob[0] = 0.125
    prob[1:5, 8:14, 16:20] = 0.25
    prob[p == 1], prob[p == 2], prob[p == 3] = 0.75, 0.625, 0.5
    arrays["a"] = (t, p, prob)

    arrays["ctl_clean"] = (zeros(), zeros(), zeros(np.float32))

    p = zeros()
    p[3, 10:12, 10:12] = 1
    prob = zeros(np.float32)
    prob[p > 0] = 0.75
    arrays["ctl_fp"] = (zeros(), p, prob)

    for case, (t, p, prob) in arrays.items():
        write_volume(t, GEOM, truth_dir / "labels" / f"{case}.nii.gz")
        write_volume(p, GEOM, pred_dir / f"{case}_lesions.nii.gz")
        write_volume(prob, GEOM, pred_dir / f"{case}_prob.nii.gz")

    t = zeros()
    t[2:4, 2:5, 2:5] = 7
    m = zeros(np.uint8)
    m[2:4, 2:5, 2:4] = 255
    write_volume(t, GEOM, truth_dir / "labels" / "b.nii.gz")
    write_volume(m, GEOM, pred_dir / "b.nrrd")
    arrays["b"] = (t, m, None)

    t = zeros()
    t[2:5, 6:10, 6:10] = 1
    prob = zeros(np.float32)
    prob[t > 0] = 0.875
    write_volume(t, GEOM, truth_dir / "labels" / "c.nii.gz")
    write_volume(prob, GEOM, pred_dir / "c_prob.nii.gz")
    arrays["c"] = (t, (t > 0).astype(np.uint16), prob)

    t = zeros()
    t[2, 4:7, 4:7] = 1
    write_volume(t, GEOM, truth_dir / "labels" / "d.nii.gz")
    write_volume(t, Geometry(GEOM.spacing, (2.0, 2.0, 3.0)), pred_dir / "d_lesions.nii.gz")
    write_volume(t, GEOM, truth_dir / "labels" / "e.nii.gz")
    write_volume(t, GEOM, pred_dir / "f_lesions.nii.gz")
    write_volume(t, GEOM, truth_dir / "labels" / "g.nii.gz")
    (pred_dir / "g_lesions.nii.gz").write_bytes(b"this is not a NIfTI file")

    # Side files of `cmbdetect detect` that must be ignored.
    (pred_dir / "a_lesions.csv").write_text("id\n1\n")
    (pred_dir / "a_summary.json").write_text("{}")
    write_volume(zeros(np.uint8), GEOM, pred_dir / "a.seg.nrrd")

    (truth_dir / "cases.csv").write_text(
        "case,control,n_lesions\na,0,2\nctl_clean,1,0\nctl_fp,1,0\nb,0,1\nc,0,1\nd,0,1\ne,0,1\ng,0,1\n"
    )
    return truth_dir, pred_dir, arrays


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    truth_dir, pred_dir, arrays = build_cohort(root)
    out = root / "out"
    parser = argparse.ArgumentParser()
    evaluate_cmd.configure(parser)
    args = parser.parse_args(["--pred", str(pred_dir), "--truth", str(truth_dir), "-o", str(out), "--bootstrap", "300", "--quiet"])
    code = evaluate_cmd.run(args)
    summary = json.loads((out / "evaluation.json").read_text())
    return {"code": code, "out": out, "summary": summary, "arrays": arrays, "truth": truth_dir, "pred": pred_dir}


def test_exit_code_and_errors_name_case_and_problem(cohort):
    assert cohort["code"] == evaluate_cmd.EXIT_CASE_FAILED
    s = cohort["summary"]
    assert s["cases"]["evaluated"] == 5 and s["cases"]["failed"] == 4
    errors = {e["case"]: e["problem"] for e in s["cases"]["errors"]}
    assert set(errors) == {"d", "e", "f", "g"}
    assert "origin" in errors["d"] and "grid" in errors["d"]
    assert "no prediction" in errors["e"]
    assert "no ground truth" in errors["f"]
    assert "cannot read" in errors["g"]


def test_pixel_figures(cohort):
    s = cohort["summary"]
    rows = {r["case"]: r for r in s["per_case"]}
    # a: TP 9 + 96, FP 4, FN 96.
    assert (rows["a"]["pixel_tp"], rows["a"]["pixel_fp"], rows["a"]["pixel_fn"]) == (105, 4, 96)
    assert rows["a"]["dice"] == pytest.approx(210 / 310, abs=1e-6)
    assert rows["ctl_clean"]["dice"] == 1.0  # empty and empty: perfect, not NaN
    assert rows["ctl_fp"]["dice"] == 0.0 and rows["ctl_fp"]["pixel_recall"] is None
    # Pooled: TP 105 + 12 + 48 = 165, FP 4 + 4 = 8, FN 96 + 6 = 102.
    pooled = s["pixel"]["pooled"]
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (165, 8, 102)
    assert pooled["dice"] == pytest.approx(0.75)
    assert pooled["precision"] == pytest.approx(165 / 173, abs=1e-6)
    assert pooled["recall"] == pytest.approx(165 / 267, abs=1e-6)
    dice_a, dice_b, dice_c = 210 / 310, 24 / 30, 1.0
    assert s["pixel"]["mean_over_cases"]["dice"] == pytest.approx((dice_a + 1 + 0 + dice_b + dice_c) / 5, abs=1e-6)


def test_pixel_roc_matches_scikit_learn_on_the_same_voxels(cohort):
    roc = cohort["summary"]["pixel"]["roc"]
    arrays = cohort["arrays"]
    with_prob = ["a", "ctl_clean", "ctl_fp", "c"]  # b has no probability map
    y = np.concatenate([(arrays[c][0] > 0).ravel() for c in with_prob])
    p = np.concatenate([arrays[c][2].ravel() for c in with_prob])
    assert roc["cases"] == 4
    assert roc["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert roc["auc_binning_error_bound"] == 0.0


def test_lesion_rules(cohort):
    rules = cohort["summary"]["lesion"]["rules"]
    # True lesions: a 2, b 1, c 1; all detected. Predicted: a 3, ctl_fp 1, b 1, c 1; 4 correct.
    for name in ("overlap", "touch", "distance"):
        r = rules[name]
        assert (r["n_truth"], r["n_pred"], r["tp_truth"], r["tp_pred"], r["fp"], r["fn"]) == (4, 6, 4, 4, 2, 0), name
        assert r["precision"] == pytest.approx(4 / 6, abs=1e-6)
        assert r["recall"] == 1.0
        assert r["f1"] == pytest.approx(0.8, abs=1e-6)
        assert r["fp_per_scan"] == pytest.approx(0.4)
    cd = cohort["summary"]["lesion"]["count_difference"]
    assert cd["mean"] == pytest.approx(0.4) and cd["mean_absolute"] == pytest.approx(0.4)


def test_size_classes_and_table3(cohort):
    s = cohort["summary"]
    by_size = s["lesion"]["by_size"]
    # Small true lesions: L1, b (9 mm3, 2.58 mm), c (24 mm3, 3.58 mm); large: L2.
    assert by_size["small"]["n_truth"] == 3 and by_size["small"]["sensitivity"] == 1.0
    assert by_size["large"]["n_truth"] == 1 and by_size["large"]["sensitivity"] == 1.0
    # Small-class predictions: a's L1 and false positive, ctl_fp's, b's, c's; 3 correct.
    assert (by_size["small"]["n_pred"], by_size["small"]["correct"]) == (5, 3)
    assert by_size["small"]["specificity"] == pytest.approx(0.6)
    t3 = s["table3"]
    # Small voxels: TP 9 + 12 + 48 = 69, FP 4 + 4 = 8, FN 6. Large: TP 96, FN 96.
    assert (t3["small"]["tp"], t3["small"]["fp"], t3["small"]["fn"]) == (69, 8, 6)
    assert t3["small"]["dice"] == pytest.approx(138 / 152, abs=1e-6)
    assert t3["large"]["dice"] == pytest.approx(2 / 3, abs=1e-6)
    assert t3["large"]["precision"] == 1.0 and t3["large"]["recall"] == 0.5
    assert t3["average"]["dice"] == pytest.approx(0.75)
    assert t3["average"]["sensitivity"] == 1.0 and t3["average"]["specificity"] == pytest.approx(4 / 6, abs=1e-6)


def test_patient_level_and_controls(cohort):
    p = cohort["summary"]["patient"]
    assert (p["tp"], p["fn"], p["fp"], p["tn"]) == (3, 0, 1, 1)
    assert p["fpr"] == 0.5 and p["fnr"] == 0.0 and p["tpr"] == 1.0
    assert p["controls"] == 2 and p["controls_with_false_positive"] == 1
    assert p["controls_with_false_positive_cases"] == ["ctl_fp"]


def test_lesion_roc_and_froc(cohort):
    les = cohort["summary"]["lesion"]
    # Candidates: 0.875 (+, c), 0.75 (+, a), 0.625 (+, a), 0.5 (-, a), 0.75 (-, ctl_fp).
    # Won pairs: 0.875: 2; 0.75: 1 + 1/2 (tie); 0.625: 1 -> 4.5 of 6.
    assert les["roc"]["candidates"] == 5 and les["roc"]["positive"] == 3
    assert les["roc"]["auc"] == pytest.approx(0.75)
    froc = les["froc"]
    assert froc["cases"] == 4  # b has no probability map
    touch = froc["rules"]["touch"]
    assert touch["thresholds"] == [None, 0.875, 0.75, 0.625, 0.5]  # None: +inf, nothing kept
    assert touch["fp_per_scan"] == pytest.approx([0, 0, 0.25, 0.25, 0.5])
    assert touch["sensitivity"] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1], abs=1e-6)
    assert touch["sensitivity_at_fp_per_scan"]["0.25"] == 1.0
    assert touch["sensitivity_at_fp_per_scan"]["1"] is None


def test_confidence_intervals(cohort):
    ci = cohort["summary"]["confidence_intervals"]
    for key in ("pixel_dice", "overlap_precision", "overlap_recall", "sensitivity_small", "patient_fpr", "lesion_auc", "touch_f1"):
        v = ci[key]
        assert v["n_valid"] > 0
        assert v["low"] <= v["estimate"] <= v["high"], key
    assert ci["overlap_recall"]["low"] == ci["overlap_recall"]["high"] == 1.0  # every lesion found in every case
    assert ci["_method"]["resamples"] == 300
    icc = ci["count_icc"]  # the per-case count ICC gets its interval like every other figure
    assert icc["estimate"] == pytest.approx(cohort["summary"]["count_icc"], abs=1e-4)
    assert icc["n_valid"] > 0 and icc["low"] <= icc["estimate"] <= icc["high"]
    assert icc["low"] < icc["high"]  # the cohort's counts disagree in some cases, so resamples differ


def test_csv_and_html(cohort):
    out = cohort["out"]
    with open(out / "cases.csv", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"a", "b", "c", "ctl_clean", "ctl_fp", "d", "e", "f", "g"}
    assert rows["d"]["status"] == "error" and "origin" in rows["d"]["problem"]
    assert rows["a"]["status"] == "ok" and rows["a"]["n_truth"] == "2" and rows["a"]["patient"] == "TP"
    assert rows["b"]["prediction"] == "mask" and rows["b"]["has_probability"] == "0"
    assert rows["c"]["prediction"] == "probability" and "thresholded" in rows["c"]["notes"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # ROC and FROC, embedded
    assert "Table 3" in page and "Small lesions (2-5 mm)" in page
    assert "origin" in page  # the failed case is listed with its problem
    assert "count ICC" in page  # beside the other headline figures, with its interval
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched


def test_json_never_holds_nan(cohort):
    text = (cohort["out"] / "evaluation.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_a_cohort_of_clean_controls_is_all_true_negatives(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    for case in ("n1", "n2"):
        write_volume(zeros(), GEOM, tmp_path / "t" / f"{case}.nii.gz")  # a plain folder of label maps
        write_volume(zeros(), GEOM, tmp_path / "p" / f"{case}_lesions.nii.gz")
    ev = evaluate_folders(tmp_path / "p", tmp_path / "t", Settings(n_bootstrap=50), progress=False)
    s = ev.summary()
    assert not ev.errors
    assert s["cases"]["controls"] == 2  # no cases.csv: empty truth makes a control
    assert s["pixel"]["pooled"]["dice"] == 1.0
    assert s["lesion"]["rules"]["overlap"]["precision"] == 1.0 and s["lesion"]["rules"]["overlap"]["recall"] == 1.0
    assert s["lesion"]["rules"]["touch"]["fp_per_scan"] == 0.0
    assert (s["patient"]["tn"], s["patient"]["fpr"], s["patient"]["fnr"]) == (2, 0.0, None)  # no patient with lesions
    assert s["pixel"]["roc"] is None and s["lesion"]["roc"] is None and s["lesion"]["froc"] is None
    assert s["table3"]["average"]["dice"] == 1.0


def test_nothing_to_evaluate_exits_two(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    parser = argparse.ArgumentParser()
    evaluate_cmd.configure(parser)
    args = parser.parse_args(["--pred", str(tmp_path / "p"), "--truth", str(tmp_path / "t"), "-o", str(tmp_path / "o"), "--quiet"])
    assert evaluate_cmd.run(args) == evaluate_cmd.EXIT_NOTHING_EVALUATED
    assert (tmp_path / "o" / "report.html").exists()
    args = parser.parse_args(["--pred", str(tmp_path / "missing"), "--truth", str(tmp_path / "t"), "-o", str(tmp_path / "o"), "--quiet"])
    assert evaluate_cmd.run(args) == evaluate_cmd.EXIT_NOTHING_EVALUATED
    (tmp_path / "t" / "cases.csv").write_text("case,control\n")
    args = parser.parse_args(["--pred", str(tmp_path / "p"), "--truth", str(tmp_path / "t"), "-o", str(tmp_path / "t"), "--quiet"])
    assert evaluate_cmd.run(args) == evaluate_cmd.EXIT_NOTHING_EVALUATED
    assert (tmp_path / "t" / "cases.csv").read_text() == "case,control\n"  # the truth's case list is untouched


def test_discover_prefers_lesion_map_and_pairs_probability(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    write_volume(zeros(), GEOM, tmp_path / "t" / "x.nrrd")
    for name in ("x_lesions.nii.gz", "x.nii.gz", "x_prob.nii.gz"):
        write_volume(zeros(), GEOM, tmp_path / "p" / name)
    pairs, errors = discover(tmp_path / "p", tmp_path / "t")
    assert not errors and len(pairs) == 1
    assert pairs[0].prediction.name == "x_lesions.nii.gz" and pairs[0].probability.name == "x_prob.nii.gz"


def test_label_ids_keep_touching_lesions_apart():
    truth = zeros()
    truth[2, 4, 2:5] = 1
    truth[2, 4, 5:8] = 2  # touches lesion 1
    pred = zeros()
    pred[2, 4, 2:5] = 1  # finds lesion 1 only
    merged = evaluate_arrays("x", truth, pred, GEOM)
    assert merged.table.n_truth == 1 and merged.paper.tp_truth == 1  # 3 of 6 voxels = 50%
    apart = evaluate_arrays("x", truth, pred, GEOM, settings=Settings(use_label_ids=True))
    assert apart.table.n_truth == 2 and apart.paper.tp_truth == 1 and apart.paper.recall == 0.5


def test_control_listed_with_lesions_is_scored_as_a_patient():
    truth = zeros()
    truth[2, 4, 2:5] = 1
    r = evaluate_arrays("x", truth, zeros(), GEOM, control=True)
    assert r.patient == "FN" and any("control" in n for n in r.notes)
    assert math.isnan(r.pixels.precision)


def test_subcommand_contract():
    from CMBDetectLib import cli

    assert cli.SUBCOMMANDS["evaluate"] == "CMBDetectLib.commands.evaluate"
    assert isinstance(evaluate_cmd.HELP, str) and evaluate_cmd.HELP
    parser = argparse.ArgumentParser()
    evaluate_cmd.configure(parser)
    args = parser.parse_args(["--pred", "p", "--truth", "t", "-o", "o"])
    assert (args.connectivity, args.overlap, args.distance_mm, args.bootstrap, args.seed) == (26, 0.4, 5.0, 1000, 0)


def test_truth_as_seg_nrrd_cropped_to_its_segments(tmp_path):
    """Slicer saves a segmentation cropped to its segments; evaluate pastes it onto the prediction's grid."""
    from CMBDetectLib.detection.lesions import extract_lesions
    from CMBDetectLib.detection.outputs import write_segmentation_nrrd

    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir(), pred_dir.mkdir()
    t = zeros()
    t[2:4, 4:8, 4:8] = 1  # 2 x 2 x 2 mm: one small lesion
    t[1:4, 10:14, 14:20] = 1  # a second one, 3 x 3 x 6 mm
    labels, lesions = extract_lesions(t.astype(np.float32), GEOM, 0.5)
    assert len(lesions) == 2
    box = (slice(1, 4), slice(4, 14), slice(4, 20))  # the segments' extent
    corner = GEOM.ijk_to_lps() @ np.array([4, 4, 1, 1.0])  # (i, j, k) of the box's first voxel
    write_segmentation_nrrd(truth_dir / "a.seg.nrrd", labels[box], lesions, Geometry(GEOM.spacing, tuple(corner[:3]), GEOM.direction))
    p = zeros()
    p[2:4, 4:8, 4:8] = 1  # finds the first lesion only
    write_volume(p, GEOM, pred_dir / "a_lesions.nii.gz")
    write_volume(zeros(np.uint8), GEOM, pred_dir / "a.seg.nrrd")  # detect's own segmentation: not a truth

    pairs, errors = discover(pred_dir, truth_dir)
    assert not errors and [p.case for p in pairs] == ["a"]
    ev = evaluate_folders(pred_dir, truth_dir, Settings(n_bootstrap=0), progress=False)
    assert not ev.errors
    touch = ev.summary()["lesion"]["rules"]["touch"]
    assert (touch["n_truth"], touch["tp_truth"], touch["n_pred"]) == (2, 1, 1)


def test_false_positives_named_by_the_mimic_map_they_lie_on(tmp_path):
    """With TRUTH/mimics/ (as `cmbdetect synth` writes), each false positive under the paper's
    rule is named by the mimic most of its voxels lie on; true positives are not counted."""
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    t, p, mimics = zeros(), zeros(), zeros(np.uint8)
    t[2, 4:7, 4:7] = 1  # found: not a false positive
    p[2, 4:7, 4:7] = 1
    p[1:3, 0:2, 10:12] = 2  # on a vein (3 of 8 voxels calcification: the vein wins)
    mimics[1:3, 0:2, 10:12] = 1
    mimics[1, 0, 10:12] = 2
    mimics[1, 1, 10] = 2
    p[4, 10:12, 20:22] = 3  # on a calcification
    mimics[4, 10:12, 20:22] = 2
    p[5, 14:16, 0:2] = 4  # on nothing
    t[3, 10:16, 2:8] = 2  # a large true lesion (36 voxels) ...
    p[3, 10:11, 2:4] = 5  # ... touched by a 2-voxel fragment: under 40 %, so a false positive
    write_volume(t, GEOM, truth_dir / "labels" / "x.nii.gz")
    write_volume(mimics, GEOM, truth_dir / "mimics" / "x.nii.gz")
    write_volume(p, GEOM, pred_dir / "x_lesions.nii.gz")
    lesion = evaluate_folders(pred_dir, truth_dir, Settings(n_bootstrap=0), progress=False).summary()["lesion"]
    assert lesion["rules"]["overlap"]["fp"] == 4
    assert lesion["false_positives_by_mimic"] == {
        "vein": 1, "calcification": 1, "nucleus": 0, "air_edge": 0, "other": 1, "on_microbleed": 1,
    }
    # Without mimic maps the figure is absent, not zero.
    (truth_dir / "mimics" / "x.nii.gz").unlink()
    (truth_dir / "mimics").rmdir()
    assert evaluate_folders(pred_dir, truth_dir, Settings(n_bootstrap=0), progress=False).summary()["lesion"]["false_positives_by_mimic"] is None


def test_mars_region_agreement_in_the_summary_terminal_and_html(tmp_path):
    """With TRUTH/meta/ (the generator's MARS truth per bleed) and the lesion CSV's locations:
    region and side agreement over detected true lesions, unknown ones not compared."""
    from CMBDetectLib.evaluation.report import render_html, summary_text

    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    t = zeros()
    t[2, 4:7, 4:7], t[3, 10:13, 10:13], t[4, 16:19, 16:19] = 1, 2, 3
    write_volume(t, GEOM, truth_dir / "labels" / "x.nii.gz")
    write_volume(t, GEOM, pred_dir / "x_lesions.nii.gz")
    (truth_dir / "meta").mkdir()
    (truth_dir / "meta" / "x.json").write_text(json.dumps({"lesions": [
        {"id": 1, "mars_region": "deep", "mars_structure": "thalamus", "side": "left"},
        {"id": 2, "mars_region": "lobar", "mars_structure": "frontal_cortex", "side": "right"},
        {"id": 3, "mars_region": "lobar", "mars_structure": "parietal_cortex", "side": "left"},
    ]}))  # fmt: skip
    (pred_dir / "x_lesions.csv").write_text(
        "id,mars_region,mars_structure,side\n1,deep,thalamus,left\n2,deep,deep_white_matter,right\n3,unknown,unknown,unknown\n"
    )
    summary = evaluate_folders(pred_dir, truth_dir, Settings(n_bootstrap=0), progress=False).summary()
    regions = summary["regions"]
    assert (regions["compared"], regions["region_agreement"], regions["side_agreement"]) == (2, 0.5, 1.0)
    assert "region agreement 0.500, side 1.000 over 2" in summary_text(summary)
    page = render_html(summary)
    assert "MARS locations" in page and "Region agreement" in page and "0.500" in page
