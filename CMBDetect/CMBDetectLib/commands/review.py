"""`cmbdetect review ACTION STUDY ...`: expert review studies (CMBReviewLib), from the command line.

    cmbdetect review create STUDY.db --images DIR --detections DIR   (or --cases CSV, or --longitudinal OUT)
    cmbdetect review add-reader STUDY.db NAME...
    cmbdetect review import STUDY.db FILE.csv|FILE.json
    cmbdetect review export STUDY.db FILE.csv|FILE.json
    cmbdetect review simulate STUDY.db --truth SYNTH_DIR --reader NAME -o FILE.csv
    cmbdetect review consensus STUDY.db -o DIR
    cmbdetect review report STUDY.db -o DIR
    cmbdetect review status STUDY.db
    cmbdetect review backup STUDY.db COPY.db
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "expert review: studies of readers' verdicts on detections, Table 4, kappas, consensus ground truth"


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sub.add_parser("create", help="create a study from cases and their `cmbdetect detect` outputs")
    c.add_argument("study", type=Path, help="the study's SQLite file to create (e.g. study.db)")
    c.add_argument("--images", type=Path, help="folder of the SWI volumes")
    c.add_argument("--detections", type=Path, help="folder of their `cmbdetect detect` results")
    c.add_argument("--cases", type=Path, help="or a CSV with columns image, detections (and case), paths relative to the CSV")
    c.add_argument("--longitudinal", type=Path, metavar="OUT",
                   help="or a `cmbdetect longitudinal` output folder: each pair's follow-up is a case, and its new lesions only are the detections to review")  # fmt: skip
    c.add_argument("--name", help="study name (default: the file's name)")
    c.add_argument("--match-radius", type=float, default=5.0, metavar="MM",
                   help="centroids closer than this (mm) are one candidate across readers (default 5)")
    a = sub.add_parser("add-reader", help="add readers to a study")
    a.add_argument("study", type=Path)
    a.add_argument("names", nargs="+", help="reader names (letters, digits, - and _: they name the reader's files)")
    i = sub.add_parser("import", help="store decisions from CSV or JSON files (all checked, then all stored or none; a file imported before is skipped)")
    i.add_argument("study", type=Path)
    i.add_argument("files", type=Path, nargs="+")
    e = sub.add_parser("export", help="write the current decisions as CSV, or as JSON with the full history")
    e.add_argument("study", type=Path)
    e.add_argument("file", type=Path)
    s = sub.add_parser("simulate", help="example decisions of a simulated reader who knows synthetic truth (for trying the workflow)")
    s.add_argument("study", type=Path)
    s.add_argument("--truth", type=Path, required=True, help="`cmbdetect synth` output folder (its labels/)")
    s.add_argument("--reader", required=True)
    s.add_argument("--error-rate", type=float, default=0.0, help="share of verdicts flipped and missed lesions overlooked (default 0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--out", type=Path, required=True, help="decisions CSV to write")
    k = sub.add_parser("consensus", help="export consensus ground truth (.seg.nrrd, label maps, train.csv)")
    k.add_argument("study", type=Path)
    k.add_argument("-o", "--out", type=Path, required=True)
    k.add_argument("--majority-only", action="store_true", help="ignore endorsed ground truths; use the readers' majority")
    r = sub.add_parser("report", help="write review.json, table4.csv, kappa.csv, cases.csv and review.html")
    r.add_argument("study", type=Path)
    r.add_argument("-o", "--out", type=Path, required=True)
    r.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for Fleiss' kappa CI (default 2000)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-html", action="store_true")
    t = sub.add_parser("status", help="print the study's cases, readers and progress, and check it (SQLite integrity, voxel files)")
    t.add_argument("study", type=Path)
    b = sub.add_parser("backup", help="copy the study and its voxel files, consistently, while readers may be at work")
    b.add_argument("study", type=Path)
    b.add_argument("dest", type=Path, help="the copy's SQLite file (its voxel files go to DEST.files/); never overwritten")


def run(args: argparse.Namespace) -> int:
    import sqlite3

    from CMBReviewLib.store import DAMAGED_HINT, Study, StudyError

    from CMBDetectLib.errors import CaseError

    try:
        if args.action == "create":
            return _create(args)
        with Study.open(args.study) as study:
            return ACTIONS[args.action](study, args)
    except (StudyError, CaseError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:  # damage met after the checks at opening
        print(f"error: {args.study}: SQLite: {exc}; `cmbdetect review status` checks the study; if it is damaged, {DAMAGED_HINT}", file=sys.stderr)
        return 2


def _create(args) -> int:
    from CMBReviewLib.store import StudyError
    from CMBReviewLib.study import case_list, create_study, longitudinal_case_list

    if args.longitudinal is not None:
        if args.images or args.detections or args.cases:
            raise StudyError("give --longitudinal OUT alone, without --images, --detections or --cases")
        cases = longitudinal_case_list(args.longitudinal)
    else:
        cases = case_list(args.images, args.detections, args.cases)
    added, errors = create_study(args.study, cases, args.name, args.match_radius)
    print(f"study {args.study}: {len(added)} case(s) added")
    for err in errors:
        print(f"  failed: {err}", file=sys.stderr)
    return 1 if errors else 0


def _add_reader(study, args) -> int:
    for name in args.names:
        study.add_reader(name)
    print(f"readers: {', '.join(study.readers().values())}")
    return 0


def _import(study, args) -> int:
    from CMBReviewLib.exchange import import_decisions

    for item in import_decisions(study, args.files):
        if item.counts is None:
            when = f" on {item.earlier['created']}" if "created" in item.earlier else " earlier in this command"
            print(f"{item.path}: already imported{when} (as {item.earlier['name']}); nothing stored")
        else:
            print(f"{item.path}: " + ", ".join(f"{n} {k}" for k, n in item.counts.items()))
    return 0


def _export(study, args) -> int:
    from CMBReviewLib.exchange import export_decisions

    print(f"wrote {export_decisions(study, args.file)}")
    return 0


def _simulate(study, args) -> int:
    from CMBReviewLib.exchange import simulate_decisions, write_rows

    rows = simulate_decisions(study, args.truth, args.reader, args.error_rate, args.seed)
    print(f"wrote {write_rows(args.out, rows)} ({len(rows)} rows, simulated reader {args.reader})")
    return 0


def _consensus(study, args) -> int:
    from CMBReviewLib.consensus import export_consensus

    written, skipped, failed = export_consensus(study, args.out, use_endorsed=not args.majority_only)
    for c in written:
        print(f"{c.case}: {c.n_lesions} lesion(s) from the {c.source}")
    for s in skipped:
        print(f"  skipped: {s}", file=sys.stderr)
    for f in failed:
        print(f"error: {f}", file=sys.stderr)
    print(f"consensus in {args.out}: labels/*.seg.nrrd, train.csv")
    return 0 if written and not failed else 1


def _report(study, args) -> int:
    from CMBReviewLib.analysis import analyse
    from CMBReviewLib.report import summary_text, write_report

    stats = analyse(study, n_boot=max(args.bootstrap, 0), seed=args.seed)
    paths = write_report(stats, args.out, html_page_too=not args.no_html)
    print(summary_text(stats))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _status(study, args) -> int:
    summary = study.summary()
    readers = study.readers()
    summary["progress"] = {name: f"{len(study.completed_cases(r))}/{summary['cases']} cases completed" for r, name in readers.items()}
    summary["problems"] = study.problems()
    print(json.dumps(summary, indent=1))
    for problem in summary["problems"]:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if summary["problems"] else 0


def _backup(study, args) -> int:
    dest = study.backup(args.dest)
    print(f"backup of {study.path} in {dest} (voxel files in {dest.name}.files/)")
    return 0


ACTIONS = {
    "add-reader": _add_reader, "import": _import, "export": _export, "simulate": _simulate,
    "consensus": _consensus, "report": _report, "status": _status, "backup": _backup,
}  # fmt: skip
