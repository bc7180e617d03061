"""`cmbdetect detect IN... -o OUT`: detect microbleeds in files, folders or a CSV list of cases."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "detect microbleeds in SWI volumes (NIfTI, NRRD, MHA, DICOM folders, or a CSV list)"


def configure(p: argparse.ArgumentParser) -> None:
    from ..detection.lesions import DEFAULT_THRESHOLD, MAX_DIAMETER_MM, MIN_DIAMETER_MM

    p.add_argument("inputs", nargs="+", metavar="IN", help="volume files, folders of volumes or DICOM series, or a CSV with an 'image' column")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for the results (created if missing)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"stage 1's probability threshold: with --single-stage it makes the lesions (default {DEFAULT_THRESHOLD}, the paper's); "
                        "with two stages it makes the candidates (default: the classifier card's, 0.15), and --operating-point decides which are kept")
    p.add_argument("--operating-point", choices=["review", "count"], default=None,
                   help="stage 2's threshold on calibrated P(microbleed), from the classifier's card: count (precision first, for burden counts; "
                        "the default) or review (sensitivity first, for an expert who triages every detection)")
    p.add_argument("--phase-sign", choices=["auto", "keep", "flip"], default="auto",
                   help="how to read the phase image's sign (vendors differ): auto (default) decides from the candidates themselves and "
                        "ignores the phase, with a warning in the summary, when the evidence is weak; keep or flip force it")
    p.add_argument("--min-size", type=float, default=MIN_DIAMETER_MM, help=f"smallest lesion kept, equivalent diameter in mm (default {MIN_DIAMETER_MM:g})")
    p.add_argument("--max-size", type=float, default=MAX_DIAMETER_MM, help=f"largest lesion kept, mm (default {MAX_DIAMETER_MM:g})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the network runs (default: CUDA if present, else CPU)")
    p.add_argument("--model", default=None, help="registry id or a .safetensors file with its .json card (default: the registry's default)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per forward pass (default 1 on CPU, 8 on CUDA)")
    p.add_argument("--engine", choices=["auto", "torch", "onnxruntime"], default="auto",
                   help="what runs the network: auto (default) takes onnxruntime on CPU when installed (about 2x eager), torch on CUDA")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8", "fp16"], default="auto",
                   help="the network's numbers: auto (default) takes bf16 on a CPU with avx512_bf16/amx_bf16, else fp32, and fp16 on CUDA; "
                        "int8 (ONNX Runtime, the model's shipped calibration) only when asked. README: Precision")
    p.add_argument("--dense", action="store_true", help="run the network over the whole plane of every slice, not only the head's box (same lesions, slower)")
    p.add_argument("--no-regions", action="store_true",
                   help="skip each lesion's MARS location (the registration to the MNI template, a few seconds a case): "
                        "the lesion CSV's mars_region, mars_structure and side stay empty, and no <case>_registration.png")
    p.add_argument("--preview", action="store_true", help="also write <case>_preview.png: each detection outlined on its slice, for a quick look")
    p.add_argument("--single-stage", action="store_true",
                   help="the paper's pipeline: U-Net and --threshold only, no candidate stage (the default model has a candidate classifier; cmbdetect-synth-c16-v0.2.0 is the single-stage model of the paper's design)")
    p.add_argument("--phase", type=Path, default=None, metavar="FILE_OR_FOLDER",
                   help="optional high-pass phase image(s) on the SWI grid, radians (a file for one case, or a folder of <case>.nii.gz for a batch): the candidate stage uses it to tell bleeds from calcifications")
    p.add_argument("--candidate-model", default=None, metavar="ID_OR_FILE",
                   help="candidate classifier (registry id or .safetensors with its card); default: the one the detector's card names")
    p.add_argument("--series", default=None, metavar="UID",
                   help="the Series Instance UID to read from a DICOM folder that holds several (one case; for a batch, a 'series' column in the case list)")
    p.add_argument("--dicom-out", type=Path, default=None, metavar="DIR",
                   help="also write a DICOM Segmentation (<case>_seg.dcm) and measurement report (<case>_sr.dcm) into DIR for each case read from a DICOM series")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    cohort = p.add_argument_group("cohorts", "resume, local worker processes, Dask clusters (README: Cohorts)")
    cohort.add_argument("--force", action="store_true", help="redo every case, even those already done in OUT with the same model and parameters")
    cohort.add_argument("--workers", type=int, default=1, metavar="N", help="run cases in N local processes, each with its share of the CPU cores (default 1)")
    cohort.add_argument("--scheduler", default=None, metavar="ADDRESS", help="send cases to a running Dask scheduler (tcp://host:8786); needs dask[distributed] and a file system all workers share")


def run(args: argparse.Namespace) -> int:
    from ..cohort.batch import detect_batch, exit_code, write_batch_table
    from ..detection.pipeline import DetectionParams
    from ..errors import BatchError, InputError

    if args.threshold is not None and not 0 < args.threshold < 1:
        print(f"error: --threshold must lie strictly between 0 and 1, not {args.threshold}", file=sys.stderr)
        return 2
    if args.operating_point and args.single_stage:
        print("error: --operating-point chooses stage 2's threshold on P(microbleed); --single-stage has no stage 2 (use --threshold)", file=sys.stderr)
        return 2
    if not 0 <= args.min_size <= args.max_size:
        print(f"error: --min-size {args.min_size} and --max-size {args.max_size} do not make a range", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers must be at least 1, not {args.workers}", file=sys.stderr)
        return 2
    if args.scheduler and args.workers > 1:
        print("error: --workers and --scheduler do not combine: the cluster's workers run the cases", file=sys.stderr)
        return 2
    if args.scheduler:
        from ..cohort.distributed import import_distributed

        try:
            import_distributed()  # only a cluster run needs Dask: say so before any work
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.phase is not None and not args.phase.exists():
        print(f"error: --phase {args.phase} does not exist", file=sys.stderr)
        return 2
    if args.dicom_out is not None:
        from ..export import check_available

        try:
            check_available()  # highdicom and a pydicom it supports: say so before any work
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from ..detection.lesions import DEFAULT_THRESHOLD

    params = DetectionParams(
        DEFAULT_THRESHOLD if args.threshold is None else args.threshold, args.min_size, args.max_size, args.device,
        args.batch_size, args.model, engine=args.engine, precision=args.precision, head_only=not args.dense, single_stage=args.single_stage,
        candidate_model=args.candidate_model, operating_point=args.operating_point, phase_sign=args.phase_sign,
        candidate_threshold=None if args.single_stage else args.threshold, regions=not args.no_regions,
    )  # fmt: skip
    try:
        from ..detection.inference import select_device
        from ..detection.pipeline import get_engine, get_model, resolved_precision, stage_two_classifier

        # Loaded once here, through the pipeline's cache, so a bad model or engine fails before any case runs.
        device = select_device(args.device)
        precision = resolved_precision(params, device)
        model = get_model(args.model, device)
        engine = get_engine(args.model, device, args.engine, precision.name)
        classifier = stage_two_classifier(params, model)
        if classifier is not None:
            classifier.keep_at(args.operating_point, False)  # a card without that point: say so now
        elif args.operating_point:
            raise ValueError(f"--operating-point needs a candidate stage, and model {model.id} has none")
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"network: {engine.name}, {precision.name} ({precision.reason}), {device.type}", file=sys.stderr)
    if precision.warning:
        print(f"warning: {precision.warning}", file=sys.stderr)
    if not model.trained:
        print(
            f"warning: model {model.id} is UNTRAINED (random weights): its detections mean nothing. "
            "It is there to exercise the pipeline until a trained model ships.",
            file=sys.stderr,
        )

    if args.phase is not None and classifier is None:
        print("warning: --phase is used by the candidate stage only, and this run has none (--single-stage, or a model without a candidate classifier)", file=sys.stderr)

    def print_case(o) -> None:
        if o.status == "skipped":
            print(f"{o.case}: skipped, done earlier with the same model and parameters ({o.n_lesions} microbleeds)")
        elif o.ok:
            print(f"{o.case}: {o.n_lesions} microbleeds ({o.n_small} small, {o.n_large} large) in {o.seconds:.1f} s")

    try:
        outcomes = detect_batch(
            args.inputs, args.output, params, show_progress=not args.quiet, on_case=print_case, preview=args.preview,
            force=args.force, workers=args.workers, scheduler=args.scheduler, phase=args.phase,
            series=args.series, dicom_out=args.dicom_out,
        )  # fmt: skip
    except (BatchError, InputError) as exc:  # raised before any case ran
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not outcomes:
        print("error: the inputs name no cases", file=sys.stderr)
        return 1
    table = args.output / "cmbdetect_batch.csv"
    try:
        args.output.mkdir(parents=True, exist_ok=True)
        write_batch_table(table, outcomes)
    except OSError as exc:
        print(f"error: cannot write the batch table {table}: {exc}", file=sys.stderr)
        table = None
    failed = [o for o in outcomes if not o.ok]
    done = len(outcomes) - len(failed)
    total = sum(o.n_lesions for o in outcomes if o.ok)
    skipped = sum(o.status == "skipped" for o in outcomes)
    note = f" ({skipped} skipped: done earlier)" if skipped else ""
    print(f"{done} of {len(outcomes)} cases done{note}, {total} microbleeds in all; results in {args.output}")
    if args.dicom_out is not None:
        not_dicom = [o.case for o in outcomes if o.ok and not Path(o.source).is_dir()]
        if not_dicom:
            print(f"warning: --dicom-out: {len(not_dicom)} case(s) were not read from a DICOM series, and have no "
                  f"DICOM objects (they would reference no source images): {', '.join(not_dicom)}", file=sys.stderr)  # fmt: skip
    for o in failed:
        print(f"  failed: {o.error}", file=sys.stderr)
    return exit_code(outcomes) if table is not None else 1


def main(argv: list[str] | None = None) -> int:
    """The same command as `cmbdetect detect`, for the Slicer batch script."""
    parser = argparse.ArgumentParser(prog="cmbdetect detect", description=HELP)
    configure(parser)
    return run(parser.parse_args(argv))
