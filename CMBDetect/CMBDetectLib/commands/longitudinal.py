"""`cmbdetect longitudinal BASELINE FOLLOWUP -o OUT`: new microbleeds between two scans of one head,
and the ARIA-H grade (longitudinal/). For a cohort: `cmbdetect longitudinal --pairs-csv FILE -o OUT`.

    cmbdetect longitudinal sub01_m0.nii.gz sub01_m6.nii.gz -o changes/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "count new microbleeds between a baseline and a follow-up scan, and grade ARIA-H (research use only)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("scans", nargs="*", type=Path, metavar="SCAN", help="BASELINE FOLLOWUP: two volumes (or DICOM folders) of one head")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for the results (created if missing)")
    p.add_argument(
        "--pairs-csv", type=Path, default=None, metavar="FILE", help="a CSV with baseline, followup and (optional) case columns, one pair a row"
    )
    p.add_argument("--case", default=None, help="the pair's name, the outputs' prefix (default: the follow-up's case name)")
    p.add_argument("--model", default=None, help="detector: registry id or .safetensors with its card (default: the registry's)")
    p.add_argument("--candidate-model", default=None, metavar="ID_OR_FILE", help="candidate classifier (default: the one the detector's card names)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the network runs (default: CUDA if present)")
    p.add_argument("--no-regions", action="store_true", help="skip each scan's registration to the template (no MARS locations; faster)")
    p.add_argument("--force", action="store_true", help="redo every pair, even those done in OUT with the same parameters")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..io import case_name
    from ..longitudinal.pairs import LongitudinalParams, Pair, read_pairs_csv, run_pairs

    if not ((args.pairs_csv is None and len(args.scans) == 2) or (args.pairs_csv is not None and not args.scans)):
        print("error: give BASELINE FOLLOWUP, or --pairs-csv FILE, not both", file=sys.stderr)
        return 2
    try:
        pairs = read_pairs_csv(args.pairs_csv) if args.pairs_csv else [Pair(args.scans[0], args.scans[1], args.case or case_name(args.scans[1]))]
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    params = LongitudinalParams(model=args.model, candidate_model=args.candidate_model, device=args.device, regions=not args.no_regions)

    def report(outcome) -> None:
        if not outcome.ok:
            print(f"error: {outcome.error}", file=sys.stderr)
            return
        s = outcome.summary
        print(f"{outcome.case}: {s['new_microbleeds']} new, {s['persisting']} persisting, {s['resolved']} resolved; "
              f"ARIA-H {s['aria_h']} ({outcome.status})")  # fmt: skip

    outcomes = run_pairs(pairs, args.output, params, force=args.force, on_pair=report)
    return 0 if all(o.ok for o in outcomes) else 1
