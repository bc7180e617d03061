"""The child process of a detection started from Slicer: one volume in, files out, progress on stdout.

    python -m CMBDetectLib.detection.worker --input IN.nrrd --out DIR [--case NAME]
        [--threshold 0.4] [--min-size 2] [--max-size 10] [--device cpu|cuda|auto]
        [--model ID_OR_FILE] [--batch-size N] [--phase PHASE.nrrd] [--for-slicer]
        [--precision auto|fp32|bf16|int8|fp16]

Inside Slicer the Python is `PythonSlicer` (runner.py starts it), so the GUI process never
imports torch, never blocks, and a Cancel is a kill of this process at whatever stage it is.
Like the `commands/*` modules this is an entry point: printing and the exit status are its
job, and it holds no detection logic of its own (pipeline.detect_volume does the work).

Protocol, one flushed line each on stdout (runner.parse_line reads them):
    STAGE <name>                  model-load, preprocessing, inference, lesion-extraction, writing
    PROGRESS <fraction> <message> fraction of the whole run in [0, 1]
    DONE <DIR>                    every file is written
Anything else (warnings, a traceback) is log text. Exit status 0 only after DONE.

Files in DIR: the standard case outputs of `cmbdetect detect` (outputs.write_case_outputs;
not with --for-slicer, which writes only what the module reads), plus `probability.nrrd` (float32, the input's grid, uncompressed: it is read back at once,
and NRRD keeps the oblique geometry in double precision where NIfTI stores float32) and,
written last, `result.json` (the run's summary; with the candidate stage, also every candidate
and its verdict under "candidates", records.candidate_record).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

STAGES = ("model-load", "preprocessing", "inference", "lesion-extraction", "writing")
PROBABILITY_FILE = "probability.nrrd"
RESULT_FILE = "result.json"

# Tests only: name a stage here and the worker stops in it until killed, so that a Cancel at
# that stage can be tested on a tiny volume whose stages would otherwise be over at once.
HOLD_ENV = "CMBDETECT_WORKER_HOLD"


def _say(line: str) -> None:
    print(line, flush=True)


def _stage(name: str) -> None:
    _say(f"STAGE {name}")
    if os.environ.get(HOLD_ENV) == name:
        while True:  # held for a test: the parent kills us
            time.sleep(0.1)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m CMBDetectLib.detection.worker", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, type=Path, help="the volume (NRRD written by the Slicer module)")
    p.add_argument("--out", required=True, type=Path, help="folder for the result files")
    p.add_argument("--case", default="input", help="case name of the output files")
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--min-size", type=float, default=2.0)
    p.add_argument("--max-size", type=float, default=10.0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--phase", type=Path, default=None, help="high-pass phase (radians) on the input's grid, for the candidate stage")
    p.add_argument("--operating-point", choices=["review", "count"], default=None, help="stage 2's operating point (default: the classifier card's)")
    p.add_argument("--phase-sign", choices=["auto", "keep", "flip"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8", "fp16"], default="auto", help="the network's precision (README: Precision)")
    p.add_argument("--no-regions", action="store_true", help="skip each lesion's MARS location (no registration to the template)")
    p.add_argument("--for-slicer", action="store_true",
                   help="write only what the Slicer module reads (probability.nrrd, result.json), not the command line's file set")  # fmt: skip
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    _stage("model-load")
    _say("PROGRESS 0.00 loading the model")
    from ..io import read_phase, read_volume, write_volume
    from .inference import select_device
    from .outputs import write_case_outputs
    from .pipeline import DetectionParams, detect_volume, get_engine, resolved_precision
    from .records import candidate_record

    params = DetectionParams(
        args.threshold, args.min_size, args.max_size, args.device, args.batch_size, args.model,
        operating_point=args.operating_point, phase_sign=args.phase_sign, precision=args.precision, regions=not args.no_regions,
    )  # fmt: skip
    device = select_device(params.device)
    precision = resolved_precision(params, device)
    if precision.warning:
        _say(f"warning: {precision.warning}")
    # Cached: detect_volume reuses it. From the ONNX cache, this process never imports torch.
    engine = get_engine(params.model, device, params.engine, precision.name)
    _say(f"network: {engine.name}, {precision.name} ({precision.reason}), {device.type}")

    _stage("preprocessing")
    volume = read_volume(args.input, args.case)
    phase = read_phase(args.phase, args.case, volume) if args.phase else None
    stage = ["preprocessing"]

    def progress(fraction: float, message: str) -> None:
        # detect_volume reports "preprocessing", then "slice n/N", then "finding lesions".
        now = "inference" if message.startswith("slice") else ("lesion-extraction" if fraction >= 0.95 else "preprocessing")
        if now != stage[0]:
            stage[0] = now
            _stage(now)
        _say(f"PROGRESS {0.9 * fraction:.4f} {message}")  # the last 10 % are the files

    result = detect_volume(volume, params, progress=progress, case=args.case, phase=phase)

    _stage("writing")
    _say("PROGRESS 0.90 writing the results")
    # Never the parents: a missing work folder means the run was cancelled and cleaned up
    # (FileNotFoundError), and nothing may be written there again.
    args.out.mkdir(exist_ok=True)
    if not args.for_slicer:
        write_case_outputs(result, args.out, args.case)
    write_volume(result.probability, result.geometry, args.out / PROBABILITY_FILE, compress=False)
    summary = {"case": args.case, **result.summary()}
    if result.candidate_stage is not None:
        # Every candidate with its verdict, exactly: the module's live threshold re-cuts them.
        summary["candidates"] = [candidate_record(c) for c in (*result.lesions, *result.rejected)]
    tmp = args.out / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.out / RESULT_FILE)  # last: its presence means the run is complete
    _say("PROGRESS 1.00 done")
    _say(f"DONE {args.out}")


def run_reporting(run: Callable[[argparse.Namespace], None], args: argparse.Namespace, plain: tuple[type[Exception], ...] = ()) -> int:
    """`run(args)` in this protocol: an exception ends as one ERROR line and exit status 1, its
    traceback in the log first, unless its type is in `plain` (its message is the whole story).
    The comparison worker (longitudinal/worker.py) ends the same way."""
    try:
        run(args)
    except Exception as exc:  # noqa: BLE001 - the parent shows this line; the traceback goes to the log
        if isinstance(exc, plain):
            _say(f"ERROR {exc}")
        else:
            import traceback

            traceback.print_exc(file=sys.stdout)
            _say(f"ERROR {type(exc).__name__}: {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_reporting(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
