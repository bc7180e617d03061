"""`cmbdetect adapt`: a model folder (U-Net + its own classifier, named relative to the card),
the site's samples for stage 2, and the command end to end on tiny synthetic cases."""

from __future__ import annotations

import json
import shutil
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
    assert classifier_card["calibration_fit"]["calibration_cases"] == a["cases"]["calibration"]

    image = sorted((site / "images").iterdir())[0]
    assert detect_main([str(image), "-o", str(tmp_path / "det"), "--model", str(out), "-q"]) == 0
    summary = json.loads(next((tmp_path / "det").glob("*_summary.json")).read_text())
    used = summary["params_fingerprinted"]
    assert used["classifier_sha256"] == models.sha256_of(out / "classifier.safetensors") == classifier_card["sha256"]
    assert used["model_sha256"] == models.sha256_of(out / "unet.safetensors")
    assert summary["candidate_stage"]["classifier_id"] == classifier_card["id"] == "cmbdetect-adapted-candidates"


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
