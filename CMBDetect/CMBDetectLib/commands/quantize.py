"""`cmbdetect quantize --model ID`: calibrate a model's int8 activation ranges, once, when it is built."""

from __future__ import annotations

import argparse
import sys

HELP = "calibrate a model for --precision int8 on synthetic heads; writes <weights>.int8.json beside the weights and names it in the card"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="registry id, .safetensors file or model folder (default: the registry's default)")
    p.add_argument("--cases", type=int, default=3, help="synthetic heads to calibrate on (default 3)")
    p.add_argument("--slices", type=int, default=8, help="head slices per case fed to the calibrator (default 8)")
    p.add_argument("--method", choices=["minmax", "percentile"], default="minmax", help="how a range is taken from the activations (default minmax)")
    p.add_argument("--seed", type=int, default=9090, help="synth seed of the calibration heads (default 9090, unused by training)")


def run(args: argparse.Namespace) -> int:
    from ..training.int8 import build_calibration

    if args.cases < 1 or args.slices < 1:
        print("error: --cases and --slices must be at least 1", file=sys.stderr)
        return 2
    try:
        path, card = build_calibration(args.model, args.cases, slices_per_case=args.slices, method=args.method, seed=args.seed)
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    entry = card["int8_calibration"]
    print(f"{card.get('id')} {card.get('version')}: int8 ranges of {entry['inputs']} inputs ({entry['method']}) in {path} (sha256 {entry['sha256'][:12]}...)")
    return 0
