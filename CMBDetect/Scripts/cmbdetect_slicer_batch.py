"""Detect microbleeds in many volumes from Slicer without its GUI: the `cmbdetect detect` command.

    Slicer --no-main-window --python-script CMBDetect/Scripts/cmbdetect_slicer_batch.py \\
        --input IN [IN ...] --output OUT [--threshold 0.4] [--min-size 2] [--max-size 10] \\
        [--device auto|cpu|cuda] [--model ID_OR_FILE] [--batch-size N] [--quiet]

IN: volume files (NIfTI, NRRD, MHA), folders of them or of DICOM series, or a CSV with an
`image` column. Per case the outputs are those of `cmbdetect detect`: <case>.seg.nrrd,
label map, probability map, lesion CSV and summary JSON, all on the input's grid.

It also runs under plain Python (`python cmbdetect_slicer_batch.py ...`) with CMBDetectLib's
requirements installed. Inside Slicer, install them first by pressing "Detect microbleeds"
once in the CMBDetect module (or torch via the PyTorch extension and pip for the rest).
On Windows, Slicer shows console output only when started from a console (Slicer.exe --python-script
with output redirected, or SlicerApp-real.exe).

Exit status: 0 when every case succeeded, non-zero otherwise (as `cmbdetect detect`).
"""

from __future__ import annotations

import os
import sys

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds CMBDetectLib


def to_detect_argv(argv: list[str]) -> list[str]:
    """Our options to `cmbdetect detect`'s: --input IN... becomes the positional inputs.

    Positional inputs, as `cmbdetect detect` takes them, work too. Everything else (--output, --threshold, --min-size, --max-size, --device, --model,
    --batch-size, --quiet) is passed through unchanged, so both commands stay one.
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


def main(argv: list[str]) -> int:
    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)  # Slicer puts the module folder on the path; plain Python does not
    from CMBDetectLib.commands import detect as detect_cmd

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)  # our --input form first; `cmbdetect detect`'s own help follows
    try:
        return detect_cmd.main(to_detect_argv(argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 1


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
    _exit(main(sys.argv[1:]))
