"""`cmbdetect synth`: write synthetic SWI cases with labels and metadata to a folder.

    cmbdetect synth --n 20 --seed 1 --out DIR [--controls 4] [--format nifti|nrrd]
    cmbdetect synth --n 200 --seed 1 --out DIR --domain train    # one part of the space
    cmbdetect synth --n 50 --seed 9100 --out DIR --domain shifted  # the held-out part
    cmbdetect synth --benchmark [--repeats 5]
    cmbdetect synth --pairs 20 --seed 9100 --out DIR   # baseline / follow-up pairs with the truth of what is new

Layout of DIR: images/<case>.nii.gz (float32 SWI), labels/<case>.nii.gz (uint16, one id per
microbleed), mimics/<case>.nii.gz (uint8: 1 vein, 2 calcification, 3 iron-rich nucleus,
4 air-tissue edge; synth.MIMIC_CODES), meta/<case>.json, cases.csv (one row per case, paths relative to DIR), and on
request phase/<case>.nii.gz, a montage PNG and a contrast statistics CSV. With --pairs, also
pairs.csv (case, baseline, followup: for `cmbdetect longitudinal --pairs-csv`) and
truth/<case>.json per pair (synth/pairs.py, docs/synth.md "Pairs").
"""

from __future__ import annotations

import argparse
import sys

# Light imports only: `cmbdetect --help` loads this module.
from ..synth.space import CONTRAST_CURVES, DEFAULT_SPACE, DOMAINS

NOISE_TYPES = DEFAULT_SPACE.noise_types

HELP = "Generate synthetic SWI cases with microbleeds, mimics and labels (deterministic from a seed)."

def _matrix(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"matrix must look like 384x384 (rows x columns), not {text!r}") from None
    if not (32 <= rows <= 1024 and 32 <= cols <= 1024):
        raise argparse.ArgumentTypeError(f"matrix sides must lie in 32-1024, not {text!r}")
    return rows, cols


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, not {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number >= 1")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=_non_negative, default=1, metavar="N", help="number of cases with microbleeds (default 1)")
    parser.add_argument("--controls", type=_non_negative, default=None, metavar="M",
                        help="number of control cases without microbleeds (default: one per five cases, N/5 rounded)")
    parser.add_argument("--seed", type=_non_negative, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--start", type=_non_negative, default=0, metavar="I",
                        help="index of the first case, to extend an existing set (default 0)")
    parser.add_argument("--out", metavar="DIR", help="output folder (required unless --benchmark)")
    parser.add_argument("--format", choices=("nifti", "nrrd"), default="nifti", help="volume file format (default nifti)")
    group = parser.add_argument_group("protocol overrides (applied to every case; default: drawn per case)")
    group.add_argument("--field-strength", type=float, choices=(1.5, 3.0, 7.0), dest="field_strength_t", help="B0 in tesla")
    group.add_argument("--te", type=float, dest="te_ms", metavar="MS", help="echo time in ms")
    group.add_argument("--matrix", type=_matrix, metavar="RxC", help="in-plane matrix, rows x columns, e.g. 384x384")
    group.add_argument("--slices", type=_positive, dest="n_slices", metavar="K", help="number of slices")
    group.add_argument("--thickness", type=float, dest="slice_thickness_mm", metavar="MM", help="slice thickness in mm")
    group.add_argument("--snr", type=float, metavar="X", help="white-matter SNR")
    group.add_argument("--vendor", choices=("Siemens", "Philips", "GE"), help="vendor reconstruction style")
    group.add_argument("--microbleeds", type=_non_negative, dest="n_microbleeds", metavar="N",
                       help="microbleeds per lesion case (default: drawn, mean about 6.5)")
    group.add_argument("--contrast-curve", choices=CONTRAST_CURVES, dest="contrast_curve",
                       help="vendor-like intensity curve (default: drawn)")
    group.add_argument("--noise-type", choices=NOISE_TYPES, dest="noise_type", help="noise model (default: drawn)")
    space = parser.add_argument_group("randomisation space and domain split (docs/synth.md)")
    space.add_argument("--domain", choices=DOMAINS, default="all",
                       help="all: the whole space; train: without the held-out contrast curve and B0 x TE band; "
                            "shifted: only those (default all)")
    space.add_argument("--space", type=_space_item, action="append", default=[], metavar="KEY=VALUE",
                       help="override one range or probability of the space, e.g. p_oblique=0, "
                            "bias_amplitude=0.1:0.3, held_out_curve=log, contrast_curves=gamma,log (repeatable)")
    extra = parser.add_argument_group("extras")
    extra.add_argument("--with-phase", action="store_true", help="also write the high-pass filtered phase (rad) to phase/")
    extra.add_argument("--montage", metavar="PNG", help="write a montage of sample slices with lesion outlines")
    extra.add_argument("--stats", metavar="CSV", help="write contrast statistics (a row per microbleed, a row per case for veins) and print summary tables")
    extra.add_argument("--quiet", action="store_true", help="no progress bar")
    pairs = parser.add_argument_group("longitudinal pairs (docs/synth.md, Pairs)")
    pairs.add_argument("--pairs", type=_positive, default=None, metavar="N",
                       help="write N baseline/follow-up pairs of one subject each instead of single cases: the head moved, "
                            "0-15 new bleeds so that every ARIA-H grade occurs, pairs.csv and truth/<case>.json")
    pairs.add_argument("--followup-protocol", choices=("same", "other", "mixed"), default="mixed",
                       help="the follow-up's protocol: the baseline's, another draw, or another draw for every other pair (default mixed)")
    pairs.add_argument("--max-rotation", type=float, default=10.0, metavar="DEG",
                       help="largest head rotation between the visits, degrees (default 10)")
    pairs.add_argument("--max-shift", type=float, default=10.0, metavar="MM", help="largest head shift between the visits, mm (default 10)")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", action="store_true",
                       help="time the generation of 384x384x100 cases and print the median (no files written)")
    bench.add_argument("--repeats", type=_positive, default=5, metavar="R", help="benchmark runs (default 5)")


def _space_item(text: str) -> tuple[str, object]:
    """KEY=VALUE for --space: a range lo:hi, a list a,b,c, or one value."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"--space takes KEY=VALUE (e.g. p_oblique=0), not {text!r}")
    key = key.strip().replace("-", "_")
    if ":" in value:
        try:
            return key, tuple(float(v) for v in value.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--space {key}: a range is lo:hi numbers, not {value!r}") from None
    if "," in value or key in ("contrast_curves", "noise_types"):
        return key, tuple(v.strip() for v in value.split(",") if v.strip())
    try:
        return key, float(value)
    except ValueError:
        return key, value


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    keys = ("field_strength_t", "te_ms", "matrix", "n_slices", "slice_thickness_mm", "snr", "vendor", "n_microbleeds",
            "contrast_curve", "noise_type")
    out: dict[str, object] = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "domain", "all") != "all":
        out["domain"] = args.domain
    if getattr(args, "space", None):
        out["space"] = dict(args.space)
    return out


def run(args: argparse.Namespace) -> int:
    if args.benchmark:
        from ..synth.benchmark import print_benchmark

        return print_benchmark(repeats=args.repeats, overrides=_overrides(args))
    if not args.out:
        print("cmbdetect synth: error: --out DIR is required (or use --benchmark)", file=sys.stderr)
        return 2
    if args.pairs is not None:
        return _run_pairs(args)
    controls = args.controls if args.controls is not None else int(round(args.n / 5.0))
    if args.n + controls == 0:
        print("cmbdetect synth: error: nothing to do: --n and --controls are both 0", file=sys.stderr)
        return 2

    from ..synth.writer import write_dataset

    try:
        write_dataset(
            out=args.out,
            n=args.n,
            controls=controls,
            seed=args.seed,
            start=args.start,
            fmt=args.format,
            overrides=_overrides(args),
            with_phase=args.with_phase,
            montage=args.montage,
            stats=args.stats,
            progress=not args.quiet,
        )
    except (ValueError, OSError) as exc:
        print(f"cmbdetect synth: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_pairs(args: argparse.Namespace) -> int:
    clash = [name for name, given in (("--controls", args.controls is not None), ("--montage", args.montage),
                                      ("--stats", args.stats), ("--microbleeds", args.n_microbleeds is not None)) if given]
    if clash:
        print(f"cmbdetect synth: error: --pairs makes pairs; {', '.join(clash)} belong(s) to single cases", file=sys.stderr)
        return 2
    from ..synth.pairs import write_pairs

    try:
        rows = write_pairs(args.out, args.pairs, args.seed, start=args.start, fmt=args.format, overrides=_overrides(args),
                           with_phase=args.with_phase, protocol=args.followup_protocol,
                           max_rotation_deg=args.max_rotation, max_shift_mm=args.max_shift, progress=not args.quiet)
    except (ValueError, OSError) as exc:
        print(f"cmbdetect synth: error: {exc}", file=sys.stderr)
        return 2
    grades = sorted({str(r["aria_h"]) for r in rows})
    print(f"{len(rows)} pairs in {args.out} (pairs.csv, truth/): ARIA-H grades {', '.join(grades)}")
    return 0
