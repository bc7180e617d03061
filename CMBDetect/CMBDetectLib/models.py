"""The models registry: weights in safetensors, a JSON model card beside them, checksums.

`Resources/Models/models.json` lists each shipped model (id, version, file, size, sha256,
source) and names the default. A model outside the registry is a `.safetensors` file with
its card `<same name>.json` beside it; nothing is ever downloaded and no pickle is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .detection.configs import NetworkConfig
from .io import sha256_of
from .registry import FOLDER_WEIGHTS, card_path, models_dir, read_registry  # noqa: F401 - part of this module's API

if TYPE_CHECKING:  # torch is imported only where weights become a network: a cached ONNX model needs neither
    import torch

    from .detection.network import ResUNet


class CardIdentity:
    """Id and version of loaded weights, read from their model card (the detector's and the
    candidate classifier's alike), and the sha256 of the weights file as loaded."""

    card: dict
    path: Path
    sha256: str

    @property
    def id(self) -> str:
        return str(self.card.get("id", self.path.stem))

    @property
    def version(self) -> str:
        return str(self.card.get("version", "unknown"))


class LazyNetwork:
    """`.network` built from the weights on first use: a process whose engine is served from the
    ONNX cache (detection/onnx_cache.py) never builds it, and so never imports torch."""

    _network = None
    _build: "Callable[[], object] | None" = None

    @property
    def network(self):
        if self._network is None:
            if self._build is None:
                raise RuntimeError(f"{self.path} has no network to build")
            self._network = self._build()
        return self._network

    @network.setter
    def network(self, value) -> None:
        self._network = value


class LoadedModel(LazyNetwork, CardIdentity):
    def __init__(self, network: "ResUNet | None", card: dict, path: Path, sha256: str = "",
                 build: "Callable[[], ResUNet] | None" = None) -> None:  # fmt: skip
        self._network, self._build = network, build
        self.card, self.path, self.sha256 = card, Path(path), sha256

    @property
    def trained(self) -> bool:
        return bool(self.card.get("trained", False))

    @property
    def config(self) -> NetworkConfig:
        return NetworkConfig.from_dict(self.card["network"])

    def int8_calibration(self) -> tuple[dict, str]:
        """The int8 activation ranges its card names, checked against their sha256, and that sha256.

        ValueError when the card names none (the model was not calibrated: `cmbdetect quantize`)
        or the file does not match the card."""
        entry = self.card.get("int8_calibration")
        if not entry:
            raise ValueError(f"model {self.id} {self.version} has no int8 calibration in its card: "
                             f"run `cmbdetect quantize --model {self.path}` once, or use another --precision")  # fmt: skip
        path = self.path.parent / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"model {self.id}: its int8 calibration {path} is missing")
        if entry.get("weights_sha256") not in (None, self.sha256):
            raise ValueError(f"model {self.id}: its int8 calibration {path.name} was made for other weights; run `cmbdetect quantize` again")
        actual = sha256_of(path)
        if actual != entry.get("sha256"):
            raise ValueError(f"model {self.id}: its int8 calibration {path.name} is corrupt or changed "
                             f"(sha256 {actual[:12]}..., its card says {str(entry.get('sha256'))[:12]}...)")  # fmt: skip
        return json.loads(path.read_text()), actual


def resolve(spec: str | None, directory: Path | None = None) -> tuple[Path, str | None]:
    """A registry id, a weights path, a model folder (`cmbdetect adapt`'s: its unet.safetensors),
    or None (the default) -> (weights path, expected sha256 or None)."""
    directory = directory or models_dir()
    if spec and (spec.endswith(".safetensors") or os.sep in spec or "/" in spec or Path(spec).is_dir()):
        path = Path(spec)
        if path.is_dir():
            path = path / FOLDER_WEIGHTS
            if not path.is_file():
                raise FileNotFoundError(f"model folder {spec} has no {FOLDER_WEIGHTS} (a folder written by `cmbdetect adapt` is expected)")
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        return path, None
    registry = read_registry(directory)
    wanted = spec or registry["default"]
    for entry in registry["models"]:
        if entry["id"] == wanted:
            return directory / entry["file"], entry.get("sha256")
    known = ", ".join(e["id"] for e in registry["models"])
    raise KeyError(f"unknown model {wanted!r}; the registry knows: {known}")


def verified_sha256(path: Path, card: dict, registry_sha256: str | None, what: str) -> str:
    """The sha256 of weights about to be loaded, checked against every record of it: the
    registry's entry and the card's own `sha256`. A record that is absent (a hand-made card)
    checks nothing; the returned hash still identifies the weights (the resume fingerprint)."""
    actual = sha256_of(path)
    for source, expected in (("the registry says", registry_sha256), ("its card says", card.get("sha256"))):
        if expected is not None and actual != expected:
            raise ValueError(f"{what} {path.name} is corrupt or changed: sha256 {actual[:12]}..., {source} {str(expected)[:12]}...")
    return actual


def load_model(spec: str | None = None, directory: Path | None = None, lazy: bool = False) -> LoadedModel:
    """Load weights and card; the weights must match the sha256 the registry and the card record.

    `lazy`: the network is built from the weights when first used (see LazyNetwork)."""
    path, expected = resolve(spec, directory)
    if not path.is_file():
        raise FileNotFoundError(f"model weights missing: {path}")
    card_file = card_path(path)
    if not card_file.is_file():
        raise FileNotFoundError(f"model card missing: {card_file} (it holds the network's configuration)")
    card = json.loads(card_file.read_text())
    sha256 = verified_sha256(path, card, expected, "model file")
    config = NetworkConfig.from_dict(card["network"])

    def build() -> "ResUNet":
        from .detection.network import ResUNet

        network = ResUNet(config)
        network.load_state_dict(read_weights(path))
        return network.eval()

    return LoadedModel(None if lazy else build(), card, path, sha256, build)


def read_weights(path: Path) -> "dict[str, torch.Tensor]":
    """The tensors of a .safetensors file; a damaged or foreign file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None


def save_model(network: "ResUNet", path: Path, card: dict) -> dict:
    """Write weights and card (the card gains the network config, size and sha256)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(path))
    path.chmod(0o644)  # safetensors writes owner-only; a shipped model must be readable by all
    card = dict(card)
    card.pop("int8_calibration", None)  # calibrated for the weights it came with, not these
    card["network"] = network.config.as_dict()
    card["file"] = path.name
    card["size_bytes"] = path.stat().st_size
    card["sha256"] = sha256_of(path)
    card_path(path).write_text(json.dumps(card, indent=2) + "\n")
    return card


def registry_entry(card: dict, source: str) -> dict:
    return {
        "id": card["id"],
        "version": card["version"],
        "title": card.get("title", card["id"]),
        "file": card["file"],
        "size_bytes": card["size_bytes"],
        "sha256": card["sha256"],
        "trained": card.get("trained", False),
        "source": source,
    }


def untrained_network(config: NetworkConfig, seed: int = 0) -> "ResUNet":
    import torch

    from .detection.network import ResUNet

    torch.manual_seed(seed)
    return ResUNet(config)

