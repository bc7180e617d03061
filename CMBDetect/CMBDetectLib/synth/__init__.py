"""Synthetic SWI with microbleeds and their mimics (issue 3): a physics-based data engine.

    from CMBDetectLib.synth import generate_case
    case = generate_case(seed=1, index=0, matrix=(96, 96), n_slices=24)
    case.image      # Volume: float32 SWI magnitude on the acquisition grid
    case.labels     # uint16 label map, one id per microbleed
    case.mimics     # uint8 mimic map: MIMIC_CODES (1 vein, 2 calcification, 3 nucleus, 4 air edge)
    case.meta       # acquisition, lesions (id, centre, sizes, class, region, ...), mimics

See docs/synth.md for the models, the label rule and the contrast statistics. The heavy
modules load on first use, so that `cmbdetect --help` (which imports synth.cli) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .case import GENERATOR_VERSION, LABEL_RULE, SynthCase, case_name, generate_case
    from .mimics import MIMIC_CODES, MIMIC_NAMES

__all__ = ["GENERATOR_VERSION", "LABEL_RULE", "MIMIC_CODES", "MIMIC_NAMES", "SynthCase", "case_name", "generate_case"]


def __getattr__(name: str) -> object:
    if name in ("MIMIC_CODES", "MIMIC_NAMES"):
        return getattr(importlib.import_module(".mimics", __name__), name)
    if name in __all__:
        return getattr(importlib.import_module(".case", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
