"""`cmbdetect evaluate`: score predictions against ground truth, write JSON, CSV and HTML."""

from __future__ import annotations

import argparse
import sys

HELP = (
    "Evaluate predictions against ground truth: pixel Dice/precision/recall, lesion metrics under the paper's "
    "rule, the touch rule and the 5 mm centre rule, FROC, patient level, ROC/AUC, bootstrap CIs; "
    "writes evaluation.json, cases.csv and report.html."
)

EXIT_CASE_FAILED = 1
EXIT_NOTHING_EVALUATED = 2


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, metavar="DIR",
                        help="predictions: <case>_lesions.nii.gz and <case>_prob.nii.gz from `cmbdetect detect`, "
                             "or any tool's mask <case>.nii.gz / <case>.nrrd (nonzero = lesion)")
    parser.add_argument("--truth", required=True, metavar="DIR",
                        help="ground truth: a synthetic output folder (labels/ and cases.csv) or a folder of label maps <case>.nii.gz")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="folder for evaluation.json, cases.csv and report.html")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26, help="3D connectivity of lesions (default 26)")
    parser.add_argument("--label-ids", action="store_true",
                        help="take each label value as one lesion instead of connected components (for instance maps whose lesions touch)")
    parser.add_argument("--overlap", type=float, default=0.4, metavar="F",
                        help="paper's rule: a true lesion is detected when more than this fraction is covered (default 0.4)")
    parser.add_argument("--distance-mm", type=float, default=5.0, metavar="MM", help="centre-distance rule: match below this distance (default 5)")
    parser.add_argument("--threshold", type=float, default=0.4,
                        help="only for predictions given as a probability map alone: threshold before the 2-10 mm filter (default 0.4)")
    parser.add_argument("--keep-p", type=float, default=None, metavar="P",
                        help="score only predicted lesions whose highest P(microbleed) in <case>_prob.nii.gz reaches P: another operating "
                             "point from the same outputs (detect at review, score the count point's threshold)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples over cases for 95%% CIs; 0 to skip (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--no-html", action="store_true", help="write only the JSON and CSV")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone
    from pathlib import Path

    from .. import __version__
    from ..evaluation.evaluate import Settings, evaluate_folders
    from ..evaluation.report import summary_text, write_report

    out = Path(args.out).resolve()
    if out in (Path(args.truth).resolve(), Path(args.pred).resolve()):
        # The truth folder has its own cases.csv: never write the report over the inputs.
        print(f"error: the output folder {out} must differ from the prediction and truth folders", file=sys.stderr)
        return EXIT_NOTHING_EVALUATED
    if not 0.0 <= args.overlap < 1.0:
        print(f"error: --overlap must lie in [0, 1), not {args.overlap}", file=sys.stderr)
        return EXIT_NOTHING_EVALUATED
    settings = Settings(
        connectivity=args.connectivity,
        use_label_ids=args.label_ids,
        overlap_fraction=args.overlap,
        distance_mm=args.distance_mm,
        threshold=args.threshold,
        keep_p=args.keep_p,
        n_bootstrap=max(args.bootstrap, 0),
        seed=args.seed,
    )

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        evaluation = evaluate_folders(args.pred, args.truth, settings, progress=not args.quiet, log=log)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOTHING_EVALUATED
    summary = evaluation.summary()
    inputs = {
        "pred": str(Path(args.pred).resolve()),
        "truth": str(Path(args.truth).resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cmbdetect_version": __version__,
    }
    summary = {"inputs": inputs, **summary}
    paths = write_report(summary, args.out, html_page=not args.no_html)
    if not args.quiet:
        print(summary_text(summary))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    if not evaluation.results:
        return EXIT_NOTHING_EVALUATED
    return EXIT_CASE_FAILED if evaluation.errors else 0
