"""`cmbdetect adapt --images DIR --truth DIR -o OUT` or `cmbdetect adapt --study STUDY.db -o OUT`:
adapt both stages to a site from its labelled cases or its readers' verdicts (training/adapt.py;
a study is read by CMBReviewLib/adaptation.py, imported here only, as commands/review.py does),
writing a model folder that `detect --model OUT` loads.

    cmbdetect adapt --images site/images --truth site/labels -o models/site-a --max-minutes 20
    cmbdetect adapt --study review/study.db -o models/site-a --max-minutes 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = ("adapt the two-stage model to a site: fine-tune the U-Net on its labelled cases, refit stage 2's context model towards the site "
        "(or fine-tune the classifier), calibrate, write a model folder")


def configure(p: argparse.ArgumentParser) -> None:
    from ..training.adapt import AdaptConfig

    d = AdaptConfig()
    p.add_argument("--study", type=Path, default=None,
                   help="a CMBReview study (instead of --images/--truth): its consensus lesions (correct, and missed ones with their grown "
                        "masks) are microbleeds; detections judged incorrect are samples of the mimic their reason names")
    p.add_argument("--images", type=Path, help="folder of the site's SWI volumes, <case>.nii.gz (NIfTI, NRRD, MHA)")
    p.add_argument("--truth", type=Path,
                   help="label maps as `evaluate --truth` reads them: TRUTH/labels/<case>.* or TRUTH/<case>.* (.seg.nrrd too), on the image's grid; "
                        "an optional TRUTH/mimics/ names the mimics of false candidates")
    p.add_argument("--phase", type=Path, default=None, help="optional folder of high-pass phase images <case>.nii.gz (radians)")
    p.add_argument("-o", "--output", required=True, type=Path, help="new folder for the adapted model (unet.*, classifier.*, work/)")
    p.add_argument("--model", default=None, help="the base model: registry id, .safetensors or model folder (default: the registry's default)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help=f"bound on the whole run, both trainings included (default {d.max_minutes:g})")
    p.add_argument("--calibration-fraction", type=float, default=d.calibration_fraction,
                   help=f"share of the cases held back to calibrate stage 2 and choose its operating points (default {d.calibration_fraction:g}; at least one case)")
    p.add_argument("--fine-tune-classifier", action="store_true",
                   help="fine-tune the candidate classifier on the fit cases and calibrate on the calibration cases, instead of keeping the "
                        "base classifier and refitting its context model on every case (the default where the base has one: it measured better)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the case split and the training (default 0)")
    p.add_argument("--id", default=d.model_id, help=f"id of the adapted model (default {d.model_id})")
    p.add_argument("--version", default=None, help="version of the adapted model (default: today's date)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.add_argument("--progress-lines", action="store_true",
                   help="progress as the Slicer worker's protocol on stdout (PROGRESS <fraction of --max-minutes> <message>, DONE <OUT>), "
                        "for CMBReview's Adapt button")


def _progress_lines(max_minutes: float):
    import time

    started = time.monotonic()

    def say(message: str) -> None:
        # The budget bounds the run, so the share of it spent is the progress a bar can show.
        fraction = min((time.monotonic() - started) / 60 / max_minutes, 0.99)
        print(f"PROGRESS {fraction:.4f} {message}", flush=True)

    return say


def run(args: argparse.Namespace) -> int:
    from ..errors import CaseError
    from ..training.adapt import AdaptConfig, adapt
    from ..training.sitecases import LabelledFolders

    if (args.study is None) == (args.images is None and args.truth is None):
        print("error: give either --study STUDY.db or --images DIR --truth DIR", file=sys.stderr)
        return 2
    if args.study is None and (args.images is None or args.truth is None):
        print("error: --images and --truth go together", file=sys.stderr)
        return 2
    if args.study is not None and args.phase is not None:
        print("error: --phase goes with --images; a study's cases have no phase images", file=sys.stderr)
        return 2
    if not args.max_minutes > 0:
        print(f"error: --max-minutes must be positive, not {args.max_minutes}", file=sys.stderr)
        return 2
    if not 0 < args.calibration_fraction < 1:
        print(f"error: --calibration-fraction must lie strictly between 0 and 1, not {args.calibration_fraction}", file=sys.stderr)
        return 2
    config = AdaptConfig(max_minutes=args.max_minutes, calibration_fraction=args.calibration_fraction, seed=args.seed, model_id=args.id,
                         fine_tune_classifier=args.fine_tune_classifier)  # fmt: skip
    if args.version:
        config.version = args.version
    say = _progress_lines(args.max_minutes) if args.progress_lines else (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.study is not None:
        from CMBReviewLib.adaptation import ReviewStudy

        source = ReviewStudy(args.study, progress=say)
    else:
        source = LabelledFolders(args.images, args.truth, args.phase)
    try:
        result = adapt(source, args.output, args.model, config, say)
    except (ValueError, CaseError, FileNotFoundError, KeyError) as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    refit = result.classifier_card.get("calibration_fit", {}).get("out_of_fold", False)
    print(f"fit cases: {', '.join(result.fit_cases)}; calibration cases: {', '.join(result.calibration_cases)}")
    print(f"stage 1: {result.unet_kept} U-Net kept; stage 2 " + ("context model refitted on " if refit else "samples ") + str(result.n_samples))
    from ..training.calibration import describe_fits

    where = "out-of-fold on the site's own cases, few" if refit else "the site's own calibration cases, few"
    print("\n".join(describe_fits(result.fits, where)))
    print(f"wrote {result.out} in {result.minutes:.1f} min; use it with: cmbdetect detect ... --model {result.out}")
    if args.progress_lines:
        print(f"DONE {result.out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m CMBDetectLib.commands.adapt ...`: this command alone, as CMBReview's Adapt button
    runs it inside Slicer, where the rest of the command line (synthesis, evaluation) is not shipped."""
    parser = argparse.ArgumentParser(prog="cmbdetect adapt", description=HELP)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
