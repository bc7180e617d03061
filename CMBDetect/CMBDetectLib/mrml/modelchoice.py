"""The model selector of the CMBDetect module: the registry's models and adapted model folders,
the choice kept in CMBDetect's parameter node (saved with the scene).

Two parameters of that node, owned here so that CMBReview can offer a model it adapted without
the CMBDetect widget: MODEL_PARAMETER (the chosen model: a registry id or a folder; empty for the
registry's default) and ADAPTED_PARAMETER (the adapted folders offered, a JSON list). No torch
here: a folder is checked by its files and cards, and the worker loads the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..registry import FOLDER_WEIGHTS, card_path, read_registry

MODULE = "CMBDetect"
MODEL_PARAMETER = "Model"
ADAPTED_PARAMETER = "AdaptedModelFolders"


@dataclass(frozen=True)
class ModelChoice:
    label: str
    spec: str  # what the worker's --model takes; "" is the registry's default


def check_model_folder(folder: str | Path) -> dict:
    """The card of an adapted model folder (`cmbdetect adapt -o FOLDER`); ValueError saying what
    is missing otherwise. Its classifier is the folder's own, named relative to the card."""
    folder = Path(folder)
    weights = folder / FOLDER_WEIGHTS
    card_file = card_path(weights)
    if not weights.is_file() or not card_file.is_file():
        raise ValueError(f"{folder} is not an adapted model folder: it lacks {weights.name} or {card_file.name} (written by cmbdetect adapt)")
    card = json.loads(card_file.read_text(encoding="utf-8"))
    classifier = card.get("candidate_classifier")
    if not classifier or not (folder / classifier).is_file():
        raise ValueError(f"{folder}: its card names no classifier file in the folder ({classifier!r})")
    return card


def model_choices(adapted: list[str]) -> list[ModelChoice]:
    """The registry's detection models (the default first; classifiers are not choices), then
    each adapted folder that is still there and whole."""
    registry = read_registry()
    default = registry["default"]
    detectors = [m for m in registry["models"] if m.get("kind", "unet") != "candidate-classifier"]
    detectors.sort(key=lambda m: m["id"] != default)
    out = [ModelChoice(f"{m['id']} {m['version']}" + (" (default)" if m["id"] == default else ""), "" if m["id"] == default else m["id"])
           for m in detectors]  # fmt: skip
    for folder in adapted:
        try:
            card = check_model_folder(folder)
        except (ValueError, OSError):
            continue
        out.append(ModelChoice(f"adapted: {card.get('id')} {card.get('version')} ({folder})", folder))
    return out


def parameter_node(scene: Any) -> Any:
    """CMBDetect's parameter node in the scene, made as ScriptedLoadableModuleLogic makes it
    (a singleton scripted module node tagged with the module's name) when there is none yet."""
    node = scene.GetSingletonNode(MODULE, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # the scene holds the reference
        node.SetSingletonTag(MODULE)
        node.SetModuleName(MODULE)
        node.SetName(scene.GenerateUniqueName(MODULE))
        node = scene.AddNode(node)
    return node


def adapted_folders(node: Any) -> list[str]:
    text = node.GetParameter(ADAPTED_PARAMETER)
    try:
        folders = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return [f for f in folders if isinstance(f, str)]


def chosen_model(node: Any) -> str | None:
    """The model to pass to the worker: None for the registry's default."""
    return node.GetParameter(MODEL_PARAMETER) or None


def choose_model(node: Any, spec: str | None) -> None:
    node.SetParameter(MODEL_PARAMETER, spec or "")


def offer_adapted_model(node: Any, folder: str | Path, select: bool = True) -> str:
    """Add an adapted model folder to the selector's list (once) and, with `select`, choose it.
    Raises ValueError, and changes nothing, when the folder is not a whole adapted model."""
    check_model_folder(folder)
    folder = str(Path(folder).resolve())
    folders = adapted_folders(node)
    if folder not in folders:
        node.SetParameter(ADAPTED_PARAMETER, json.dumps([*folders, folder]))
    if select:
        choose_model(node, folder)
    return folder
