"""Properties that must hold for any masks: bounds, symmetries, perfect predictions."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import roc_auc_score

from CMBDetectLib.evaluation import metrics as M

SHAPE = (4, 6, 6)
masks = arrays(np.bool_, SHAPE, elements=st.booleans())
spacings = st.tuples(*[st.sampled_from([0.5, 0.8, 1.0, 2.0, 3.0])] * 3)
FAST = settings(max_examples=60, deadline=None)


def table(truth, pred, spacing=(1.0, 1.0, 1.0), probability=None):
    t, nt = M.instance_labels(truth)
    p, n_p = M.instance_labels(pred)
    return M.lesion_table(t, nt, p, n_p, spacing, None, probability)


def in_unit_or_nan(x: float) -> bool:
    return math.isnan(x) or 0.0 <= x <= 1.0


@FAST
@given(masks, masks)
def test_pixel_metrics_bounded_and_symmetric(truth, pred):
    a, b = M.pixel_counts(pred, truth), M.pixel_counts(truth, pred)
    for v in (a.dice, a.precision, a.recall):
        assert in_unit_or_nan(v)
    assert a.dice == b.dice
    assert (math.isnan(a.precision) and math.isnan(b.recall)) or a.precision == b.recall
    assert a.tp + a.fp + a.fn + a.tn == truth.size


@FAST
@given(masks, masks, spacings)
def test_rules_bounded_nested_and_consistent(truth, pred, spacing):
    t = table(truth, pred, spacing)
    paper, touch, dist = M.match_overlap(t), M.match_touch(t), M.match_centre_distance(t)
    for m in (paper, touch, dist):
        assert 0 <= m.tp_truth <= m.n_truth and 0 <= m.tp_pred <= m.n_pred
        for v in (m.precision, m.recall, m.f1):
            assert in_unit_or_nan(v)
        assert not math.isnan(m.f1)  # F1 is always defined
    # More than 40% covered implies touching, on both sides.
    assert not (paper.detected & ~touch.detected).any()
    assert not (paper.correct & ~touch.correct).any()
    # One-to-one: as many detected true lesions as correct predictions.
    assert dist.tp_truth == dist.tp_pred == len(dist.pairs)
    # Size classes partition the pixel counts and the lesions.
    whole = M.pixel_counts(pred, truth)
    parts = M.class_pixel_counts(t)
    assert sum(p.tp for p in parts.values()) == whole.tp
    assert sum(p.fp for p in parts.values()) == whole.fp
    assert sum(p.fn for p in parts.values()) == whole.fn
    det = M.class_detection_counts(t, paper)
    assert sum(d["n_truth"] for d in det.values()) == t.n_truth
    assert sum(d["detected"] for d in det.values()) == paper.tp_truth
    assert sum(d["n_pred"] for d in det.values()) == t.n_pred
    assert sum(d["correct"] for d in det.values()) == paper.tp_pred


@FAST
@given(masks, masks, spacings)
def test_touch_and_distance_rules_are_symmetric(truth, pred, spacing):
    a, b = table(truth, pred, spacing), table(pred, truth, spacing)
    ta, tb = M.match_touch(a), M.match_touch(b)
    assert (ta.tp_truth, ta.tp_pred) == (tb.tp_pred, tb.tp_truth)
    da, db = M.match_centre_distance(a), M.match_centre_distance(b)
    assert da.tp_truth == db.tp_truth
    assert da.f1 == db.f1 and ta.f1 == tb.f1


@FAST
@given(masks, spacings)
def test_perfect_prediction_scores_perfectly(truth, spacing):
    t = table(truth, truth, spacing, probability=truth.astype(np.float32))
    c = M.pixel_counts(truth, truth)
    assert c.dice == 1.0 and c.precision == 1.0 and c.recall == 1.0
    for m in (M.match_overlap(t), M.match_touch(t), M.match_centre_distance(t)):
        assert m.precision == 1.0 and m.recall == 1.0 and m.f1 == 1.0 and m.fp == 0 and m.fn == 0
    assert M.patient_outcome(t.n_truth, t.n_truth, t.n_pred) == ("TP" if truth.any() else "TN")
    for p in M.class_pixel_counts(t).values():
        assert p.dice == 1.0
    scores, labels = M.lesion_candidates(t, M.match_overlap(t))
    assert labels.all()  # no negative candidate


@FAST
@given(st.lists(st.tuples(st.integers(0, 8), st.booleans()), min_size=2, max_size=60))
def test_auc_agrees_with_scikit_learn(samples):
    scores = np.array([s / 8 for s, _ in samples])
    labels = np.array([y for _, y in samples])
    auc = M.roc_auc(scores, labels)
    if labels.all() or not labels.any():
        assert auc is None
    else:
        assert math.isclose(auc, roc_auc_score(labels, scores), abs_tol=1e-12)
        # Binned exactly (multiples of 1/8 lie on the grid): the histogram AUC is the same.
        h = M.probability_histograms(scores.reshape(1, 1, -1).astype(np.float32), labels.reshape(1, 1, -1))
        assert math.isclose(h.roc().auc, auc, abs_tol=1e-12)
        assert h.auc_error_bound() == 0.0


@FAST
@given(masks, masks)
def test_froc_ends_at_the_operating_point(truth, pred):
    t = table(truth, pred)
    scores = np.linspace(0.9, 0.1, t.n_pred) if t.n_pred else np.zeros(0)
    for rule in M.RULES:
        f = M.froc_curve([t], [scores], rule)
        m = M.match(t, rule)
        assert f.fp_per_scan[0] == 0 and f.fp_per_scan[-1] == m.fp
        if t.n_truth:
            assert f.sensitivity[0] == 0 and math.isclose(f.sensitivity[-1], m.recall)
