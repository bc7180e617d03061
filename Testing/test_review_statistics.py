"""Every review statistic against hand-computed examples and against statsmodels / scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import aggregate_raters, cohens_kappa, fleiss_kappa

from CMBDetectLib.io import Geometry, Volume
from CMBReviewLib import statistics as S
from CMBReviewLib.analysis import analyse
from CMBReviewLib.matching import match_candidates
from CMBReviewLib.store import Study
from CMBReviewLib.study import add_missed

# --- Cohen's kappa ------------------------------------------------------------------------


def ratings_from_table(table):
    a, b = [], []
    for i, row in enumerate(table):
        for j, n in enumerate(row):
            a += [i] * n
            b += [j] * n
    return np.array(a), np.array(b)


def test_cohen_hand_example():
    # 2x2 table [[20, 5], [10, 15]]: po = 0.7, pe = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4
    a, b = ratings_from_table([[20, 5], [10, 15]])
    k = S.cohen(a, b, 2)
    assert k["kappa"] == pytest.approx(0.4)
    assert k["observed_agreement"] == pytest.approx(0.7)
    assert k["n"] == 50 and k["table"] == [[20, 5], [10, 15]]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_cat", [2, 5])
def test_cohen_agrees_with_statsmodels_and_sklearn(seed, n_cat):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n_cat, 60)
    b = np.where(rng.random(60) < 0.6, a, rng.integers(0, n_cat, 60))
    k = S.cohen(a, b, n_cat)
    assert k["kappa"] == pytest.approx(cohen_kappa_score(a, b, labels=list(range(n_cat))))
    table = np.zeros((n_cat, n_cat))
    np.add.at(table, (a, b), 1)
    ref = cohens_kappa(table)
    assert k["se"] == pytest.approx(ref.std_kappa)
    assert k["ci95"] == pytest.approx([ref.kappa_low, ref.kappa_upp])
    assert k["ci95"][0] == pytest.approx(k["kappa"] - 1.959964 * k["se"], abs=1e-5)


def test_cohen_undefined_when_nobody_varies():
    k = S.cohen(np.ones(5, int), np.ones(5, int), 2)
    assert k["kappa"] is None and "same category" in k["note"] and k["observed_agreement"] == 1.0
    assert S.cohen(np.array([], int), np.array([], int), 2)["kappa"] is None
    # one rater constant: kappa 0 by construction (sklearn agrees), and no degenerate zero-width CI
    a, b = np.ones(6, int), np.array([1, 1, 0, 1, 0, 1])
    k = S.cohen(a, b, 2)
    assert k["kappa"] == 0.0 == pytest.approx(cohen_kappa_score(a, b)) and k["ci95"] is None and "by construction" in k["note"]


# --- Fleiss' kappa ------------------------------------------------------------------------

# Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories, kappa 0.210.
FLEISS_COUNTS = np.array(
    [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
)  # fmt: skip


def ratings_from_counts(counts):
    return np.array([[c for c, n in enumerate(row) for _ in range(n)] for row in counts])


def test_fleiss_hand_examples():
    k = S.fleiss(ratings_from_counts(FLEISS_COUNTS), 5, n_boot=0)
    assert k["kappa"] == pytest.approx(0.20993, abs=1e-4)
    # two readers, three items: (1,1), (0,0), (1,0): P = 2/3, Pe = 1/2, kappa = 1/3
    k = S.fleiss(np.array([[1, 1], [0, 0], [1, 0]]), 2, n_boot=0)
    assert k["kappa"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(3))
def test_fleiss_agrees_with_statsmodels_and_its_bootstrap_ci_is_seeded(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, 80)
    ratings = np.stack([np.where(rng.random(80) < 0.8, truth, 1 - truth) for _ in range(3)], axis=1)
    k = S.fleiss(ratings, 2, n_boot=500, seed=4)
    assert k["kappa"] == pytest.approx(fleiss_kappa(aggregate_raters(ratings)[0], method="fleiss"))
    low, high = k["ci95"]
    assert low < k["kappa"] < high and high - low < 0.5
    assert S.fleiss(ratings, 2, n_boot=500, seed=4)["ci95"] == k["ci95"]


def test_fleiss_degenerate_inputs():
    assert S.fleiss(np.ones((4, 3), int), 2, n_boot=0)["kappa"] is None
    assert S.fleiss(np.zeros((0, 2), int), 2)["kappa"] is None
    assert S.fleiss(np.ones((4, 1), int), 2)["kappa"] is None


# --- Table 4 ------------------------------------------------------------------------------


def test_table4_average_reproduces_the_papers_average_column():
    paper = [(787, 27, 20), (770, 44, 16), (790, 24, 21), (784, 30, 26), (761, 53, 20)]
    rows = [S.Table4Row(*r) for r in paper]
    assert [round(r.percent("correct"), 1) for r in rows] == [94.4, 92.8, 94.6, 93.3, 91.2]
    avg = S.table4_average(rows)
    assert (avg.correct, avg.incorrect, avg.missed) == pytest.approx((778.4, 35.6, 20.6))
    assert [round(avg.percent(k), 1) for k in ("correct", "incorrect", "missed")] == [93.3, 4.3, 2.5]


@pytest.mark.parametrize("n, category", [(0, "0"), (1, "1"), (2, "2-4"), (4, "2-4"), (5, "5-10"), (10, "5-10"), (11, ">10")])
def test_count_categories(n, category):
    assert S.COUNT_CATEGORIES[S.count_category(n)] == category


# --- Matching and the whole analysis on a hand-made study ---------------------------------


def _image() -> Volume:
    return Volume(np.full((10, 60, 260), 400.0, np.float32), Geometry((0.5, 0.5, 1.0), (0.0, 0.0, 0.0)))


def _blob_at(image: Volume, x_mm: float) -> np.ndarray:
    """A small cube whose centroid lies at LPS (x_mm, 15, 5), i.e. RAS (-x_mm, -15, 5)."""
    m = np.zeros(image.shape, bool)
    i = int(round(x_mm / 0.5))
    m[4:7, 29:32, i - 1 : i + 2] = True
    return m


@pytest.fixture
def hand_study(tmp_path):
    """Case A: detector lesions D1-D3; ana: correct, correct, incorrect + adds M at x=60;
    ben: correct, incorrect, incorrect + adds M at x=61 (same candidate) and at x=100.
    Case B: no detector lesion; ana completes it finding nothing; ben adds one lesion."""
    image = _image()
    study = Study.create(tmp_path / "s.db", match_radius_mm=5.0)
    a = study.add_case("A", "A.nii.gz", detector_seconds=2.0)
    b = study.add_case("B", "B.nii.gz", detector_seconds=4.0)
    study.add_detector_lesions(a, [{"id": n + 1, "ras": (-x, -15.0, 5.0)} for n, x in enumerate((5.0, 25.0, 45.0))])
    ana, ben = study.add_reader("ana"), study.add_reader("ben")
    d1, d2, d3 = (l.id for l in study.lesions(a))
    for lesion, v in zip((d1, d2, d3), ("correct", "correct", "incorrect")):
        study.record_verdict(lesion, ana, v, "vessel" if v == "incorrect" else None)
    for lesion, v in zip((d1, d2, d3), ("correct", "incorrect", "incorrect")):
        study.record_verdict(lesion, ben, v, "calcification" if v == "incorrect" else None, "possible" if lesion == d1 else "definite")
    add_missed(study, "A", "ana", _blob_at(image, 60.0), image)
    add_missed(study, "A", "ben", _blob_at(image, 61.0), image)
    add_missed(study, "A", "ben", _blob_at(image, 100.0), image)
    add_missed(study, "B", "ben", _blob_at(image, 30.0), image)
    study.record_reading(a, ana, 100.0)
    study.record_reading(a, ben, 50.0, completed=False)
    study.record_reading(a, ben, 30.0)
    study.record_reading(b, ana, 20.0)
    study.record_reading(b, ben, 40.0)
    yield study
    study.close()


def test_matching_by_location(hand_study):
    candidates = match_candidates(hand_study.lesions(), 5.0)
    assert len(candidates) == 6  # D1, D2, D3, M60/61, M100, B's one
    shared = [c for c in candidates if len(c.added) == 2]
    assert len(shared) == 1 and shared[0].detector_lesion is None
    # a radius below the 1 mm between the two added lesions splits them
    assert len(match_candidates(hand_study.lesions(), 0.5)) == 7


def test_analysis_matches_the_hand_computation(hand_study):
    stats = analyse(hand_study, n_boot=200)
    t4 = stats["table4"]
    assert {k: t4["ana"][k] for k in ("correct", "incorrect", "missed", "pending")} == {"correct": 2, "incorrect": 1, "missed": 1, "pending": 0}
    assert {k: t4["ben"][k] for k in ("correct", "incorrect", "missed")} == {"correct": 1, "incorrect": 2, "missed": 3}
    assert t4["ana"]["correct_percent"] == pytest.approx(50.0) and t4["ben"]["missed_percent"] == pytest.approx(50.0)
    assert t4["ben"]["possible"] == 1
    assert t4["average"]["correct"] == 1.5 and t4["average"]["missed_percent"] == pytest.approx(200 / 5)

    # Candidates in order: D1 D2 D3 M60 M100 (case A), M30 (case B).
    det = [1, 1, 1, 0, 0, 0]
    ana = [1, 1, 0, 1, 0, 0]
    ben = [1, 0, 0, 1, 1, 1]
    la = stats["lesion_agreement"]
    assert [c["ratings"]["ana"] for c in stats["candidates"]] == ana
    assert [c["ratings"]["ben"] for c in stats["candidates"]] == ben
    assert la["reader_vs_detector"]["ana"]["kappa"] == pytest.approx(cohen_kappa_score(ana, det))
    # by hand: ana vs detector: po = 4/6, pe = 3/6*3/6 + 3/6*3/6 = 1/2, kappa = 1/3
    assert la["reader_vs_detector"]["ana"]["kappa"] == pytest.approx(1 / 3)
    assert la["pairwise_readers"]["ana vs ben"]["kappa"] == pytest.approx(cohen_kappa_score(ana, ben))
    fl = la["fleiss_readers"]
    assert fl["kappa"] == pytest.approx(fleiss_kappa(aggregate_raters(np.c_[ana, ben])[0]))
    assert fl["n"] == 6

    # Case level: counts det [3, 0], ana [3, 0], ben [3, 1].
    rows = {c["case"]: c for c in stats["cases"]}
    assert (rows["A"]["readers"]["ana"]["microbleeds"], rows["B"]["readers"]["ben"]["microbleeds"]) == (3, 1)
    presence = stats["case_agreement"]["presence"]["reader_vs_detector"]
    assert presence["ana"]["kappa"] == pytest.approx(1.0)
    assert presence["ben"]["kappa"] == pytest.approx(cohen_kappa_score([1, 1], [1, 0]))
    cat = stats["case_agreement"]["count_category"]["reader_vs_detector"]
    assert cat["ben"]["kappa"] == pytest.approx(cohen_kappa_score([2, 1], [2, 0], labels=list(range(5))))

    # Reading time: sums of sittings per case, then mean/median over cases.
    rt = stats["reading_time"]
    assert rt["readers"]["ben"]["mean_s"] == pytest.approx((80 + 40) / 2)
    assert rt["detector"]["mean_s"] == pytest.approx(3.0)
    assert rt["reader_to_detector_ratio"] == pytest.approx(((120 / 2 + 120 / 2) / 2) / 3.0)


def test_unreviewed_candidates_are_left_out_not_counted_as_no(tmp_path):
    with Study.create(tmp_path / "s.db") as study:
        c = study.add_case("A", "A.nii.gz")
        study.add_detector_lesions(c, [{"id": 1, "ras": (0, 0, 0)}, {"id": 2, "ras": (20, 0, 0)}])
        ana = study.add_reader("ana")
        study.add_reader("ben")
        d1 = study.lesions(c)[0].id
        study.record_verdict(d1, ana, "correct")
        stats = analyse(study, n_boot=0)
        assert stats["table4"]["ana"]["pending"] == 1 and stats["table4"]["ben"]["pending"] == 2
        assert stats["lesion_agreement"]["reader_vs_detector"]["ana"]["n"] == 1
        assert stats["lesion_agreement"]["fleiss_readers"]["n"] == 0
        assert stats["cases"][0]["readers"]["ana"]["reviewed"] is False
