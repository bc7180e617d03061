"""Metric functions on hand-built masks whose answers were worked out by hand.

Volumes are (k, j, i) arrays; spacing is given (i, j, k) as in io.Geometry. Most lesions
here are short lines of voxels along i, so centres and coverages are easy to count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from CMBDetectLib.evaluation import metrics as M

ISO = (1.0, 1.0, 1.0)


def table_of(truth: np.ndarray, pred: np.ndarray, spacing=ISO, direction=None, probability=None, use_ids=False) -> M.LesionTable:
    t, nt = M.instance_labels(truth, use_ids=use_ids)
    p, n_p = M.instance_labels(pred, use_ids=use_ids)
    return M.lesion_table(t, nt, p, n_p, spacing, direction, probability)


def line(vol: np.ndarray, k: int, j: int, i0: int, i1: int, value: int = 1) -> None:
    """Set voxels i0..i1 (inclusive) of row (k, j)."""
    vol[k, j, i0 : i1 + 1] = value


# --------------------------------------------------------------------------- ratios and pixels


def test_pixel_counts_dice_precision_recall_by_hand():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[0:2, 0:2, 0:2] = 1  # 8 voxels
    pred = np.zeros_like(truth)
    pred[0:2, 0:2, 0] = 1  # 4 of them
    pred[3, 3, 2:4] = 1  # 2 outside
    c = M.pixel_counts(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (4, 2, 4, 64 - 10)
    assert c.dice == pytest.approx(8 / 14)
    assert c.precision == pytest.approx(4 / 6)
    assert c.recall == pytest.approx(4 / 8)


def test_zero_over_zero_conventions():
    empty = M.PixelCounts(0, 0, 0)
    assert (empty.dice, empty.precision, empty.recall) == (1.0, 1.0, 1.0)
    missed_all = M.PixelCounts(tp=0, fp=0, fn=5)  # nothing predicted, truth present
    assert missed_all.dice == 0.0 and missed_all.recall == 0.0 and math.isnan(missed_all.precision)
    false_alarm = M.PixelCounts(tp=0, fp=3, fn=0)  # no truth, something predicted
    assert false_alarm.dice == 0.0 and false_alarm.precision == 0.0 and math.isnan(false_alarm.recall)
    assert M.harmonic_f1(float("nan"), 0.0) == 0.0
    assert M.harmonic_f1(1.0, 1.0) == 1.0
    assert M.harmonic_f1(0.5, 1.0) == pytest.approx(2 / 3)
    # Vectorised, as the bootstrap uses it.
    np.testing.assert_array_equal(M.ratio(np.array([0, 1, 0]), np.array([0, 2, 0]), np.array([0, 0, 4])), [1.0, 0.5, np.nan])


# --------------------------------------------------------------------------- ROC


def test_roc_auc_by_hand_with_a_tie():
    # Positives 0.9, 0.8; negatives 0.8, 0.1: pairs won 1, 1, 1/2 (tie), 1 -> 3.5 / 4.
    assert M.roc_auc([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx(0.875)
    assert M.roc_auc([0.3, 0.2], [1, 1]) is None  # one class only


@pytest.mark.parametrize("seed", range(5))
def test_roc_matches_scikit_learn_with_ties_and_weights(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.integers(0, 12, n) / 11.0  # many ties
    labels = rng.random(n) < 0.3
    weights = rng.integers(1, 4, n).astype(float)
    curve = M.roc_curve(scores, labels)
    fpr, tpr, thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr)
    np.testing.assert_allclose(curve.tpr, tpr)
    np.testing.assert_allclose(curve.thresholds[1:], thr[1:])
    assert M.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.roc_auc(scores, labels, weights) == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights), abs=1e-12)
    # The bootstrap's AUC of resampled groups is the weighted AUC, row by row.
    groups = rng.integers(0, 7, n)
    group_weights = rng.integers(0, 4, (5, 7)).astype(float)
    group_weights[0] = 1.0
    many = M.grouped_auc_many(scores, labels, groups, group_weights)
    for r in range(5):
        w = group_weights[r, groups]
        if labels[w > 0].all() or not labels[w > 0].any():
            assert np.isnan(many[r])
        else:
            assert many[r] == pytest.approx(roc_auc_score(labels, scores, sample_weight=w), abs=1e-12)


def test_histogram_roc_is_exact_for_probabilities_on_the_grid():
    rng = np.random.default_rng(3)
    prob = (rng.integers(0, 1025, (6, 20, 20)) / 1024.0).astype(np.float32)  # multiples of 2**-10 lie on the 2**-20 grid
    truth = rng.random(prob.shape) < prob * 0.5
    h = M.probability_histograms(prob, truth)
    curve = h.roc()
    assert curve.auc == pytest.approx(roc_auc_score(truth.ravel(), prob.ravel()), abs=1e-12)
    assert h.auc_error_bound() == 0.0
    fpr, tpr, _ = sk_roc_curve(truth.ravel(), prob.ravel(), drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr)
    np.testing.assert_allclose(curve.tpr, tpr)


def test_histogram_roc_within_its_bound_for_continuous_probabilities():
    rng = np.random.default_rng(4)
    prob = rng.random((5, 30, 30)).astype(np.float32)
    truth = rng.random(prob.shape) < prob**3
    h = M.probability_histograms(prob, truth)
    exact = roc_auc_score(truth.ravel(), prob.ravel())
    assert abs(h.roc().auc - exact) <= h.auc_error_bound() + 1e-12
    assert h.auc_error_bound() < 1e-3
    # Histograms of two halves add up to the histogram of the whole.
    h1 = M.probability_histograms(prob[:2], truth[:2])
    h1 += M.probability_histograms(prob[2:], truth[2:])
    assert h1.roc().auc == pytest.approx(h.roc().auc, abs=1e-15)


def test_histogram_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError):
        M.probability_histograms(np.full((2, 2, 2), 1.5, np.float32), np.zeros((2, 2, 2)))


# --------------------------------------------------------------------------- instances and tables


def test_instances_components_versus_label_ids():
    vol = np.zeros((3, 3, 8), np.uint16)
    line(vol, 1, 1, 1, 3, 1)
    line(vol, 1, 1, 4, 6, 2)  # touches lesion 1
    assert M.instance_labels(vol)[1] == 1
    labels, n = M.instance_labels(vol, use_ids=True)
    assert n == 2 and set(np.unique(labels)) == {0, 1, 2}
    # 26-connectivity joins voxels touching by a corner; 6-connectivity does not.
    diag = np.zeros((3, 3, 3), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = 1
    assert M.instance_labels(diag)[1] == 1
    assert M.instance_labels(diag, connectivity=6)[1] == 2


def test_lesion_table_measures_in_millimetres_on_anisotropic_voxels():
    # Spacing i, j = 0.5 mm and k = 2 mm: a voxel is 0.5 mm3.
    spacing = (0.5, 0.5, 2.0)
    truth = np.zeros((6, 12, 12), np.uint8)
    truth[1:5, 1:6, 1:6] = 1  # 100 voxels = 50 mm3 -> d = (6*50/pi)^(1/3) = 4.571 mm: small
    t = table_of(truth, np.zeros_like(truth), spacing)
    assert t.truth_voxels.tolist() == [100]
    assert t.truth_diameter_mm[0] == pytest.approx((6 * 50 / math.pi) ** (1 / 3))
    assert t.truth_class.tolist() == ["small"]
    # The same 100 voxels at 1 mm isotropic are 100 mm3 -> 5.76 mm: large.
    assert table_of(truth, np.zeros_like(truth), ISO).truth_class.tolist() == ["large"]
    # Centre of mass in mm: voxel centre (i, j, k) = (3, 3, 2.5) -> (1.5, 1.5, 5.0) mm.
    np.testing.assert_allclose(t.truth_centre_mm[0], [1.5, 1.5, 5.0])


# --------------------------------------------------------------------------- matching rules


def test_split_lesion_counts_once_detected_and_both_fragments_correct():
    truth = np.zeros((3, 3, 14), np.uint8)
    line(truth, 1, 1, 2, 11)  # one true lesion of 10 voxels, centre i = 6.5
    pred = np.zeros_like(truth)
    line(pred, 1, 1, 2, 4)  # fragment A: 3 voxels, centre i = 3
    line(pred, 1, 1, 8, 10)  # fragment B: 3 voxels, centre i = 9, not touching A
    t = table_of(truth, pred)
    assert t.overlap.tolist() == [[3, 3]]

    paper = M.match_overlap(t)  # 6 of 10 covered (60%) by the two together: detected
    assert (paper.n_truth, paper.n_pred, paper.tp_truth, paper.tp_pred, paper.fp, paper.fn) == (1, 2, 1, 2, 0, 0)
    assert paper.precision == 1.0 and paper.recall == 1.0 and paper.f1 == 1.0

    touch = M.match_touch(t)
    assert (touch.tp_truth, touch.tp_pred, touch.fp) == (1, 2, 0)

    # One-to-one by centre distance: B (2.5 mm) is closer than A (3.5 mm); A is a false positive.
    dist = M.match_centre_distance(t)
    assert dist.pairs == [(0, 1)]
    assert (dist.tp_truth, dist.tp_pred, dist.fp, dist.fn) == (1, 1, 1, 0)
    assert dist.precision == 0.5 and dist.recall == 1.0 and dist.f1 == pytest.approx(2 / 3)


def test_fragment_alone_below_forty_percent_is_not_a_detection():
    truth = np.zeros((3, 3, 14), np.uint8)
    line(truth, 1, 1, 2, 11)
    pred = np.zeros_like(truth)
    line(pred, 1, 1, 2, 4)  # 3 of 10 = 30%
    t = table_of(truth, pred)
    paper = M.match_overlap(t)
    assert (paper.tp_truth, paper.tp_pred, paper.fp, paper.fn) == (0, 0, 1, 1)
    touch = M.match_touch(t)
    assert (touch.tp_truth, touch.tp_pred, touch.fp, touch.fn) == (1, 1, 0, 0)


def test_merged_prediction_covers_two_lesions():
    truth = np.zeros((3, 3, 12), np.uint16)
    line(truth, 1, 1, 2, 4)  # T1: centre i = 3
    line(truth, 1, 1, 6, 8)  # T2: centre i = 7 (gap at i = 5)
    pred = np.zeros_like(truth)
    line(pred, 1, 1, 2, 8)  # one lesion over both and the gap: centre i = 5
    t = table_of(truth, pred)
    assert t.n_truth == 2 and t.n_pred == 1
    pixels = M.pixel_counts(pred, truth)
    assert (pixels.tp, pixels.fp, pixels.fn) == (6, 1, 0)
    assert pixels.dice == pytest.approx(12 / 13)

    for matching in (M.match_overlap(t), M.match_touch(t)):
        assert (matching.tp_truth, matching.tp_pred, matching.fp, matching.fn) == (2, 1, 0, 0)
        assert matching.precision == 1.0 and matching.recall == 1.0

    # Both true centres are 2 mm away: the tie goes to the first true lesion, the second is missed.
    dist = M.match_centre_distance(t)
    assert dist.pairs == [(0, 0)]
    assert (dist.tp_truth, dist.fp, dist.fn) == (1, 0, 1)
    assert dist.recall == 0.5 and dist.f1 == pytest.approx(2 / 3)


@pytest.mark.parametrize("covered, detected", [(2, False), (3, True)])
def test_forty_percent_is_strict(covered, detected):
    truth = np.zeros((3, 3, 10), np.uint8)
    line(truth, 1, 1, 1, 5)  # 5 voxels
    pred = np.zeros_like(truth)
    line(pred, 1, 1, 1, covered)  # 2/5 = exactly 40% (not more), 3/5 = 60%
    t = table_of(truth, pred)
    paper = M.match_overlap(t)
    assert bool(paper.detected[0]) is detected
    assert paper.tp_pred == int(detected) and paper.fp == int(not detected)
    assert M.match_touch(t).tp_truth == 1


def test_centre_distance_is_physical_on_anisotropic_and_oblique_grids():
    spacing = (0.5, 0.5, 2.0)  # i, j, k
    truth = np.zeros((9, 5, 12), np.uint8)
    truth[2, 2, 2] = 1  # T: k = 2
    pred = np.zeros_like(truth)
    pred[4, 2, 2] = 1  # 2 slices away = 4 mm: matched
    pred[2, 2, 10] = 1  # 8 columns away = 4 mm as well: a tie, one of the two is left over
    t = table_of(truth, pred, spacing)
    np.testing.assert_allclose(t.distance_mm, [[4.0, 4.0]])
    m = M.match_centre_distance(t)
    assert m.tp_truth == 1 and m.fp == 1

    far = np.zeros_like(truth)
    far[5, 2, 2] = 1  # 3 slices = 6 mm: not within 5 mm although only 3 voxels away
    assert M.match_centre_distance(table_of(truth, far, spacing)).tp_truth == 0
    near = np.zeros_like(truth)
    near[2, 2, 8] = 1  # 6 columns = 3 mm: within 5 mm although 6 voxels away
    assert M.match_centre_distance(table_of(truth, near, spacing)).tp_truth == 1

    # A rotated grid (axes permuted) changes no distance.
    rotation = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)
    np.testing.assert_allclose(table_of(truth, pred, spacing, rotation).distance_mm, [[4.0, 4.0]])


def test_distance_must_be_strictly_below_the_limit():
    truth = np.zeros((3, 3, 12), np.uint8)
    truth[1, 1, 1] = 1
    pred = np.zeros_like(truth)
    pred[1, 1, 6] = 1  # exactly 5 mm
    t = table_of(truth, pred)
    assert M.match_centre_distance(t, 5.0).tp_truth == 0
    assert M.match_centre_distance(t, 5.01).tp_truth == 1


def test_greedy_matching_takes_the_globally_closest_pair_first():
    truth = np.zeros((3, 3, 16), np.uint8)
    truth[1, 1, 3] = 1  # T1 at i = 3
    truth[1, 1, 6] = 1  # T2 at i = 6
    pred = np.zeros_like(truth)
    pred[1, 1, 0] = 1  # Q at i = 0: 3 mm from T1, 6 mm from T2 (prediction 0 in scan order)
    pred[1, 1, 5] = 1  # P at i = 5: 2 mm from T1, 1 mm from T2 (prediction 1)
    t = table_of(truth, pred)
    m = M.match_centre_distance(t)
    # By distance: (T2,P)=1, (T1,P)=2 (P taken), (T1,Q)=3 -> T2-P, then T1-Q. Letting T1 pick
    # its nearest first would take P and leave T2 unmatched.
    assert sorted(m.pairs) == [(0, 0), (1, 1)]
    assert m.tp_truth == 2 and m.fp == 0


# --------------------------------------------------------------------------- size classes


def test_class_counts_split_pixels_and_lesions_by_size():
    truth = np.zeros((8, 10, 20), np.uint8)
    truth[1:6, 1:6, 1:6] = 1  # 125 voxels at 1 mm: d = 6.20 mm, large
    truth[2, 2, 10:14] = 1  # 4 voxels: d = 1.97 mm, small (and below 2 mm)
    pred = np.zeros_like(truth)
    pred[1:6, 1:6, 1:4] = 1  # 75 voxels on the large lesion
    pred[1:6, 6, 1:4] = 1  # 15 voxels beside it (row j = 6), same component: FP voxels of a large-class prediction
    pred[6, 8, 17] = 1  # a lone false positive of 1 voxel: its own class, small
    t = table_of(truth, pred)
    assert t.truth_class.tolist() == ["large", "small"]
    assert t.truth_outside_size_range.tolist() == [False, True]
    assert t.pred_class.tolist() == ["large", "small"]
    px = M.class_pixel_counts(t)
    assert (px["large"].tp, px["large"].fp, px["large"].fn) == (75, 15, 50)
    assert (px["small"].tp, px["small"].fp, px["small"].fn) == (0, 1, 4)
    whole = M.pixel_counts(pred, truth)
    assert (whole.tp, whole.fp, whole.fn) == (75, 16, 54)  # the classes partition the counts
    det = M.class_detection_counts(t, M.match_overlap(t))
    # Large lesion: 75/125 = 60% covered -> detected; its prediction correct.
    assert det == {"large": {"n_truth": 1, "detected": 1, "n_pred": 1, "correct": 1},
                   "small": {"n_truth": 1, "detected": 0, "n_pred": 1, "correct": 0}}


# --------------------------------------------------------------------------- patient level


def test_patient_outcomes_and_rates():
    assert M.patient_outcome(n_truth=3, n_detected=1, n_pred=5) == "TP"
    assert M.patient_outcome(n_truth=3, n_detected=0, n_pred=5) == "FN"  # only wrong lesions: still a missed patient
    assert M.patient_outcome(n_truth=0, n_detected=0, n_pred=1) == "FP"
    assert M.patient_outcome(n_truth=0, n_detected=0, n_pred=0) == "TN"
    # The paper's figures: FP 10, FN 2, TN 84, TP 93 -> FPR 0.106, FNR 0.021.
    r = M.patient_rates(tp=93, fn=2, fp=10, tn=84)
    assert r["fpr"] == pytest.approx(10 / 94) and round(r["fpr"], 3) == 0.106
    assert r["fnr"] == pytest.approx(2 / 95) and round(r["fnr"], 3) == 0.021
    assert r["tpr"] == pytest.approx(93 / 95) and r["specificity"] == pytest.approx(84 / 94)
    assert math.isnan(M.patient_rates(tp=0, fn=0, fp=0, tn=4)["fnr"])


# --------------------------------------------------------------------------- lesion ROC and FROC


def test_lesion_candidates_by_hand():
    truth = np.zeros((3, 3, 20), np.uint8)
    line(truth, 1, 1, 1, 3)  # T1: detected by P1
    line(truth, 1, 1, 8, 10)  # T2: missed
    pred = np.zeros_like(truth)
    line(pred, 1, 1, 1, 3)  # P1 on T1
    line(pred, 1, 1, 15, 16)  # P2: false positive
    prob = np.zeros(truth.shape, np.float32)
    prob[1, 1, 1:4] = [0.9, 0.8, 0.7]  # P1 mean 0.8
    prob[1, 1, 8:11] = [0.3, 0.2, 0.1]  # T2 mean 0.2
    prob[1, 1, 15:17] = [0.6, 0.5]  # P2 mean 0.55
    t = table_of(truth, pred, probability=prob)
    scores, labels = M.lesion_candidates(t, M.match_overlap(t))
    np.testing.assert_allclose(scores, [0.8, 0.55, 0.2], atol=1e-6)
    assert labels.tolist() == [True, False, True]
    # Positives 0.8 and 0.2 against the negative 0.55: one pair won of two.
    assert M.roc_auc(scores, labels) == pytest.approx(0.5)


def _froc_case():
    """Case 1: T_A found by p1 (0.9), a false positive p2 (0.7), T_B found by p3 (0.5).
    Case 2, a control: a false positive p4 (0.8)."""
    t1 = np.zeros((3, 3, 30), np.uint8)
    line(t1, 1, 1, 1, 3)
    line(t1, 1, 1, 20, 22)
    p1 = np.zeros_like(t1)
    line(p1, 1, 1, 1, 3)  # p1
    line(p1, 1, 1, 10, 11)  # p2
    line(p1, 1, 1, 20, 22)  # p3
    c2 = np.zeros_like(t1)
    p2 = np.zeros_like(t1)
    p2[1, 1, 5] = 1
    return [table_of(t1, p1), table_of(c2, p2)], [np.array([0.9, 0.7, 0.5]), np.array([0.8])]


@pytest.mark.parametrize("rule", M.RULES)
def test_froc_by_hand(rule):
    tables, scores = _froc_case()
    f = M.froc_curve(tables, scores, rule)
    # Thresholds inf, 0.9, 0.8, 0.7, 0.5 keep {}, {p1}, {p1,p4}, {p1,p4,p2}, all.
    np.testing.assert_allclose(f.thresholds, [np.inf, 0.9, 0.8, 0.7, 0.5])
    np.testing.assert_allclose(f.fp_per_scan, [0, 0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(f.sensitivity, [0, 0.5, 0.5, 0.5, 1.0])
    assert f.sensitivity_at(0.25) == 0.5
    assert f.sensitivity_at(1.0) == 1.0
    assert f.sensitivity_at(2.0) is None  # beyond the operating point


def test_froc_under_the_paper_rule_lets_fragments_join():
    truth = np.zeros((3, 3, 14), np.uint8)
    line(truth, 1, 1, 2, 11)  # 10 voxels
    pred = np.zeros_like(truth)
    line(pred, 1, 1, 2, 4)  # 30%, score 0.9
    line(pred, 1, 1, 8, 10)  # 30%, score 0.6
    t = table_of(truth, pred)
    f = M.froc_curve([t], [np.array([0.9, 0.6])], "overlap")
    # Alone the first fragment is a false positive; with the second, 60% is covered and both are correct.
    np.testing.assert_allclose(f.fp_per_scan, [0, 1, 0])
    np.testing.assert_allclose(f.sensitivity, [0, 0, 1])


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_seeded_and_degenerate_when_cases_agree():
    w1 = M.bootstrap_weights(7, 50, seed=3)
    w2 = M.bootstrap_weights(7, 50, seed=3)
    np.testing.assert_array_equal(w1, w2)
    assert (w1.sum(axis=1) == 7).all()
    assert not np.array_equal(w1, M.bootstrap_weights(7, 50, seed=4))

    # Every case: 3 TP, 1 FP -> precision 0.75 whatever the resample.
    counts = np.tile([3.0, 1.0], (5, 1))
    stats = {"precision": lambda s: M.ratio(s["tp"], s["tp"] + s["fp"], 0)}
    iv = M.bootstrap_counts(counts, stats, ["tp", "fp"], M.bootstrap_weights(5, 200, 0))["precision"]
    assert (iv.estimate, iv.low, iv.high, iv.n_valid) == (0.75, 0.75, 0.75, 200)


def test_bootstrap_interval_brackets_a_mixed_estimate_and_skips_undefined_resamples():
    # Two cases: recall 1 (2/2) and recall 0 (0/2); pooled 0.5. A third case has no truth.
    counts = np.array([[2.0, 2.0, 2.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])  # tp, n_truth, n_pred
    stats = {"recall": lambda s: M.ratio(s["tp"], s["n_truth"], s["n_pred"])}
    iv = M.bootstrap_counts(counts, stats, ["tp", "n_truth", "n_pred"], M.bootstrap_weights(3, 500, 1))["recall"]
    assert iv.estimate == 0.5
    assert iv.low == 0.0 and iv.high == 1.0
    # Resamples drawing only the third case (prob (1/3)^3 each) have no truth but a
    # prediction: recall undefined, left out.
    assert 440 <= iv.n_valid < 500


def test_thin_curve_keeps_ends_and_shape():
    x = np.linspace(0, 1, 10001) ** 3
    y = np.sqrt(np.linspace(0, 1, 10001))
    tx, ty = M.thin_curve(x, y, 200)
    assert tx.size <= 202 and tx[0] == 0 and tx[-1] == 1 and ty[-1] == 1
    assert (np.diff(tx) >= 0).all()


def test_froc_with_few_points_samples_the_exact_curve():
    rng = np.random.default_rng(5)
    truth = rng.random((6, 12, 12)) < 0.08
    pred = rng.random((6, 12, 12)) < 0.08
    t = table_of(truth, pred)
    scores = rng.random(t.n_pred)
    full = M.froc_curve([t], [scores], "overlap")
    coarse = M.froc_curve([t], [scores], "overlap", max_points=5)
    assert coarse.thresholds.size == 6 and full.thresholds.size == t.n_pred + 1
    assert coarse.thresholds[-1] == scores.min()  # the operating point is always kept
    for thr, fp, se in zip(coarse.thresholds, coarse.fp_per_scan, coarse.sensitivity):
        k = int(np.flatnonzero(full.thresholds == thr)[0])
        assert (full.fp_per_scan[k], full.sensitivity[k]) == (fp, se)
