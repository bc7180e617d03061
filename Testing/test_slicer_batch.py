"""The Slicer batch script runs under plain Python as `cmbdetect detect` does, exit code included.

Inside Slicer it is run as `Slicer --no-main-window --python-script <script> --input ... --output ...`;
here it runs as a subprocess of the venv's Python, the way a user without Slicer would.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from CMBDetectLib.io import write_volume
from CMBDetectLib.detection.outputs import output_paths
from handmade import phantom, save_dark_spot_model

SCRIPT = Path(__file__).resolve().parent.parent / "CMBDetect" / "Scripts" / "cmbdetect_slicer_batch.py"


def load_script():
    spec = importlib.util.spec_from_file_location("cmbdetect_slicer_batch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_input_option_becomes_the_positional_inputs():
    to_argv = load_script().to_detect_argv
    assert to_argv(["--input", "a.nii.gz", "b", "--output", "out", "--threshold", "0.5"]) == ["a.nii.gz", "b", "--output", "out", "--threshold", "0.5"]
    assert to_argv(["--output", "out", "-i", "a", "--model", "m"]) == ["a", "--output", "out", "--model", "m"]
    assert to_argv(["--input=a.nrrd", "-o", "out"]) == ["a.nrrd", "-o", "out"]
    assert to_argv(["a.nrrd", "-o", "out"]) == ["a.nrrd", "-o", "out"]  # the cmbdetect form works too


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # From another folder, so the script must find CMBDetectLib by itself.
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_batch_script_detects_and_reports_failures_in_its_exit_code(tmp_path):
    array, geometry, _ = phantom()
    write_volume(array, geometry, tmp_path / "in" / "good.nii.gz")
    model = save_dark_spot_model(tmp_path / "dark-spot.safetensors")
    out = tmp_path / "out"

    done = run_script("--input", str(tmp_path / "in" / "good.nii.gz"), str(tmp_path / "in" / "missing.nii.gz"),
                      "--output", str(out), "--model", str(model), "--device", "cpu", "--quiet", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1, done.stderr  # one case failed: non-zero, as `cmbdetect detect`
    assert "missing" in done.stderr
    assert all(p.is_file() for p in output_paths(out, "good").values()), done.stdout + done.stderr
    assert "good: 2 microbleeds" in done.stdout


def test_usage_errors_exit_with_2(tmp_path, capsys):
    assert load_script().main(["--output", str(tmp_path)]) == 2  # no inputs
    assert "required" in capsys.readouterr().err
