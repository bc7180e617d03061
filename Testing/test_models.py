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


# --- a model given by path is checked against its own card (issue 18, item 6) ----------------


def _copy_shipped(tmp_path, model_id: str):
    """A shipped model's weights and card, copied out of the registry: a model given by path."""
    registry = models.read_registry()
    entry = next(e for e in registry["models"] if e["id"] == model_id)
    weights = tmp_path / entry["file"]
    shutil.copy(models.models_dir() / entry["file"], weights)
    shutil.copy(models.card_path(models.models_dir() / entry["file"]), models.card_path(weights))
    return weights


def _zero_64k(path) -> None:
    """64 KB of the tensor data zeroed: the header still parses, the weights load, the answers are wrong."""
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start : start + 65536] = bytes(65536)
    path.write_bytes(bytes(data))


def test_detector_given_by_path_is_checked_against_its_card(tmp_path, capsys):
    from CMBDetectLib.commands.detect import main as detect_main

    registry = models.read_registry()
    weights = _copy_shipped(tmp_path, registry["default"])
    assert models.load_model(str(weights)).sha256 == models.sha256_of(weights)  # intact: loads
    _zero_64k(weights)
    with pytest.raises(ValueError, match=rf"{weights.name} is corrupt or changed.*its card says"):
        models.load_model(str(weights))
    code = detect_main([str(tmp_path / "absent.nii.gz"), "-o", str(tmp_path / "out"), "--model", str(weights), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and weights.name in err and "corrupt or changed" in err
    assert not (tmp_path / "out").exists()


def test_classifier_given_by_path_is_checked_against_its_card(tmp_path):
    from CMBDetectLib.detection.candidates import load_candidate_classifier

    registry = models.read_registry()
    detector = models.card_path(models.models_dir() / next(e for e in registry["models"] if e["id"] == registry["default"])["file"])
    weights = _copy_shipped(tmp_path, json.loads(detector.read_text())["candidate_classifier"])
    assert load_candidate_classifier(str(weights)).sha256 == models.sha256_of(weights)
    _zero_64k(weights)
    with pytest.raises(ValueError, match=rf"{weights.name} is corrupt or changed.*its card says"):
        load_candidate_classifier(str(weights))


def test_a_card_without_sha256_is_accepted_and_identified_by_the_file(tmp_path):
    weights = tmp_path / "hand.safetensors"
    models.save_model(dark_spot_network(), weights, {"id": "hand", "version": "1"})
    card = json.loads(models.card_path(weights).read_text())
    del card["sha256"]  # as a hand-made card may be
    models.card_path(weights).write_text(json.dumps(card))
    loaded = models.load_model(str(weights))
    assert loaded.sha256 == models.sha256_of(weights)
