"""The two networks' configurations, torch-free: a process served from the ONNX cache
(engines.py) reads them from the model cards without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .records import CLASSES


@dataclass(frozen=True)
class NetworkConfig:
    """Everything needed to rebuild the U-Net (network.py); saved beside the weights."""

    base_channels: int = 64
    levels: int = 3
    in_slices: int = 3

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NetworkConfig":
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild the candidate classifier (classifier.py) and its input; saved in the model card."""

    in_channels: int = 3  # SWI magnitude, phase, phase-present flag
    width: int = 8
    blocks: int = 3
    patch_size: int = 16  # voxels per side (12 mm at 0.75 mm)
    patch_spacing_mm: float = 0.75  # isotropic
    n_classes: int = len(CLASSES)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClassifierConfig":
        fields = cls.__dataclass_fields__
        out = {}
        for key, value in data.items():
            if key in fields:
                out[key] = float(value) if key == "patch_spacing_mm" else int(value)
        return cls(**out)
