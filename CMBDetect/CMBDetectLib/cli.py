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
    "quantize": "CMBDetectLib.commands.quantize",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand's options are set up: some subcommands'
    defaults come from modules that import torch, which `detect` must not wait for."""
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
        if command in (None, name):
            module.configure(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(first if first in SUBCOMMANDS else None).parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
