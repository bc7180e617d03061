"""`cmbdetect adapt`: a model folder (U-Net + its own classifier, named relative to the card),
the site's samples for stage 2, and the command end to end on tiny synthetic cases."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from CMBDetectLib import models


def _model_folder(folder: Path) -> Path:
    """A model folder as `adapt` writes it, made of the shipped weights (their cards' sha256
    still hold): unet.safetensors whose card names classifier.safetensors, relative."""
    folder.mkdir(parents=True)
    registry = models.read_registry()
    unet = next(e for e in registry["models"] if e["id"] == registry["default"])
    shutil.copy(models.models_dir() / unet["file"], folder / "unet.safetensors")
    card = json.loads(models.card_path(models.models_dir() / unet["file"]).read_text())
    classifier_path, _ = models.resolve(card["candidate_classifier"])
    shutil.copy(classifier_path, folder / "classifier.safetensors")
    shutil.copy(classifier_path.with_suffix(".json"), folder / "classifier.json")
    card["candidate_classifier"] = "classifier.safetensors"
    (folder / "unet.json").write_text(json.dumps(card))
    return folder


def test_a_model_folder_loads_its_unet_and_its_own_classifier_from_any_working_directory(tmp_path, monkeypatch):
    from CMBDetectLib.detection.inference import select_device
    from CMBDetectLib.detection.pipeline import (
        DetectionParams,
        get_model,
        stage_two_classifier,
    )

    folder = _model_folder(tmp_path / "site" / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A classifier.safetensors in the working directory must not be the one loaded.
    shutil.copy(folder / "classifier.safetensors", elsewhere / "classifier.safetensors")
    monkeypatch.chdir(elsewhere)
    for spec in (str(folder), str(Path("..") / "site" / "model")):
        model = get_model(spec, select_device("cpu"))
        assert model.path.resolve() == (folder / "unet.safetensors").resolve()
        classifier = stage_two_classifier(DetectionParams(model=spec), model)
        assert classifier is not None and classifier.path.resolve() == (folder / "classifier.safetensors").resolve()


def test_a_folder_without_unet_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet.safetensors"):
        models.resolve(str(tmp_path))


# ---------------------------------------------------------------------------- stage 2 samples


def _blob(shape, centre, radius):
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2


def test_site_samples_label_candidates_from_the_truth_and_add_the_lesions_stage_one_missed():
    from CMBDetectLib.detection.candidates import StageSettings
    from CMBDetectLib.detection.classifier import ClassifierConfig
    from CMBDetectLib.detection.records import CLASSES, MICROBLEED
    from CMBDetectLib.io import Geometry, Volume
    from CMBDetectLib.training.adapt import CaseArrays, site_samples

    shape = (24, 48, 48)
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, shape).astype(np.float32)
    found, missed, false = (8, 12, 12), (16, 34, 34), (12, 12, 36)
    truth = np.zeros(shape, np.int64)
    truth[_blob(shape, found, 2)] = 1
    truth[_blob(shape, missed, 2)] = 2
    probability = np.zeros(shape, np.float32)
    probability[_blob(shape, found, 2)] = 0.9  # stage 1 finds lesion 1
    probability[_blob(shape, false, 2)] = 0.9  # and proposes a spot outside the truth
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    arrays = CaseArrays(Volume(image, geometry), truth, None, None)
    s = site_samples(arrays, probability, StageSettings(bridge_slices=1), ClassifierConfig())
    by_source = {src: sorted(CLASSES[c] for c in s["labels"][s["sources"] == src]) for src in ("unet", "missed")}
    assert by_source == {"unet": sorted(["microbleed", "other"]), "missed": ["microbleed"]}
    assert s["patches"].shape[0] == 3 and not bool(s["has_phase"])
    # The missed lesion's patch is centred on it: its centre voxel is the lesion's (the patch's
    # magnitude there is what the image holds at the lesion, not the background elsewhere).
    image_with_dark_missed = image.copy()
    image_with_dark_missed[truth == 2] = 0.0
    dark = site_samples(CaseArrays(Volume(image_with_dark_missed, geometry), truth, None, None), probability,
                        StageSettings(bridge_slices=1), ClassifierConfig())  # fmt: skip
    centre = ClassifierConfig().patch_size // 2
    assert dark["patches"][dark["sources"] == "missed"][0, 0, centre, centre, centre] < 0.2
    assert MICROBLEED == CLASSES.index("microbleed")
    # Where the site has a mimic map, a false candidate takes the mimic it lies on.
    mimics = np.zeros(shape, np.int16)
    mimics[_blob(shape, false, 2)] = 1
    named = site_samples(CaseArrays(Volume(image, geometry), truth, None, mimics), probability, StageSettings(bridge_slices=1), ClassifierConfig())
    assert sorted(CLASSES[c] for c in named["labels"][named["sources"] == "unet"]) == ["microbleed", "vein"]


def test_the_case_split_is_seeded_and_leaves_a_case_on_each_side():
    from CMBDetectLib.training.adapt import split_cases

    names = [f"c{i}" for i in range(10)]
    fit, cal = split_cases(names, 0.3, 4)
    assert (fit, cal) == split_cases(list(reversed(names)), 0.3, 4)
    assert len(cal) == 3 and not set(fit) & set(cal) and sorted(fit + cal) == names
    assert [len(x) for x in split_cases(["a", "b"], 0.9, 0)] == [1, 1]


# ---------------------------------------------------------------------------- the command


def _shipped_hashes() -> dict[str, str]:
    return {p.name: models.sha256_of(p) for p in sorted(models.models_dir().iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Four small synthetic cases whose truth leaves out every third bleed, as a site's readers
    might: stage 1's candidates on those are false ones, for stage 2 to learn and calibrate on."""
    from CMBDetectLib.io import write_volume
    from CMBDetectLib.synth import generate_case

    root = tmp_path_factory.mktemp("site")
    for index in range(4):
        case = generate_case(seed=11, index=index, matrix=(160, 160), n_slices=16, n_microbleeds=16, field_strength_t=3.0,
                             slice_thickness_mm=1.5, domain="shifted", vein_density=2.0)  # fmt: skip
        truth = np.where(np.isin(case.labels, np.arange(1, case.labels.max() + 1, 3)), 0, case.labels).astype(np.uint16)
        write_volume(case.image.array, case.image.geometry, root / "images" / f"{case.name}.nii.gz")
        write_volume(truth, case.image.geometry, root / "truth" / f"{case.name}.nii.gz")
    return root


@pytest.fixture(scope="module")
def adapted(site, tmp_path_factory):
    from CMBDetectLib.cli import main

    before = _shipped_hashes()
    out = tmp_path_factory.mktemp("adapted") / "site-model"
    code = main(["adapt", "--images", str(site / "images"), "--truth", str(site / "truth"), "-o", str(out),
                 "--max-minutes", "0.3", "--calibration-fraction", "0.5", "-q"])  # fmt: skip
    return code, out, before


def test_adapt_writes_a_model_folder_that_detect_loads_with_its_own_classifier(adapted, site, tmp_path):
    from CMBDetectLib.commands.detect import main as detect_main

    code, out, before = adapted
    assert code == 0
    assert _shipped_hashes() == before  # the shipped files are read, never written
    card = json.loads((out / "unet.json").read_text())
    assert card["candidate_classifier"] == "classifier.safetensors"
    a = card["adaptation"]
    assert sorted(a["cases"]["fit"] + a["cases"]["calibration"]) == sorted(p.name[: -len(".nii.gz")] for p in (site / "images").iterdir())
    first = a["inputs"][0]
    assert first["image_sha256"] == models.sha256_of(first["image"]) and first["truth_sha256"] == models.sha256_of(first["truth"])
    registry = models.read_registry()
    default = next(e for e in registry["models"] if e["id"] == registry["default"])
    assert a["adapted_from"]["model"] == default["id"] and a["adapted_from"]["sha256"] == default["sha256"]
    assert set(a["calibration_cases_figures"]) == {"no_phase", "phase"}
    classifier_card = json.loads((out / "classifier.json").read_text())
    assert set(classifier_card["operating_points"]) >= {"default", "count", "review"}
    # The shipped base has a context model: its classifier is kept, byte for byte in its tensors,
    # and the context model is refitted towards the site on every case, out of fold.
    assert a["classifier"]["kept"] == "base" and a["classifier"]["context_refitted"] is True
    fit = classifier_card["calibration_fit"]
    assert fit["out_of_fold"] is True and sorted(fit["calibration_cases"]) == sorted(a["cases"]["stage_2"]) == sorted(a["cases"]["fit"] + a["cases"]["calibration"])
    assert "refitted_towards" in fit["no_phase"]["context_model"]
    from CMBDetectLib.detection.context import ContextModel
    from CMBDetectLib.detection.pipeline import card_classifier, get_classifier
    import torch
    from safetensors.torch import load_file

    shipped = get_classifier(str(card_classifier(models.load_model(default["id"]))))
    refitted = ContextModel.from_dict(classifier_card["context"]["no_phase"])
    assert refitted.features == shipped.context_model(False).features and refitted != shipped.context_model(False)
    own, base = load_file(str(out / "classifier.safetensors")), load_file(str(shipped.path))
    assert own.keys() == base.keys() and all(torch.equal(own[k], base[k]) for k in base)

    image = sorted((site / "images").iterdir())[0]
    assert detect_main([str(image), "-o", str(tmp_path / "det"), "--model", str(out), "-q"]) == 0
    summary = json.loads(next((tmp_path / "det").glob("*_summary.json")).read_text())
    used = summary["params_fingerprinted"]
    assert used["classifier_sha256"] == models.sha256_of(out / "classifier.safetensors") == classifier_card["sha256"]
    assert used["model_sha256"] == models.sha256_of(out / "unet.safetensors")
    assert summary["candidate_stage"]["classifier_id"] == classifier_card["id"] == "cmbdetect-adapted-candidates"
    assert summary["candidate_stage"]["context_model"] is True


def test_adapt_refuses_to_write_over_a_model_folder(adapted, site, capsys):
    from CMBDetectLib.cli import main

    _, out, _ = adapted
    weights = models.sha256_of(out / "unet.safetensors")
    code = main(["adapt", "--images", str(site / "images"), "--truth", str(site / "truth"), "-o", str(out), "-q"])
    assert code == 2 and "already holds a model" in capsys.readouterr().err
    assert models.sha256_of(out / "unet.safetensors") == weights


def test_bad_inputs_are_error_lines_naming_the_case_and_nothing_is_written(site, tmp_path, capsys):
    from CMBDetectLib.cli import main
    from CMBDetectLib.io import read_volume, write_volume

    def run(images, truth) -> str:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert main(["adapt", "--images", str(images), "--truth", str(truth), "-o", str(out), "-q"]) == 2
        assert not out.exists()
        return capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "error: no images" in run(empty, site / "truth")
    partial = tmp_path / "partial"
    partial.mkdir()
    first, second = sorted((site / "truth").iterdir())[:2]
    shutil.copy(first, partial / first.name)
    err = run(site / "images", partial)
    lonely = second.name[: -len(".nii.gz")]
    assert f"error: {lonely}: no label map" in err and first.name[: -len(".nii.gz")] + ":" not in err
    shifted = tmp_path / "shifted"
    shutil.copytree(site / "truth", shifted)
    label = read_volume(shifted / first.name)
    g = label.geometry
    write_volume(label.array, type(g)(tuple(s * 1.5 for s in g.spacing), g.origin, g.direction), shifted / first.name)
    err = run(site / "images", shifted)
    assert err.startswith(f"error: {first.name[: -len('.nii.gz')]}: ") and "grid" in err


def test_classifier_fine_tuning_starts_from_the_base_and_keeps_it_when_no_epoch_beats_it(tmp_path):
    import torch
    from CMBDetectLib.detection.candidates import StageSettings
    from CMBDetectLib.training.candidates import (
        CandidateSet,
        CandidateTrainConfig,
        train_classifier,
    )

    rng = np.random.default_rng(0)
    n = 48
    labels = np.array([0, 5] * (n // 2))
    patches = rng.random((n, 3, 12, 12, 12)).astype(np.float32) * 0.2 + 0.8
    patches[labels == 0, 0, 4:8, 4:8, 4:8] = 0.0  # microbleeds: a dark centre; "other": none
    data = CandidateSet(
        patches=patches.astype(np.float16), labels=labels, cases=np.array([f"c{(i // 2) % 4}" for i in range(n)]),
        has_phase=np.zeros(n, bool), sources=np.array(["unet"] * n, "U9"),
    )  # fmt: skip
    # A base that has learnt the task ...
    torch.manual_seed(0)
    learn = CandidateTrainConfig(epochs=6, samples_per_epoch=64, batch_size=16, stop_patience=6, width=4, patch_size=12, plant_p=0.0, cartoon_p=0.0, black_level_p=0.0)
    train_classifier(data, tmp_path / "base", learn, StageSettings(), {"id": "b", "version": "1"})
    from CMBDetectLib.detection.candidates import load_classifier_file

    base = load_classifier_file(tmp_path / "base" / "best.safetensors").network
    before = {k: v.clone() for k, v in base.state_dict().items()}
    # A learning rate that wrecks the network in one step: the base (epoch 0) must be what is kept.
    config = CandidateTrainConfig(epochs=1, samples_per_epoch=16, batch_size=8, learning_rate=1e4, stop_patience=5, width=99,
                                  plant_p=0.0, cartoon_p=0.0, black_level_p=0.0)  # fmt: skip
    card = train_classifier(data, tmp_path / "tuned", config, StageSettings(), {"id": "t", "version": "1"}, init=base)
    assert card["training"]["best_epoch"] == 0 and card["network"]["width"] == 4
    from safetensors.torch import load_file

    kept = load_file(str(tmp_path / "tuned" / "best.safetensors"))
    assert all(torch.equal(kept[k], before[k]) for k in before)
    assert all(torch.equal(base.state_dict()[k], before[k]) for k in before)  # the base itself is untouched


# ---------------------------------------------------------------------------- a review study as the site's cases


def _reviewed_study(root: Path, rows_for) -> Path:
    """Two hand-made cases (test_review_walkthrough: three bleeds, the detector finds two and
    one false spot), one reader whose decisions `rows_for(case, detections, truth, geometry)` gives."""
    import csv

    from CMBDetectLib.cli import main
    from CMBDetectLib.io import read_volume
    from test_review_walkthrough import fake_detect, fake_synth

    fake_synth(root / "data", 2, seed=0)
    fake_detect(root / "data" / "images", root / "det")
    study = root / "study.db"
    assert main(["review", "create", str(study), "--images", str(root / "data" / "images"), "--detections", str(root / "det")]) == 0
    assert main(["review", "add-reader", str(study), "ana"]) == 0
    rows = []
    for case in ("case0", "case1"):
        detections = read_volume(root / "det" / f"{case}_lesions.nii.gz")
        truth = read_volume(root / "data" / "labels" / f"{case}.nii.gz")
        rows += rows_for(case, np.rint(detections.array).astype(int), np.rint(truth.array).astype(int), truth.geometry)
    decisions = root / "decisions.csv"
    with open(decisions, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "reader", "decision", "lesion", "reason", "r", "a", "s", "seconds"])
        w.writeheader()
        w.writerows(rows)
    assert main(["review", "import", str(study), str(decisions)]) == 0
    return study


def _vessel_and_missed(case, detections, truth, geometry):
    """Correct where a detection is on a bleed, "incorrect: vessel" elsewhere; the bleed the
    detector missed added by a click at its centre (no diameter: grown as in Slicer)."""
    from scipy import ndimage

    rows = []
    for lesion in range(1, detections.max() + 1):
        on_bleed = bool((truth[detections == lesion] > 0).any())
        rows.append({"case": case, "reader": "ana", "decision": "correct" if on_bleed else "incorrect", "lesion": lesion,
                     "reason": None if on_bleed else "vessel"})  # fmt: skip
    for bleed in np.setdiff1d(np.unique(truth[truth > 0]), np.unique(truth[detections > 0])):
        centre = np.array(ndimage.center_of_mass(truth == bleed))[::-1]
        r, a, s = geometry.index_to_ras(centre)
        rows.append({"case": case, "reader": "ana", "decision": "missed", "r": r, "a": a, "s": s})
    rows.append({"case": case, "reader": "ana", "decision": "reading", "seconds": 90})
    return rows


def test_a_study_gives_microbleeds_for_correct_and_missed_lesions_and_a_vein_for_an_incorrect_vessel(tmp_path):
    from CMBDetectLib.detection.candidates import StageSettings
    from CMBDetectLib.detection.classifier import ClassifierConfig
    from CMBDetectLib.detection.records import CLASSES
    from CMBDetectLib.io import read_volume
    from CMBDetectLib.training.adapt import read_case, site_samples
    from CMBReviewLib.adaptation import ReviewStudy

    study = _reviewed_study(tmp_path, _vessel_and_missed)
    source = ReviewStudy(study)
    cases = source.cases(tmp_path / "work")
    assert [c.name for c in cases] == ["case0", "case1"] and all(c.verdicts for c in cases)
    provenance = source.provenance()
    assert provenance["study_sha256"] == models.sha256_of(study) and provenance["readers"] == ["ana"]
    assert [c["mimics"] for c in provenance["cases"]] == [{"vein": 1}, {"vein": 1}]
    arrays = read_case(cases[0])
    truth = np.rint(read_volume(tmp_path / "data" / "labels" / "case0.nii.gz").array).astype(int)
    detections = np.rint(read_volume(tmp_path / "det" / "case0_lesions.nii.gz").array).astype(int)
    assert arrays.truth.max() == 3  # two correct detections and the missed bleed
    missed = np.setdiff1d(np.unique(truth[truth > 0]), np.unique(truth[detections > 0]))
    assert len(missed) == 1 and (arrays.truth[truth == missed[0]] > 0).mean() > 0.5  # its grown mask
    false = (detections > 0) & (truth == 0)
    assert (arrays.mimics[false] == CLASSES.index("vein")).all() and (arrays.mimics[~false] == 0).all()

    def sources(probability):
        s = site_samples(arrays, probability, StageSettings(bridge_slices=1), ClassifierConfig())
        return sorted((str(src), CLASSES[c]) for src, c in zip(s["sources"], s["labels"]))

    # Stage 1 proposes what the detector found: the missed bleed is a microbleed sample of its own,
    # the false detection a vein.
    found = (detections > 0).astype(np.float32) * 0.9
    assert sources(found) == [("missed", "microbleed"), ("unet", "microbleed"), ("unet", "microbleed"), ("unet", "vein")]
    # Stage 1 proposes nothing: every bleed is a microbleed sample and the detection judged a vessel still a vein.
    assert sources(np.zeros_like(found)) == [("missed", "microbleed")] * 3 + [("reviewed", "vein")]


def test_a_tie_between_readers_reasons_goes_to_the_first_listed_and_every_reason_has_a_class():
    from CMBDetectLib.detection.records import CLASSES
    from CMBReviewLib.adaptation import REASON_CLASS, consensus_reason

    assert consensus_reason(["artefact", "vessel"]) == "vessel" and consensus_reason(["other", "artefact", "artefact"]) == "artefact"
    assert {r: REASON_CLASS[r] for r in ("vessel", "calcification", "iron_deposit", "artefact")} == {
        "vessel": "vein", "calcification": "calcification", "iron_deposit": "nucleus", "artefact": "air_edge"}
    assert {REASON_CLASS[r] for r in ("partial_volume", "cavernous_malformation", "other")} == {"other"}
    assert set(REASON_CLASS.values()) <= set(CLASSES)


def test_adapt_study_refuses_a_study_nobody_reviewed_and_writes_nothing(tmp_path, capsys):
    from CMBDetectLib.cli import main

    study = _reviewed_study(tmp_path, lambda *a: [])
    out = tmp_path / "model"
    assert main(["adapt", "--study", str(study), "-o", str(out), "-q"]) == 2
    assert "no case has been reviewed" in capsys.readouterr().err and not out.exists()
    assert main(["adapt", "--study", str(study), "--images", str(tmp_path), "-o", str(out), "-q"]) == 2
    assert "either --study" in capsys.readouterr().err


# ---------------------------------------------------------------------------- --max-minutes


def test_an_epoch_runs_only_if_the_longest_so_far_still_fits():
    from CMBDetectLib.training.budget import next_epoch_fits

    assert next_epoch_fits(0.0, [], 60.0) and not next_epoch_fits(60.0, [], 60.0)
    assert next_epoch_fits(40.0, [10.0, 20.0], 60.0)  # 40 + 20 = 60: ends on the budget
    assert not next_epoch_fits(41.0, [10.0, 20.0], 60.0)  # the longest epoch, not the last, decides
    assert not next_epoch_fits(45.0, [20.0, 10.0], 60.0)


def test_a_budget_spent_before_the_first_epoch_keeps_the_classifier_fine_tuned_from(tmp_path):
    import torch
    from CMBDetectLib.detection.candidates import StageSettings, load_classifier_file
    from CMBDetectLib.training.candidates import CandidateSet, CandidateTrainConfig, train_classifier
    from safetensors.torch import load_file

    rng = np.random.default_rng(1)
    n = 32
    labels = np.array([0, 5] * (n // 2))
    data = CandidateSet(patches=rng.random((n, 3, 12, 12, 12)).astype(np.float16), labels=labels,
                        cases=np.array([f"c{i % 4}" for i in range(n)]), has_phase=np.zeros(n, bool), sources=np.array(["unet"] * n, "U9"))  # fmt: skip
    settings = StageSettings()
    tiny = dict(samples_per_epoch=16, batch_size=8, width=4, patch_size=12, plant_p=0.0, cartoon_p=0.0, black_level_p=0.0)
    torch.manual_seed(0)
    train_classifier(data, tmp_path / "base", CandidateTrainConfig(epochs=1, **tiny), settings, {"id": "b", "version": "1"})
    base = load_classifier_file(tmp_path / "base" / "best.safetensors").network
    messages: list[str] = []
    # A budget of a few nanoseconds: gone before the first step of the first epoch.
    config = CandidateTrainConfig(epochs=5, max_minutes=1e-10, **tiny)
    card = train_classifier(data, tmp_path / "tuned", config, settings, {"id": "t", "version": "1"}, messages.append, init=base)
    assert card["training"]["epochs_run"] == 0 and card["training"]["best_epoch"] == 0
    assert any(m.startswith("stopping:") and "time budget" in m for m in messages)
    kept = load_file(str(tmp_path / "tuned" / "best.safetensors"))
    assert all(torch.equal(kept[k], v) for k, v in base.state_dict().items())


def test_a_budget_spent_before_the_first_epoch_keeps_the_unet_fine_tuned_from(site, tmp_path):
    import csv

    import torch
    from CMBDetectLib.training.loop import TrainConfig, train

    registry = models.read_registry()
    cases = tmp_path / "cases.csv"
    with open(cases, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "image", "label"])
        for image in sorted((site / "images").iterdir())[:2]:
            w.writerow([image.name[: -len(".nii.gz")], str(image), str(site / "truth" / image.name)])
    messages: list[str] = []
    config = TrainConfig(crop=64, batch_size=2, steps_per_epoch=4, max_epochs=3, val_slices=4, max_minutes=1e-10, init=registry["default"])
    card = train(cases, tmp_path / "run", config, log=messages.append, show_progress=False)
    assert card["training"]["best_epoch"] == 0 and card["training"]["best_val_dice"] == card["training"]["initial_val_dice"]
    assert any(m.startswith("stopping:") and "time budget" in m for m in messages)
    base = models.load_model(registry["default"]).network.state_dict()
    kept = models.load_model(str(tmp_path / "run" / "best.safetensors")).network.state_dict()
    assert all(torch.equal(kept[k], base[k]) for k in base)


# ---------------------------------------------------------------------------- --study end to end


@pytest.fixture(scope="module")
def adapted_from_study(site, tmp_path_factory):
    """The `site` cases detected with the shipped model, reviewed by the scripted reader from
    their truth (review create, simulate, import), and `adapt --study` on that study."""
    from CMBDetectLib.cli import main

    root = tmp_path_factory.mktemp("study-site")
    assert main(["detect", str(site / "images"), "-o", str(root / "det"), "-q"]) == 0
    study = root / "study.db"
    assert main(["review", "create", str(study), "--images", str(site / "images"), "--detections", str(root / "det")]) == 0
    assert main(["review", "add-reader", str(study), "ana"]) == 0
    assert main(["review", "simulate", str(study), "--truth", str(site / "truth"), "--reader", "ana", "-o", str(root / "ana.csv")]) == 0
    assert main(["review", "import", str(study), str(root / "ana.csv")]) == 0
    before = _shipped_hashes()
    out = root / "site-model"
    # The other stage 2: the classifier fine-tuned on the fit cases, calibrated on the others.
    code = main(["adapt", "--study", str(study), "-o", str(out), "--max-minutes", "0.3", "--calibration-fraction", "0.5",
                 "--fine-tune-classifier", "-q"])  # fmt: skip
    return code, out, before, study


def test_adapt_study_writes_a_model_folder_with_the_study_in_its_card_that_detect_loads(adapted_from_study, site, tmp_path):
    from CMBDetectLib.commands.detect import main as detect_main

    code, out, before, study = adapted_from_study
    assert code == 0
    assert _shipped_hashes() == before
    card = json.loads((out / "unet.json").read_text())
    assert card["candidate_classifier"] == "classifier.safetensors"
    source = card["adaptation"]["source"]
    assert source["kind"] == "CMBReview study" and source["study"] == str(study.absolute())
    assert source["study_sha256"] == models.sha256_of(study) and source["readers"] == ["ana"]
    names = sorted(p.name[: -len(".nii.gz")] for p in (site / "images").iterdir())
    assert sorted(c["case"] for c in source["cases"]) == names
    assert sorted(card["adaptation"]["cases"]["fit"] + card["adaptation"]["cases"]["calibration"]) == names
    classifier_card = json.loads((out / "classifier.json").read_text())
    assert card["adaptation"]["classifier"]["context_refitted"] is False and "context" not in classifier_card
    assert classifier_card["calibration_fit"]["calibration_cases"] == card["adaptation"]["cases"]["calibration"]
    # The truth the U-Net was fine-tuned on is the study's consensus, kept in the folder.
    assert all(Path(i["truth"]).name.endswith(".seg.nrrd") and Path(i["truth"]).is_relative_to(out) for i in card["adaptation"]["inputs"])

    image = sorted((site / "images").iterdir())[0]
    assert detect_main([str(image), "-o", str(tmp_path / "det"), "--model", str(out), "-q"]) == 0
    summary = json.loads(next((tmp_path / "det").glob("*_summary.json")).read_text())
    assert summary["params_fingerprinted"]["classifier_sha256"] == models.sha256_of(out / "classifier.safetensors")


@pytest.mark.parametrize("which", ["images", "study"])
def test_the_slicer_worker_loads_an_adapted_folder_with_its_own_classifier(which, adapted, adapted_from_study, site, mrml, tmp_path):
    """As the module runs it: DetectionJob starts the worker in a child process with --model FOLDER."""
    import slicer.util
    from CMBDetectLib.io import read_volume
    from CMBDetectLib.mrml.job import DetectionJob

    code, out = (adapted[0], adapted[1]) if which == "images" else (adapted_from_study[0], adapted_from_study[1])
    assert code == 0
    volume = read_volume(sorted((site / "images").iterdir())[0])
    node = slicer.util.addVolumeFromArray(volume.array, volume.geometry.ijk_to_ras(), "swi")
    job = DetectionJob(node, tmp_path / "work", model=str(out))
    job.start()
    assert job.wait(600) == "succeeded", job.run.error
    summary = job.run.output().summary
    unet, classifier = (json.loads((out / name).read_text()) for name in ("unet.json", "classifier.json"))
    assert (summary["model_id"], summary["model_version"]) == (unet["id"], unet["version"])
    stage = summary["candidate_stage"]
    assert (stage["classifier_id"], stage["classifier_version"]) == (classifier["id"], classifier["version"])
    # Its own operating point (count, no phase), not the shipped classifier's.
    assert stage["keep_at"] == pytest.approx(classifier["operating_points"]["count"]["no_phase"], abs=1e-6)
    job.cleanup()


# ---------------------------------------------------------------------------- CMBReview's Adapt button


def test_cmbreviews_adapt_job_runs_adapt_study_in_a_child_with_progress_and_offers_the_model(adapted_from_study, mrml, tmp_path):
    """As the button runs it: a child process (AdaptJob), progress lines polled, the finished
    folder offered and chosen in CMBDetect's model selector (its parameter node)."""
    from CMBDetectLib.mrml import modelchoice
    from CMBReviewLib.adaptjob import AdaptJob

    study = adapted_from_study[3]
    job = AdaptJob(study, tmp_path / "model", max_minutes=0.3)
    job.start()
    fractions = []
    while not job.run.finished:
        fractions += [e.fraction for e in job.poll() if e.kind == "PROGRESS"]
        time.sleep(0.05)  # as the module's timer polls: a busy loop would take a core from the child
    assert job.run.state == "succeeded", job.run.error
    assert fractions and all(0 <= f <= 1 for f in fractions) and fractions == sorted(fractions)
    node = modelchoice.parameter_node(mrml.scene)
    folder = modelchoice.offer_adapted_model(node, job.out)
    assert modelchoice.chosen_model(node) == folder == str((tmp_path / "model").resolve())
    assert json.loads((tmp_path / "model" / "unet.json").read_text())["adaptation"]["source"]["study"] == str(study.absolute())


def test_cancelling_the_adapt_job_kills_the_child(adapted_from_study, tmp_path):
    from CMBReviewLib.adaptjob import AdaptJob

    job = AdaptJob(adapted_from_study[3], tmp_path / "model", max_minutes=5)
    job.start()
    deadline = time.monotonic() + 300
    while not any(e.kind == "PROGRESS" for e in job.poll()) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    assert job.run.state == "cancelled" and not job.run.alive
    assert not (tmp_path / "model" / "unet.json").exists()


def test_training_writes_its_log_without_matplotlib(tmp_path):
    """Slicer lacks matplotlib: the adapt child must train and log without it (no curve PNG)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['matplotlib'] = None  # as if not installed\n"
        "from pathlib import Path\n"
        "from CMBDetectLib.training.loop import _write_log\n"
        "_write_log(Path(sys.argv[1]), [{'epoch': 1, 'steps': 2, 'train_loss': 0.5, 'val_dice': 0.1, 'lr': 1e-4, 'minutes': 0.1}])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert (tmp_path / "training_log.csv").is_file() and not (tmp_path / "training_curves.png").exists()
