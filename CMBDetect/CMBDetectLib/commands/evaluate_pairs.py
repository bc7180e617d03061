"""`cmbdetect evaluate-pairs`: score `cmbdetect longitudinal` on pairs from `cmbdetect synth --pairs`.

    cmbdetect synth --pairs 20 --seed 9100 --out pairs/
    cmbdetect longitudinal --pairs-csv pairs/pairs.csv -o changes/
    cmbdetect evaluate-pairs --pred changes/ --truth pairs/ -o changes/evaluation_pairs.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = ("Score longitudinal results on synthetic pairs: new-bleed sensitivity (bootstrap CI), false new bleeds per pair, "
        "ARIA-H grade agreement (exact, linear-weighted kappa), registration error, seconds per pair")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path, metavar="DIR", help="the output folder of `cmbdetect longitudinal`")
    parser.add_argument("--truth", required=True, type=Path, metavar="DIR", help="the folder of `cmbdetect synth --pairs` (pairs.csv, truth/)")
    parser.add_argument("-o", "--out", type=Path, default=None, metavar="JSON",
                        help="where to write the JSON (default: DIR of --pred / evaluation_pairs.json)")
    parser.add_argument("--distance-mm", type=float, default=5.0, metavar="MM", help="a call matches a true bleed within this distance (default 5)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples over pairs for 95%% CIs; 0 to skip (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def run(args: argparse.Namespace) -> int:
    import json

    from ..errors import InputError
    from ..evaluation.pairs import evaluate_pairs, summary_table
    from ..io import atomic_path

    if not args.pred.is_dir():
        print(f"error: --pred {args.pred} is not a folder", file=sys.stderr)
        return 2
    try:
        result = evaluate_pairs(args.pred, args.truth, max(args.bootstrap, 0), args.seed, args.distance_mm)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or args.pred / "evaluation_pairs.json"
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(summary_table(result))
    print(f"wrote {out}")
    return 0 if result["graded"] else 1
