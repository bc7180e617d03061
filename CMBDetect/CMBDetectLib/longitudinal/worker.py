"""The child process of a comparison started from Slicer ("Compare with baseline"): two volumes
in, `cmbdetect longitudinal`'s outputs out, progress on stdout.

    python -m CMBDetectLib.longitudinal.worker --baseline B.nrrd --followup F.nrrd --out DIR
        [--case NAME] [--model ID_OR_FOLDER] [--operating-point count|review] [--device cpu|cuda|auto]

The same library call as the command line (pairs.run_pairs), in the protocol of the detection
worker (detection/worker.py: STAGE, PROGRESS, DONE and ERROR lines), so that runner.WorkerRun
starts, reads and cancels it as it does a detection. Files in DIR: those `cmbdetect longitudinal`
writes (baseline/, followup/, `<case>_changes.csv`, and `<case>_summary.json` last: its presence
means the run is complete). Printing and the exit status are this entry point's job; a pair
that is refused (it does not register) ends with ERROR and exit status 1, and no summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..detection.worker import HOLD_ENV, run_reporting
from .pairs import LongitudinalParams, Pair, run_pairs  # torch comes only with the detection

CASE = "followup"


class PairFailed(Exception):
    """The pair was refused or failed: its message is the whole story (no traceback)."""


def summary_file(case: str = CASE) -> str:
    return f"{case}_summary.json"


def _say(line: str) -> None:
    print(line, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m CMBDetectLib.longitudinal.worker", description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, type=Path)
    p.add_argument("--followup", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="folder for the comparison's files")
    p.add_argument("--case", default=CASE, help="the pair's name, the outputs' prefix")
    p.add_argument("--model", default=None, help="detector: registry id, .safetensors or adapted model folder")
    p.add_argument("--operating-point", choices=["count", "review"], default="count", help="what is counted (default: count)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    current = [""]

    def progress(stage: str, fraction: float, message: str) -> None:
        if stage != current[0]:
            current[0] = stage
            _say(f"STAGE {stage}")
            if os.environ.get(HOLD_ENV) == stage:
                while True:  # held for a test: the parent kills us
                    time.sleep(0.1)
        _say(f"PROGRESS {fraction:.4f} {message}")

    if not args.out.parent.is_dir():  # a cancelled run's work folder is gone: write nothing there
        raise FileNotFoundError(f"the work folder {args.out.parent} is gone")
    params = LongitudinalParams(model=args.model, operating_point=args.operating_point, device=args.device)
    (outcome,) = run_pairs([Pair(args.baseline, args.followup, args.case)], args.out, params, force=True, progress=progress)
    if not outcome.ok:
        raise PairFailed(outcome.error)
    _say("PROGRESS 1.00 done")
    _say(f"DONE {args.out}")


def main(argv: list[str] | None = None) -> int:
    return run_reporting(run, parse_args(sys.argv[1:] if argv is None else argv), plain=(PairFailed,))


if __name__ == "__main__":
    sys.exit(main())
