"""`cmbdetect calibrate TUNE -o OUT`: calibrate stage 2's P(microbleed) and choose its operating
points on a labelled tuning set (training/calibration.py), writing a new classifier (the same
weights, a card with the calibration) into OUT.

    cmbdetect calibrate heldout/tune -o models/ --version 0.6.0

TUNE is a `cmbdetect synth` folder (images/, labels/, and phase/ when written with --with-phase)
or any folder laid out the same way. Use a tuning set of its own seeds, from a domain the
classifier was not trained on, and report figures on other sets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "calibrate the candidate stage's P(microbleed) and choose its review/count operating points on a tuning set"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("tune", type=Path, help="tuning set: images/, labels/ (one id per microbleed), optionally phase/")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for the calibrated classifier (weights + card)")
    p.add_argument("--model", default=None, help="the detector whose U-Net proposes the candidates (default: the registry's)")
    p.add_argument("--classifier", default=None, help="candidate classifier to calibrate (default: the one the detector's card names)")
    p.add_argument("--id", default="cmbdetect-candidates", help="id of the calibrated classifier (default cmbdetect-candidates)")
    p.add_argument("--version", required=True, help="version of the calibrated classifier, e.g. 0.6.0")
    p.add_argument("--default-point", choices=["review", "count"], default="count", help="the operating point detect uses unless told (default count)")
    p.add_argument(
        "--context", nargs="*", type=Path, default=None, metavar="SET",
        help="also fit a context model (vessel continuity, shape, position: detection/context.py) on the tuning set "
        "and these labelled sets (of another domain, laid out like TUNE); the calibration is fitted on its out-of-fold P",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def score_set(folder: Path, model_spec: str | None, classifier, quiet: bool, context: bool) -> tuple[dict[str, list], set, int]:
    """Every candidate of a labelled set, per phase mode (with its context features when a
    context model is to be fitted), and the seeds its meta/ records."""
    from tqdm import tqdm

    from ..detection.pipeline import DetectionParams, detect_volume
    from ..io import case_name, is_volume_file
    from ..training.calibration import MODES, read_case_files, score_case

    images, labels, phases = folder / "images", folder / "labels", folder / "phase"
    if not images.is_dir() or not labels.is_dir():
        raise ValueError(f"{folder} must hold images/ and labels/")
    files = sorted(p for p in images.iterdir() if is_volume_file(p))
    scored: dict[str, list] = {mode: [] for mode in MODES}
    seeds: set = set()
    for image in tqdm(files, desc=f"scoring candidates of {folder.name}", disable=quiet):
        case = case_name(image)
        truth = next((p for p in labels.iterdir() if is_volume_file(p) and case_name(p) == case), None)
        if truth is None:
            raise ValueError(f"{case}: no label map in {labels}")
        phase = next((p for p in phases.iterdir() if is_volume_file(p) and case_name(p) == case), None) if phases.is_dir() else None
        volume, truth_array, phase_array = read_case_files(image, truth, phase)
        meta = folder / "meta" / f"{case}.json"
        if meta.is_file():
            seeds.add(json.loads(meta.read_text()).get("seed"))
        unet = detect_volume(volume, DetectionParams(model=model_spec, single_stage=True, device="cpu"), case=case)
        scored["no_phase"].append(score_case(case, volume.array, unet.probability, volume.geometry, truth_array, classifier, context=context))
        if phase_array is not None:
            scored["phase"].append(score_case(case, volume.array, unet.probability, volume.geometry, truth_array, classifier, phase_array, context))
    return scored, seeds, len(files)


def run(args: argparse.Namespace) -> int:
    from ..detection.candidates import save_classifier
    from ..detection.inference import select_device
    from ..detection.pipeline import card_classifier, get_classifier, get_model
    from ..training.calibration import calibrated_card, describe_fits, fit_mode

    model = get_model(args.model, select_device("cpu"))
    spec = args.classifier or card_classifier(model)
    if not spec:
        print(f"error: model {model.id} names no candidate classifier; pass --classifier", file=sys.stderr)
        return 2
    classifier = get_classifier(str(spec)).with_current_stage()
    context = args.context is not None
    try:
        scored, seeds, n_files = score_set(args.tune, args.model, classifier, args.quiet, context)
        extra = {mode: [] for mode in scored}
        extra_seeds: set = set()
        for folder in args.context or []:
            more, more_seeds, _ = score_set(folder, args.model, classifier, args.quiet, context)
            extra_seeds |= more_seeds
            for mode in extra:  # a set without phase/ adds nothing to the fit with phase
                extra[mode] += more[mode]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    fits = {mode: fit_mode(cases, extra[mode] if context else None) for mode, cases in scored.items() if cases}
    if "phase" not in fits:
        print("warning: the tuning set has no phase/ folder: scans with phase use the no-phase calibration", file=sys.stderr)
        fits["phase"] = fits["no_phase"]
    provenance = {
        "tuning_set": str(args.tune), "n_cases": n_files, "seeds": sorted(s for s in seeds if s is not None),
        "base_classifier": f"{classifier.id} {classifier.version}", "proposer": f"{model.id} {model.version}",
    }  # fmt: skip
    if context:
        provenance["context_sets"] = [str(f) for f in args.context]
        provenance["context_seeds"] = sorted(s for s in extra_seeds if s is not None)
    card = calibrated_card(classifier.card, fits, provenance, args.default_point)
    card["id"], card["version"] = args.id, args.version
    out = args.output / f"{args.id}-v{args.version}.safetensors"
    args.output.mkdir(parents=True, exist_ok=True)
    card = save_classifier(classifier.network, out, card)
    print("\n".join(describe_fits(fits, "tuning set")))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
