"""The loop, every arrow a command: detect -> review (create, readers, decisions) -> consensus
.seg.nrrd -> `cmbdetect evaluate` and `cmbdetect train --init` (a tiny run), on an oblique,
anisotropic hand-made case whose answer is known."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from CMBDetectLib.cli import main as cmbdetect
from CMBDetectLib.io import read_volume, write_volume
from CMBDetectLib.labels import read_label, read_label_file
from CMBReviewLib.store import Study
from handmade import phantom, save_dark_spot_model

# (k, j, i) centre, diameter mm: two bleeds the detector finds, one of 1 mm that its 2 mm
# size filter drops (the reader adds it as missed), on the phantom's oblique 0.45 x 0.6 x 2 mm grid.
SPHERES = [((4, 60, 50), 4.0), ((3, 90, 100), 7.0), ((4, 40, 100), 1.0)]
SHAPE = (8, 140, 150)
CASES = ("obl1", "obl2")


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    model = save_dark_spot_model(root / "model" / "dark-spot.safetensors")
    for n, case in enumerate(CASES):
        array, geometry, _ = phantom(shape=SHAPE, spheres_mm=SPHERES, seed=n)
        write_volume(array, geometry, root / "images" / f"{case}.nii.gz")
    assert cmbdetect(["detect", str(root / "images"), "-o", str(root / "det"), "--model", str(model), "-q"]) == 0
    return root, model, geometry


def _decisions(root, geometry):
    """Both readers: the 4 mm detection correct, the 7 mm one incorrect (vessel), the 1 mm bleed missed."""
    rows = []
    missed_ras = geometry.index_to_ras(np.array(SPHERES[2][0][::-1], float))
    for case in CASES:
        lesions = list(csv.DictReader(open(root / "det" / f"{case}_lesions.csv")))
        assert len(lesions) == 2
        small = next(l["id"] for l in lesions if l["size_class"] == "small")
        large = next(l["id"] for l in lesions if l["size_class"] == "large")
        for reader in ("ana", "ben"):
            rows += [
                {"case": case, "reader": reader, "decision": "correct", "lesion": small},
                {"case": case, "reader": reader, "decision": "incorrect", "lesion": large, "reason": "vessel"},
                {"case": case, "reader": reader, "decision": "missed", "r": missed_ras[0], "a": missed_ras[1], "s": missed_ras[2]},
                {"case": case, "reader": reader, "decision": "reading", "seconds": 100.0 if reader == "ana" else 60.0},
            ]
    path = root / "decisions.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "reader", "decision", "lesion", "reason", "r", "a", "s", "seconds"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def reviewed(loop):
    root, model, geometry = loop
    study = root / "study.db"
    assert cmbdetect(["review", "create", str(study), "--images", str(root / "images"), "--detections", str(root / "det")]) == 0
    assert cmbdetect(["review", "add-reader", str(study), "ana", "ben"]) == 0
    assert cmbdetect(["review", "import", str(study), str(_decisions(root, geometry))]) == 0
    assert cmbdetect(["review", "consensus", str(study), "-o", str(root / "consensus")]) == 0
    return root, model, geometry, study


def test_consensus_segmentation_is_the_agreed_lesions_on_the_image_grid(reviewed):
    root, _, geometry, _ = reviewed
    for case in CASES:
        image = read_volume(root / "images" / f"{case}.nii.gz")
        consensus = read_label(root / "consensus" / "labels" / f"{case}.seg.nrrd", case, image)
        detected = read_volume(root / "det" / f"{case}_lesions.nii.gz").array.astype(int)
        small = next(int(l["id"]) for l in csv.DictReader(open(root / "det" / f"{case}_lesions.csv")) if l["size_class"] == "small")
        ids = [v for v in np.unique(consensus) if v]
        assert len(ids) == 2, "the 4 mm bleed and the added 1 mm one; the 7 mm 'vessel' is out"
        agreed = consensus > 0
        assert np.all(agreed[detected == small]) and not np.any(agreed[(detected > 0) & (detected != small)])
        # the added lesion was grown from the click and covers the 1 mm sphere's voxels
        (ck, cj, ci), _ = SPHERES[2]
        assert agreed[ck, cj, ci]
        # and cmbdetect's own ground-truth reader puts the same voxels on the image's grid
        truth, truth_geometry = read_label_file(root / "consensus" / "labels" / f"{case}.seg.nrrd", case)
        assert truth_geometry.matches(geometry) and np.array_equal(truth > 0, agreed)


def test_evaluate_reads_the_consensus(reviewed):
    root, *_ = reviewed
    out = root / "eval"
    assert cmbdetect(["evaluate", "--pred", str(root / "det"), "--truth", str(root / "consensus"), "-o", str(out),
                      "--bootstrap", "0", "--no-html", "--quiet"]) == 0  # fmt: skip
    touch = json.loads((out / "evaluation.json").read_text())["lesion"]["rules"]["touch"]
    # per case: 2 detections of which 1 agreed; 2 agreed lesions of which 1 detected
    assert (touch["n_truth"], touch["n_pred"], touch["tp_truth"], touch["tp_pred"]) == (4, 4, 2, 2)
    assert len(list(csv.DictReader(open(out / "cases.csv")))) == 2


def test_fine_tune_reads_the_consensus(reviewed, tmp_path):
    root, model, _, _ = reviewed
    out = tmp_path / "tuned"
    code = cmbdetect([
        "train", "--data", str(root / "consensus" / "train.csv"), "--out", str(out), "--init", str(model),
        "--width", "4", "--crop", "64", "--batch-size", "2", "--steps-per-epoch", "1", "--max-epochs", "1",
        "--val-slices", "1", "--seed", "1", "-q",
    ])  # fmt: skip
    assert code == 0
    card = json.loads((out / "best.json").read_text())
    assert (out / "best.safetensors").is_file() and card["training"]["best_epoch"] >= 0


def test_report_table4_matches_the_decisions(reviewed):
    root, _, _, study = reviewed
    assert cmbdetect(["review", "report", str(study), "-o", str(root / "report"), "--bootstrap", "50"]) == 0
    stats = json.loads((root / "report" / "review.json").read_text())
    for reader in ("ana", "ben"):
        t = stats["table4"][reader]
        assert (t["correct"], t["incorrect"], t["missed"]) == (2, 2, 2)
    assert stats["reading_time"]["readers"]["ana"]["mean_s"] == 100.0
    with Study.open(study) as s:
        assert s.integrity_ok() and len(s.current_verdicts()) == 2 * 2 * 3  # 2 readers x 2 cases x (2 verdicts + 1 added)
