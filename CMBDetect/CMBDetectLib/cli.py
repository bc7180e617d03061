"""`cmbdetect`: one command line for detection, synthesis, evaluation, training and benchmarks.

Each subcommand lives in its own module with `HELP`, `configure(parser)` and `run(args) -> int`;
heavy imports (torch, nilearn) happen inside `run`, so `cmbdetect --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, str] = {
    "detect": "CMBDetectLib.commands.detect",
    "synth": "CMBDetectLib.commands.synth",
    "evaluate": "CMBDetectLib.commands.evaluate",
    "train": "CMBDetectLib.commands.train",
    "benchmark": "CMBDetectLib.commands.benchmark",
    "cohort-benchmark": "CMBDetectLib.commands.cohort_benchmark",
    "review": "CMBDetectLib.commands.review",
    "train-candidates": "CMBDetectLib.commands.train_candidates",
    "calibrate": "CMBDetectLib.commands.calibrate",
    "adapt": "CMBDetectLib.commands.adapt",
    "longitudinal": "CMBDetectLib.commands.longitudinal",
    "evaluate-pairs": "CMBDetectLib.commands.evaluate_pairs",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="cmbdetect",
        description="Cerebral microbleed detection on SWI. Research software: not for clinical use.",
    )
    parser.add_argument("--version", action="version", version=f"cmbdetect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
