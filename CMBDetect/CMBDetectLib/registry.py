"""Where the shipped models are and what the registry lists, without torch: the Slicer
module's model selector reads these in Slicer's own process (models.py loads the weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path

MODELS_DIR_ENV = "CMBDETECT_MODELS_DIR"
# A model folder (written by `cmbdetect adapt`) holds its U-Net under this name; its card names
# the candidate classifier by a path relative to the folder.
FOLDER_WEIGHTS = "unet.safetensors"


def models_dir() -> Path:
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


def read_registry(directory: Path | None = None) -> dict:
    path = (directory or models_dir()) / "models.json"
    if not path.is_file():
        raise FileNotFoundError(f"models registry not found: {path}")
    return json.loads(path.read_text())


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")
