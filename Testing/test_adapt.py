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
