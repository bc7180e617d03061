"""The README's 3-case, 2-reader walk-through, run as written, and its Table 4 checked against the decisions.

The review commands run exactly as the README gives them (read from between its
`review-walkthrough` markers). Two steps are replaced by quick equivalents that write the same
files, since each has its own tests and would take minutes here: `synth` (hand-made cases in
its layout: images/, labels/ with one id per microbleed) and `detect` (its outputs written by
CMBDetect's own writers from a chosen set of lesions). The final fine-tuning step is run by
Testing/test_review_loop.py on tiny data.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from CMBDetectLib.cli import main as cmbdetect
from CMBDetectLib.detection.lesions import extract_lesions
from CMBDetectLib.detection.outputs import write_lesion_csv, write_segmentation_nrrd
from CMBDetectLib.io import write_volume
from CMBReviewLib.regiongrow import sphere_mask
from handmade import oblique_geometry

README = Path(__file__).resolve().parent.parent / "README.md"
SHAPE = (8, 96, 112)
# per case: (k, j, i) centre, diameter mm, detected?  -- true microbleeds
TRUE = [((4, 30, 30), 4.0, True), ((3, 60, 70), 6.0, True), ((4, 70, 30), 3.0, False)]
FALSE_POSITIVE = ((4, 40, 80), 4.0)


def walkthrough_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- review-walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- review-walkthrough:end -->", text, re.S)
    assert block, "README.md has lost its review walk-through"
    commands = [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]
    assert all(c[0] == ".venv/bin/cmbdetect" for c in commands)
    return [c[1:] for c in commands]


def fake_synth(out: Path, n: int, seed: int) -> None:
    geometry = oblique_geometry()
    rng = np.random.default_rng(seed)
    for index in range(n):
        image = rng.normal(400, 12, SHAPE).astype(np.float32)
        labels = np.zeros(SHAPE, np.uint16)
        for lesion_id, (centre, d, _) in enumerate(TRUE, start=1):
            m = sphere_mask(SHAPE, geometry, centre, d / 2)
            image[m] = 90.0
            labels[m] = lesion_id
        write_volume(image, geometry, out / "images" / f"case{index}.nii.gz")
        write_volume(labels, geometry, out / "labels" / f"case{index}.nii.gz")


def fake_detect(images: Path, out: Path) -> None:
    geometry = oblique_geometry()
    for image in sorted(images.glob("*.nii.gz")):
        case = image.name[: -len(".nii.gz")]
        probability = np.zeros(SHAPE, np.float32)
        for centre, d in [*((c, d) for c, d, found in TRUE if found), FALSE_POSITIVE]:
            probability[sphere_mask(SHAPE, geometry, centre, d / 2)] = 0.9
        labels, lesions = extract_lesions(probability, geometry)
        write_volume(labels, geometry, out / f"{case}_lesions.nii.gz")
        write_volume(probability, geometry, out / f"{case}_prob.nii.gz")
        write_segmentation_nrrd(out / f"{case}.seg.nrrd", labels, lesions, geometry)
        write_lesion_csv(out / f"{case}_lesions.csv", lesions)
        (out / f"{case}_summary.json").write_text(json.dumps({"case": case, "n_lesions": len(lesions), "seconds": 2.5}))


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    import os

    previous = os.getcwd()
    os.chdir(root)  # the README's paths are relative to the clone
    try:
        ran = []
        for args in walkthrough_commands():
            if args[0] == "synth":
                fake_synth(Path(option(args, "--out")), int(option(args, "--n")), int(option(args, "--seed")))
            elif args[0] == "detect":
                fake_detect(Path(args[1]), Path(option(args, "-o")))
            elif args[0] == "train":
                continue  # Testing/test_review_loop.py fine-tunes on a consensus, tiny
            else:
                extra = ["--bootstrap", "200"] if args[:2] == ["review", "report"] else []
                extra += ["--bootstrap", "0", "--no-html", "--quiet"] if args[0] == "evaluate" else []
                assert cmbdetect(args + extra) == 0, " ".join(args)
            ran.append(args[:2])
    finally:
        os.chdir(previous)
    return root / "review-demo", ran


def test_walkthrough_is_three_cases_two_readers_to_the_html_report(walked):
    demo, ran = walked
    assert ["review", "report"] in ran and ["review", "consensus"] in ran and ["evaluate", "--pred"] in ran
    assert len(list((demo / "data" / "images").iterdir())) == 3
    html = (demo / "report" / "review.html").read_text(encoding="utf-8")
    assert "<link" not in html and "<script" not in html and "src=" not in html, "self-contained"
    assert "Table 4" in html and "Fleiss" in html and "Per case" in html


def decisions(demo: Path) -> dict[str, Counter]:
    counts = {}
    for reader in ("ana", "ben"):
        with open(demo / f"{reader}.csv", newline="") as f:
            counts[reader] = Counter(row["decision"] for row in csv.DictReader(f))
    return counts


def test_table4_of_the_report_is_the_decisions_recorded(walked):
    demo, _ = walked
    recorded = decisions(demo)
    assert recorded["ana"] != recorded["ben"], "the error rate makes the two readers differ"
    with open(demo / "report" / "table4.csv", newline="") as f:
        table = {row["label"]: row for row in csv.DictReader(f)}
    html = (demo / "report" / "review.html").read_text(encoding="utf-8")
    for reader, counts in recorded.items():
        total = counts["correct"] + counts["incorrect"] + counts["missed"]
        for label in ("correct", "incorrect", "missed"):
            assert float(table[label][f"{reader}_count"]) == counts[label]
            assert float(table[label][f"{reader}_percent"]) == pytest.approx(100 * counts[label] / total)
            assert f"{counts[label]} ({100 * counts[label] / total:.1f}%)" in html
    for label in ("correct", "incorrect", "missed"):
        mean = (recorded["ana"][label] + recorded["ben"][label]) / 2
        assert float(table[label]["average_count"]) == mean


def test_simulated_ana_knows_the_truth(walked):
    demo, _ = walked
    # ana (no error rate): the two detected bleeds correct, the false positive incorrect, the third bleed missed, per case
    assert decisions(demo)["ana"] == Counter({"correct": 6, "incorrect": 3, "missed": 3, "reading": 3})


def test_evaluate_scores_detections_against_the_consensus(walked):
    demo, _ = walked
    touch = json.loads((demo / "evaluation" / "evaluation.json").read_text(encoding="utf-8"))["lesion"]["rules"]["touch"]
    assert touch["n_pred"] == 9 and 0 < touch["n_truth"] <= 9


def test_importing_the_walkthrough_decisions_again_stores_nothing(walked, monkeypatch, capsys):
    demo, _ = walked
    commands = walkthrough_commands()
    (again,) = [args for args in commands if args[:2] == ["review", "import"]]
    (report,) = [args for args in commands if args[:2] == ["review", "report"]]
    monkeypatch.chdir(demo.parent)  # the README's paths are relative to the clone
    capsys.readouterr()
    assert cmbdetect(again) == 0
    said = capsys.readouterr().out
    assert said.count("already imported") == len(again) - 3, said  # every file of the command, by name
    second = report[: report.index("-o") + 1] + ["review-demo/report-again", "--bootstrap", "200"]
    assert cmbdetect(second) == 0
    for name in ("table4.csv", "review.json", "kappa.csv", "cases.csv"):
        before = (demo / "report" / name).read_text(encoding="utf-8")
        assert (demo / "report-again" / name).read_text(encoding="utf-8") == before, name
