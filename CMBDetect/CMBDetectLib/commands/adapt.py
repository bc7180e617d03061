"""`cmbdetect adapt --images DIR --truth DIR -o OUT`: adapt both stages to a site from its
labelled cases (training/adapt.py), writing a model folder that `detect --model OUT` loads.

    cmbdetect adapt --images site/images --truth site/labels -o models/site-a --max-minutes 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "adapt the two-stage model to a site: fine-tune both stages on its labelled cases, calibrate on held-back ones, write a model folder"


def configure(p: argparse.ArgumentParser) -> None:
    from ..training.adapt import AdaptConfig

    d = AdaptConfig()
    p.add_argument("--images", required=True, type=Path, help="folder of the site's SWI volumes, <case>.nii.gz (NIfTI, NRRD, MHA)")
    p.add_argument("--truth", required=True, type=Path,
                   help="label maps as `evaluate --truth` reads them: TRUTH/labels/<case>.* or TRUTH/<case>.* (.seg.nrrd too), on the image's grid; "
                        "an optional TRUTH/mimics/ names the mimics of false candidates")
    p.add_argument("--phase", type=Path, default=None, help="optional folder of high-pass phase images <case>.nii.gz (radians)")
    p.add_argument("-o", "--output", required=True, type=Path, help="new folder for the adapted model (unet.*, classifier.*, work/)")
    p.add_argument("--model", default=None, help="the base model: registry id, .safetensors or model folder (default: the registry's default)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help=f"bound on the whole run, both trainings included (default {d.max_minutes:g})")
    p.add_argument("--calibration-fraction", type=float, default=d.calibration_fraction,
                   help=f"share of the cases held back to calibrate stage 2 and choose its operating points (default {d.calibration_fraction:g}; at least one case)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the case split and the training (default 0)")
    p.add_argument("--id", default=d.model_id, help=f"id of the adapted model (default {d.model_id})")
    p.add_argument("--version", default=None, help="version of the adapted model (default: today's date)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")


def run(args: argparse.Namespace) -> int:
    from ..errors import CaseError
    from ..training.adapt import AdaptConfig, adapt

    if not args.max_minutes > 0:
        print(f"error: --max-minutes must be positive, not {args.max_minutes}", file=sys.stderr)
        return 2
    if not 0 < args.calibration_fraction < 1:
        print(f"error: --calibration-fraction must lie strictly between 0 and 1, not {args.calibration_fraction}", file=sys.stderr)
        return 2
    config = AdaptConfig(max_minutes=args.max_minutes, calibration_fraction=args.calibration_fraction, seed=args.seed, model_id=args.id)
    if args.version:
        config.version = args.version
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        result = adapt(args.images, args.truth, args.output, args.model, config, args.phase, say)
    except (ValueError, CaseError, FileNotFoundError, KeyError) as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(f"fit cases: {', '.join(result.fit_cases)}; calibration cases: {', '.join(result.calibration_cases)}")
    print(f"stage 1: {result.unet_kept} U-Net kept; stage 2 samples {result.n_samples}")
    from ..training.calibration import describe_fits

    print("\n".join(describe_fits(result.fits, "the site's own calibration cases, few")))
    print(f"wrote {result.out} in {result.minutes:.1f} min; use it with: cmbdetect detect ... --model {result.out}")
    return 0
