"""The review report as a reader of it sees it: review.json, kappa.csv and review.html of a
hand-made study whose every figure is known.

The study: one reader, ana, who is always right.
- case A: detector lesions D1 (a microbleed) and D2 (a vessel); ana: D1 correct, D2 incorrect
  (vessel), and she adds the microbleed it missed;
- case B: detector lesion D3 (a calcification); ana: incorrect (calcification);
- case C: no detector lesion; ana adds the one microbleed.
Candidates: D1 D2 D3 M_A M_C; detector 1 1 1 0 0, ana 1 0 0 1 1: no candidate that both call
"no", so her kappa against the detector is below 0 although she is right everywhere.
Cases: presence by the detector 1 1 0, by ana 1 0 1: kappa -0.5 on 3 cases, whose asymptotic
95% interval (kappa +- 1.96 SE) would reach below -1.
"""

from __future__ import annotations

import csv
import html
import json
import re

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from CMBDetectLib.io import Geometry, Volume
from CMBReviewLib import statistics as S
from CMBReviewLib.analysis import analyse
from CMBReviewLib.report import write_report
from CMBReviewLib.store import Study
from CMBReviewLib.study import add_missed

READING = {"A": 60.0, "B": 30.0, "C": 45.0}
DETECTOR_SECONDS = {"A": 2.0, "B": 3.0, "C": 1.0}


def _blob(image: Volume, x_mm: float) -> np.ndarray:
    m = np.zeros(image.shape, bool)
    i = int(round(x_mm / 0.5))
    m[4:7, 29:32, i - 1 : i + 2] = True
    return m


@pytest.fixture
def report(tmp_path):
    image = Volume(np.full((10, 60, 260), 400.0, np.float32), Geometry((0.5, 0.5, 1.0), (0.0, 0.0, 0.0)))
    with Study.create(tmp_path / "s.db") as study:
        ids = {name: study.add_case(name, f"{name}.nii.gz", detector_seconds=DETECTOR_SECONDS[name]) for name in "ABC"}
        study.add_detector_lesions(ids["A"], [{"id": 1, "ras": (-5.0, -15.0, 5.0)}, {"id": 2, "ras": (-25.0, -15.0, 5.0)}])
        study.add_detector_lesions(ids["B"], [{"id": 1, "ras": (-5.0, -15.0, 5.0)}])
        ana = study.add_reader("ana")
        d1, d2 = (l.id for l in study.lesions(ids["A"]))
        (d3,) = (l.id for l in study.lesions(ids["B"]))
        study.record_verdict(d1, ana, "correct")
        study.record_verdict(d2, ana, "incorrect", "vessel")
        study.record_verdict(d3, ana, "incorrect", "calcification")
        add_missed(study, "A", "ana", _blob(image, 60.0), image)
        add_missed(study, "C", "ana", _blob(image, 60.0), image)
        for name, seconds in READING.items():
            study.record_reading(ids[name], ana, seconds)
        stats = analyse(study, n_boot=0)
    paths = write_report(stats, tmp_path / "report")
    page = paths["html"].read_text(encoding="utf-8")
    return json.loads(paths["json"].read_text(encoding="utf-8")), page, paths


def section(page: str, title: str) -> str:
    """The HTML from the heading holding `title` to the next heading."""
    match = re.search(rf"<h2>[^<]*{re.escape(title)}[^<]*</h2>(.*?)(?=<h2>|</body>)", page, re.S)
    assert match, f"no section {title!r} in the page"
    return match.group(1)


def test_no_kappa_interval_leaves_minus_one_to_one(report):
    stats, page, paths = report
    presence = stats["case_agreement"]["presence"]["reader_vs_detector"]["ana"]
    assert presence["kappa"] == pytest.approx(cohen_kappa_score([1, 0, 1], [1, 1, 0]))
    assert presence["kappa"] - 1.959964 * presence["se"] < -1, "the study exercises the clipping"
    with open(paths["kappa"], newline="") as f:
        rows = list(csv.DictReader(f))
    blocks = [stats["lesion_agreement"]["reader_vs_detector"]["ana"], presence, stats["case_agreement"]["count_category"]["reader_vs_detector"]["ana"]]
    for k in [*blocks, *({"ci95": [float(r["ci95_low"]), float(r["ci95_high"])]} for r in rows if r["ci95_low"])]:
        if k.get("ci95"):
            low, high = k["ci95"]
            assert -1 <= low <= high <= 1
    assert presence["ci95"][0] == -1 and presence["ci95"][0] <= presence["kappa"] <= presence["ci95"][1]
    assert "clipped" in presence["note"]
    cell = re.search(r"ana vs detector</td><td>\d+</td><td>(.*?)</td>", section(page, "Case-level")).group(1)
    assert "-1.00 to" in cell and "clipped" in cell


def test_the_papers_kappa_is_shown_with_why_ours_differs(report):
    stats, page, _ = report
    k = stats["lesion_agreement"]["reader_vs_detector"]["ana"]
    assert k["kappa"] < 0, "a reader who is always right, below 0 against the detector"
    assert k["agreed_no"] == 0
    paragraph = next(p for p in re.findall(r"<p[^>]*>(.*?)</p>", page, re.S) if "0.79" in p)
    text = html.unescape(re.sub(r"<[^>]+>", "", paragraph))
    assert f"{k['agreed_no']} of {k['n']} candidates" in text, "how many agreed negatives this kappa had"
    assert "however right" in text and "unit" in text


def test_each_figure_says_how_many_cases_it_rests_on(report):
    stats, page, _ = report
    assert stats["table4"]["ana"]["cases"] == 3
    assert stats["lesion_agreement"]["reader_vs_detector"]["ana"]["cases"] == 3
    assert stats["case_agreement"]["presence"]["reader_vs_detector"]["ana"]["n"] == 3
    table4 = section(page, "Table 4")
    assert re.search(r"<td class='l'>Cases</td><td>3</td>", table4)
    lesions = section(page, "Agreement over")
    assert re.search(r"ana vs detector</td><td>5</td><td>3</td>", lesions), "candidates, then cases"
    cases = section(page, "Case-level")
    assert re.search(r"<th>Cases</th>", cases) and re.search(r"ana vs detector</td><td>3</td>", cases)


def test_incorrect_labels_by_mimic_and_the_time_ratio_are_on_the_page(report):
    stats, page, _ = report
    reasons = stats["incorrect_reasons"]["ana"]
    assert (reasons["vessel"], reasons["calcification"]) == (1, 1)
    mimics = section(page, "Incorrect labels by mimic")
    for reason, n in reasons.items():
        assert re.search(rf"<td class='l'>{reason}</td><td>{n}</td>", mimics)
    rt = stats["reading_time"]
    assert rt["reader_to_detector_ratio"] == pytest.approx(np.mean(list(READING.values())) / np.mean(list(DETECTOR_SECONDS.values())))
    assert f"{rt['reader_to_detector_ratio']:.1f} times" in section(page, "Reading time")


def test_clipped_intervals_are_said_so():
    k = S.cohen(np.array([1, 0, 1]), np.array([1, 1, 0]), 2)
    assert k["ci95"][0] == -1.0 and "clipped" in k["note"]
    # kappa at -1 or 1 has a zero asymptotic SE: no zero-width interval is claimed
    k = S.cohen(np.array([1, 0, 1, 0]), np.array([0, 1, 0, 1]), 2)
    assert k["kappa"] == -1.0 and k["ci95"] is None and "standard error" in k["note"]
