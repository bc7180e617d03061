"""What Slicer's own process imports to show results: never torch, never safetensors.

Detection runs in a child process (detection/worker.py); the GUI process only turns files into
nodes and re-thresholds the kept map. Importing torch there would cost seconds and memory on
every module setup, and a broken torch DLL would break the module. Each check runs in a fresh
interpreter, so what an earlier test imported cannot hide an import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer_core", reason="slicer-core (the Qt-free MRML engine) is not installed")

ROOT = Path(__file__).resolve().parent.parent
# What CMBDetect.py's _adapter() and its Logic import in Slicer's process.
GUI_MODULES = (
    "CMBDetectLib.mrml.nodes",
    "CMBDetectLib.mrml.display",
    "CMBDetectLib.mrml.results",
    "CMBDetectLib.mrml.navigation",
    "CMBDetectLib.mrml.job",
    "CMBDetectLib.mrml.longitudinal",
    "CMBDetectLib.detection.records",
    "CMBDetectLib.detection.runner",
    "CMBDetectLib.detection.phase",
)
HEAVY = ("torch", "safetensors")


def imported_in_a_fresh_python(module: str) -> list[str]:
    code = f"import json, sys, importlib; importlib.import_module({module!r}); print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "CMBDetect"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", GUI_MODULES)
def test_showing_results_in_slicer_imports_neither_torch_nor_safetensors(module):
    loaded = imported_in_a_fresh_python(module)
    assert module in loaded
    pulled = sorted(name for name in loaded if name.split(".")[0] in HEAVY)
    assert not pulled, f"{module} imports {pulled[:3]}"


def test_the_comparison_worker_imports_neither_nilearn_nor_matplotlib():
    """"Compare with baseline" runs longitudinal/worker.py inside Slicer's Python, which has
    neither: its path (the pair, the registration, the batch detection) must not need them."""
    loaded = imported_in_a_fresh_python("CMBDetectLib.longitudinal.worker")
    assert {"CMBDetectLib.longitudinal.pairs", "CMBDetectLib.registration.rigid"} <= set(loaded)
    pulled = sorted(name for name in loaded if name.split(".")[0] in ("nilearn", "matplotlib"))
    assert not pulled, f"the comparison worker imports {pulled[:3]}"
