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
    from CMBDetectLib.detection.pipeline import DetectionParams, get_model, stage_two_classifier

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


def test_the_case_split_is_seeded_and_leaves_a_case_on_each_side():
    from CMBDetectLib.training.adapt import split_cases

    names = [f"c{i}" for i in range(10)]
    fit, cal = split_cases(names, 0.3, 4)
    assert (fit, cal) == split_cases(list(reversed(names)), 0.3, 4)
    assert len(cal) == 3 and not set(fit) & set(cal) and sorted(fit + cal) == names
    assert [len(x) for x in split_cases(["a", "b"], 0.9, 0)] == [1, 1]
