"""Detect microbleeds in many volumes with Slicer's Python, without its GUI.

Recommended (no GUI, no event loop, exits by itself, --help works):

    PythonSlicer cmbdetect_slicer_batch.py --input IN [IN ...] --output OUT \\
        [--threshold 0.4] [--min-size 2] [--max-size 10] [--device auto|cpu|cuda] \\
        [--model ID_OR_FILE] [--batch-size N] [--phase FILE_OR_FOLDER] [--phase-sign auto|keep|flip] \\
        [--operating-point review|count] [--precision auto|fp32|bf16|int8] [--no-regions] [--preview] [--quiet]

Also possible, through the full application (slower to start; Slicer reads its own options
first, so the script's --help needs `--` before it):

    Slicer --no-main-window --python-script cmbdetect_slicer_batch.py --input IN ... --output OUT
    Slicer --no-main-window --python-script cmbdetect_slicer_batch.py -- --help

In an installed extension the script lies in
<extension folder>/lib/Slicer-X.Y/qt-scripted-modules/Scripts/; in a source tree in
CMBDetect/Scripts/. PythonSlicer sits beside the Slicer executable (bin/ on Linux/Windows).

IN: volume files (NIfTI, NRRD, MHA), folders of them or of DICOM series, or a CSV with an
`image` column. Per case: <case>.seg.nrrd, label map, probability map, lesion CSV (with each
lesion's MARS region, structure and side), the registration's QC picture and summary JSON, all on the input's grid (the same files and options as the project's command line,
`cmbdetect detect`, whose help follows this text). --quiet is advised under Slicer: its
Python console is not a terminal, so progress bars come out one line per refresh.

Requirements: torch (the PyTorch extension) and Resources/requirements.txt, installed by
pressing "Detect microbleeds" once in the CMBDetect module. --preview also needs matplotlib,
which Slicer does not ship: `PythonSlicer -m pip install matplotlib`, or leave --preview out.

Exit status: 0 when every case succeeded; 1 when a case failed, a requirement is missing or
anything unexpected happened (with its traceback); 2 for a usage error. The script always
exits, also under Slicer's --python-script, which otherwise keeps running after an error.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds CMBDetectLib

# Import name -> what to install. Testing/test_extension_layout.py checks that this lists
# every line of Resources/requirements.txt.
REQUIRED = {
    "torch": "torch (install the PyTorch extension, then press 'Detect microbleeds' once)",
    "skimage": "scikit-image",
    "nrrd": "pynrrd",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "nibabel": "nibabel",
}
# In requirements.txt, but this script works without them: torch eager runs the network
# instead of onnxruntime; psutil serves the module's Cancel, which a batch run has not.
OPTIONAL = {
    "onnxruntime": "onnxruntime",
    "onnx": "onnx",
    "psutil": "psutil",
    "platformdirs": "platformdirs",  # where the ONNX model cache lives; without it the folder is worked out by hand
}


def to_detect_argv(argv: list[str]) -> list[str]:
    """Our options to `cmbdetect detect`'s: --input IN... becomes the positional inputs.

    Positional inputs, as `cmbdetect detect` takes them, work too. Everything else (--output, --threshold, --min-size, --max-size, --device, --model,
    --batch-size, --phase, --phase-sign, --operating-point, --no-regions, --preview, --quiet) is passed through unchanged, so both commands stay one.
    """
    inputs: list[str] = []
    rest: list[str] = []
    taking_inputs = False
    for arg in argv:
        if arg in ("--input", "-i"):
            taking_inputs = True
        elif taking_inputs and not arg.startswith("-"):
            inputs.append(arg)
        else:
            taking_inputs = False
            if arg.startswith("--input="):
                inputs.append(arg.split("=", 1)[1])
            else:
                rest.append(arg)
    return inputs + rest


def missing_requirements(preview: bool = False) -> list[str]:
    """What is not installed here, as the package to install (matplotlib only for --preview).

    Looked up, not imported: importing torch alone takes seconds, and a package that is
    present but broken still ends the script (with its traceback, through run()).
    """
    wanted = dict(REQUIRED)
    if preview:
        wanted["matplotlib"] = "matplotlib (only for --preview)"
    missing = []
    for module, package in wanted.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def main(argv: list[str]) -> int:
    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)  # Slicer puts the module folder on the path; PythonSlicer does not
    if argv and argv[0] == "--":
        argv = argv[1:]  # `Slicer ... --python-script script -- --help`: Slicer may pass the `--` on
    wants_help = any(a in ("-h", "--help") for a in argv)
    if wants_help:
        print(__doc__)  # our --input form first; `cmbdetect detect`'s own help follows
    else:
        missing = missing_requirements(preview="--preview" in argv)
        if missing:
            hint = " (--preview alone needs matplotlib: leaving it out also works)" if any("matplotlib" in m for m in missing) else ""
            print(
                "error: CMBDetect's Python requirements are missing here: " + ", ".join(missing) + ".\n"
                "Install them by pressing 'Detect microbleeds' once in Slicer's CMBDetect module, or with "
                "`PythonSlicer -m pip install <package>`" + hint + ".",
                file=sys.stderr,
            )
            return 1
    from CMBDetectLib.commands import detect as detect_cmd

    try:
        return detect_cmd.main(to_detect_argv(argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return 0 if exc.code is None else (exc.code if isinstance(exc.code, int) else 1)


def run(argv: list[str]) -> int:
    """main(), with every exception turned into a traceback and exit status 1.

    Under `Slicer --python-script`, an exception that escapes the script leaves a window-less
    Slicer running for ever (only sys.exit / slicer.util.exit end it): nothing may escape.
    """
    try:
        return main(argv)
    except BaseException:  # noqa: BLE001 - KeyboardInterrupt and SystemExit too: always exit
        traceback.print_exc()
        return 1


def _exit(code: int) -> None:
    """Leave with `code`: through Slicer's event loop inside Slicer, else as a plain script."""
    try:
        import slicer

        if hasattr(slicer, "app"):  # the Slicer application, not slicer-core or PythonSlicer
            slicer.util.exit(code)
            return
    except ImportError:
        pass
    sys.exit(code)


if __name__ == "__main__":
    _exit(run(sys.argv[1:]))
