"""The Slicer batch script: `cmbdetect detect`'s behaviour and exit code, and it always exits.

Inside Slicer it is run as `PythonSlicer <script> --input ... --output ...` (or through
`Slicer --no-main-window --python-script`); here it runs as a subprocess of the venv's
Python, the way PythonSlicer runs it. Slicer's Python lacks what our venv has (nibabel,
matplotlib, possibly torch before the first install): those runs use a Python in which
such imports fail, and must end, with a clear message and a non-zero status, within a
time bound (under `Slicer --python-script`, a script that does not exit hangs for ever).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from CMBDetectLib.io import write_volume
from CMBDetectLib.detection.records import output_paths
from handmade import phantom, save_dark_spot_model

SCRIPT = Path(__file__).resolve().parent.parent / "CMBDetect" / "Scripts" / "cmbdetect_slicer_batch.py"
REQUIREMENTS = SCRIPT.parent.parent / "Resources" / "requirements.txt"
TIMEOUT_S = 300  # a bound, not a speed claim: a hang fails the test instead of blocking it

# Runs the script as __main__ (as PythonSlicer does) in a Python where importing the named
# modules fails as it does when they are not installed; any other exception named in RAISE
# is raised at import, to stand for an unexpected error.
BLOCKING_RUNNER = """
import importlib.abc, runpy, sys
BLOCK, RAISE, SCRIPT = set(sys.argv[1].split(",")) - {""}, set(sys.argv[2].split(",")) - {""}, sys.argv[3]
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if top in RAISE:
            raise RuntimeError(f"unexpected failure while importing {name}")
        return None
sys.meta_path.insert(0, Blocker())
sys.argv = [SCRIPT, *sys.argv[4:]]
runpy.run_path(SCRIPT, run_name="__main__")
"""


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
    assert to_argv(["-i", "a", "b", "--phase", "ph", "-o", "out"]) == ["a", "b", "--phase", "ph", "-o", "out"]


def run_script(*args: str, cwd: Path, block: tuple[str, ...] = (), fail: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # From another folder, so the script must find CMBDetectLib by itself.
    command = [sys.executable, "-c", BLOCKING_RUNNER, ",".join(block), ",".join(fail), str(SCRIPT), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


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


def test_operating_point_reaches_detect_and_is_refused_with_single_stage(tmp_path, capsys):
    array, geometry, _ = phantom(shape=(6, 80, 90), spheres_mm=[((3, 40, 45), 4.0)])
    write_volume(array, geometry, tmp_path / "in.nii.gz")
    argv = ["--input", str(tmp_path / "in.nii.gz"), "--output", str(tmp_path / "out"), "--single-stage", "--operating-point", "count", "--quiet"]
    assert load_script().main(argv) == 2
    assert "--operating-point" in capsys.readouterr().err


def test_help_works_without_torch_and_after_slicers_double_dash(tmp_path):
    for args in (["--help"], ["--", "--help"]):  # PythonSlicer, and `Slicer --python-script s.py -- --help`
        done = run_script(*args, cwd=tmp_path, block=("torch", "nibabel", "matplotlib"))
        assert done.returncode == 0, done.stderr
        assert "PythonSlicer cmbdetect_slicer_batch.py" in done.stdout  # the script's own help
        assert "--threshold" in done.stdout and "--preview" in done.stdout  # and the detect options


def test_without_nibabel_a_nifti_batch_stops_with_a_clear_message(tmp_path):
    array, geometry, _ = phantom(shape=(4, 60, 70), spheres_mm=[])
    write_volume(array, geometry, tmp_path / "in.nii.gz")
    done = run_script("--input", str(tmp_path / "in.nii.gz"), "--output", str(tmp_path / "out"), "--quiet",
                      cwd=tmp_path, block=("nibabel", "matplotlib"))  # fmt: skip
    assert done.returncode == 1
    assert "requirements are missing" in done.stderr and "nibabel" in done.stderr
    assert "matplotlib" not in done.stderr  # not needed without --preview
    assert not (tmp_path / "out").exists()  # stopped before any case


def test_preview_without_matplotlib_says_so_and_stops(tmp_path):
    done = run_script("--input", "x.nrrd", "--output", str(tmp_path / "out"), "--preview", cwd=tmp_path, block=("matplotlib",))
    assert done.returncode == 1
    assert "matplotlib (only for --preview)" in done.stderr and "leaving it out" in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_unexpected_error_ends_with_a_traceback_and_status_1(tmp_path):
    # A module the detect command imports fails with something other than ImportError.
    done = run_script("--input", "x.nrrd", "--output", str(tmp_path / "out"), cwd=tmp_path, fail=("CMBDetectLib",))
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "unexpected failure while importing CMBDetectLib" in done.stderr


def test_every_requirement_is_checked_by_the_script():
    """The script's up-front check knows every package of requirements.txt (by import name)."""
    lines = [ln.split("#", 1)[0].strip() for ln in REQUIREMENTS.read_text().splitlines()]
    names = {re.split(r"[<>=!~\[; ]", ln, maxsplit=1)[0].lower() for ln in lines if ln}
    script = load_script()
    packages = {value.split(" ")[0].lower() for value in {**script.REQUIRED, **script.OPTIONAL}.values()}
    assert names <= packages, f"add to REQUIRED (or OPTIONAL) in {SCRIPT.name}: {sorted(names - packages)}"
