"""The models registry: checksums, cards, loading without pickles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from CMBDetectLib import models
from CMBDetectLib.detection.network import NetworkConfig
from handmade import dark_spot_network


def test_default_model_matches_registry_checksum():
    registry = models.read_registry()
    entry = next(e for e in registry["models"] if e["id"] == registry["default"])
    path = models.models_dir() / entry["file"]
    assert models.sha256_of(path) == entry["sha256"]
    assert path.stat().st_size == entry["size_bytes"] < 20 * 2**20
    loaded = models.load_model()
    assert loaded.id == registry["default"] and loaded.trained == entry["trained"]
    card = json.loads(models.card_path(path).read_text())
    assert card["sha256"] == entry["sha256"] and "preprocessing" in card


def test_corrupt_registry_model_is_refused(tmp_path):
    for f in models.models_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    registry = models.read_registry(tmp_path)
    entry = next(e for e in registry["models"] if e["id"] == registry["default"])
    data = bytearray((tmp_path / entry["file"]).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or changed"):
        models.load_model(None, tmp_path)


def test_unknown_id_and_missing_files(tmp_path):
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        models.load_model("nope")
    with pytest.raises(FileNotFoundError):
        models.load_model(str(tmp_path / "absent.safetensors"))
    weights = tmp_path / "w.safetensors"
    models.save_model(dark_spot_network(), weights, {"id": "x", "version": "1"})
    models.card_path(weights).unlink()
    with pytest.raises(FileNotFoundError, match="model card missing"):
        models.load_model(str(weights))


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    net = models.untrained_network(NetworkConfig(base_channels=4), seed=5).eval()
    card = models.save_model(net, tmp_path / "m.safetensors", {"id": "m", "version": "2", "trained": True})
    assert card["network"]["base_channels"] == 4 and len(card["sha256"]) == 64
    loaded = models.load_model(str(tmp_path / "m.safetensors"))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_array_equal(net(x).numpy(), loaded.network(x).numpy())
    assert loaded.trained and loaded.version == "2"
