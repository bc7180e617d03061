"""The CMBDetect module's model selector (CMBDetectLib/mrml/modelchoice.py) on slicer-core's real
scene: the registry's models and adapted folders, the choice in CMBDetect's parameter node, a
folder CMBReview offers, and the choice surviving a scene saved and read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("slicer_core", reason="slicer-core (the Qt-free MRML engine) is not installed")

from CMBDetectLib import registry  # noqa: E402
from CMBDetectLib.mrml import modelchoice as mc  # noqa: E402


def adapted_folder(folder: Path) -> Path:
    """A folder laid out as `cmbdetect adapt` writes it (the shipped files under its names)."""
    folder.mkdir(parents=True)
    reg = registry.read_registry()
    unet = next(e for e in reg["models"] if e["id"] == reg["default"])
    classifier = next(e for e in reg["models"] if e["id"] == unet["candidate_classifier"])
    shutil.copy(registry.models_dir() / unet["file"], folder / "unet.safetensors")
    shutil.copy(registry.models_dir() / classifier["file"], folder / "classifier.safetensors")
    card = json.loads(registry.card_path(registry.models_dir() / unet["file"]).read_text())
    (folder / "unet.json").write_text(json.dumps({**card, "id": "site-a", "version": "1", "candidate_classifier": "classifier.safetensors"}))
    return folder


def test_choices_are_the_registry_detectors_default_first_then_adapted_folders_that_are_whole(tmp_path):
    reg = registry.read_registry()
    good = adapted_folder(tmp_path / "good")
    broken = tmp_path / "broken"
    broken.mkdir()
    choices = mc.model_choices([str(good), str(broken), str(tmp_path / "gone")])
    assert choices[0].spec == "" and "(default)" in choices[0].label and reg["default"] in choices[0].label
    classifiers = {e["id"] for e in reg["models"] if e.get("kind") == "candidate-classifier"}
    assert not classifiers & {c.spec for c in choices}  # a classifier alone is no detector
    assert choices[-1].spec == str(good) and "site-a" in choices[-1].label
    assert str(broken) not in {c.spec for c in choices}
    with pytest.raises(ValueError, match="not an adapted model folder"):
        mc.check_model_folder(broken)


def test_an_offered_folder_is_listed_once_chosen_and_kept_in_the_saved_scene(mrml, tmp_path):
    import slicer

    good = adapted_folder(tmp_path / "site")
    # A singleton outlives a scene Clear, and another test (a DetectionJob) may have made one.
    earlier = mrml.scene.GetSingletonNode("CMBDetect", "vtkMRMLScriptedModuleNode")
    if earlier is not None:
        mrml.scene.RemoveNode(earlier)
    node = mc.parameter_node(mrml.scene)
    assert mc.parameter_node(mrml.scene) is node and node.GetModuleName() == "CMBDetect"
    assert mc.chosen_model(node) is None and mc.adapted_folders(node) == []
    assert mc.offer_adapted_model(node, good) == str(good.resolve())
    mc.offer_adapted_model(node, good)
    assert mc.adapted_folders(node) == [str(good.resolve())] and mc.chosen_model(node) == str(good.resolve())
    with pytest.raises(ValueError):
        mc.offer_adapted_model(node, tmp_path)  # not a model: nothing changes
    assert mc.adapted_folders(node) == [str(good.resolve())]
    mc.choose_model(node, None)
    assert mc.chosen_model(node) is None

    mc.choose_model(node, str(good.resolve()))
    scene_file = tmp_path / "scene.mrml"
    mrml.scene.SetURL(str(scene_file))
    assert mrml.scene.Commit()
    mrml.clear()
    mrml.scene.RemoveNode(mrml.scene.GetSingletonNode("CMBDetect", "vtkMRMLScriptedModuleNode"))  # a singleton outlives a Clear
    assert mrml.scene.GetSingletonNode("CMBDetect", "vtkMRMLScriptedModuleNode") is None
    mrml.scene.SetURL(str(scene_file))
    assert mrml.scene.Import()
    restored = mrml.scene.GetSingletonNode("CMBDetect", "vtkMRMLScriptedModuleNode")
    assert restored is not None and mc.chosen_model(restored) == str(good.resolve())
    assert [c.spec for c in mc.model_choices(mc.adapted_folders(restored))][-1] == str(good.resolve())
    assert slicer.mrmlScene is mrml.scene
