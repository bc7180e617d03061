"""`cmbdetect train-candidates --data DIR --out DIR`: train the candidate classifier (stage 2)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "train the candidate classifier (stage 2) on synthetic cases with mimic maps"


def configure(p: argparse.ArgumentParser) -> None:
    from ..detection.candidates import CANDIDATE_MAX_MM, CANDIDATE_MIN_MM, CANDIDATE_THRESHOLD, DEFINITE_AT, KEEP_AT
    from ..training.candidates import CandidateTrainConfig

    d = CandidateTrainConfig()
    p.add_argument("--data", required=True, type=Path, nargs="+", help="`cmbdetect synth` folders (images/, labels/, mimics/, optional phase/)")
    p.add_argument("--out", required=True, type=Path, help="folder for the patch cache, the log and the model")
    p.add_argument("--probabilities", type=Path, nargs="+", default=None,
                   help="folders of <case>_prob.nii.gz from `cmbdetect detect --single-stage` (one, or one per --data); default: run the U-Net here")
    p.add_argument("--unet", action="store_true", help="run the U-Net on cases without a probability map (slow on a CPU); default: dark-spot proposals only for them")
    p.add_argument("--detector", default=None, help="U-Net for --unet (default: the registry's default)")
    p.add_argument("--max-per-class", type=int, default=d.max_per_class, help=f"dark-spot candidates kept per mimic class per case (default {d.max_per_class})")
    p.add_argument("--candidate-threshold", type=float, default=CANDIDATE_THRESHOLD, help=f"U-Net threshold for candidates (default {CANDIDATE_THRESHOLD})")
    p.add_argument("--min-size", type=float, default=CANDIDATE_MIN_MM, help=f"smallest candidate, mm (default {CANDIDATE_MIN_MM:g})")
    p.add_argument("--max-size", type=float, default=CANDIDATE_MAX_MM, help=f"largest candidate, mm (default {CANDIDATE_MAX_MM:g})")
    p.add_argument("--keep-at", type=float, default=KEEP_AT, help=f"P(microbleed) at which a candidate is kept (default {KEEP_AT})")
    p.add_argument("--definite-at", type=float, default=DEFINITE_AT, help=f"P(microbleed) at which a kept lesion is 'definite' (default {DEFINITE_AT})")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--samples-per-epoch", type=int, default=d.samples_per_epoch)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--stop-patience", type=int, default=d.stop_patience, help="epochs without a lower validation loss before stopping")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="stop after this many minutes of training (0: no limit)")
    p.add_argument("--width", type=int, default=d.width, help=f"channels of the first block (default {d.width})")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help=f"patch side in voxels of {d.patch_spacing_mm} mm (default {d.patch_size})")
    p.add_argument("--microbleed-share", type=float, default=d.microbleed_share,
                   help=f"share of each epoch's samples that are microbleeds, the rest even over the mimics; 0: every class equally likely (default {d.microbleed_share:g})")
    p.add_argument("--cartoon", type=float, default=d.cartoon_p,
                   help=f"share of samples drawn as a two-level cartoon, so that shape rather than texture decides (default {d.cartoon_p:g})")
    p.add_argument("--black-level", type=float, default=d.black_level_p, help=f"share of samples given a random black level (default {d.black_level_p:g})")
    p.add_argument("--plant", type=float, default=d.plant_p,
                   help=f"share of the bleed and no-mimic samples given a simple planted bleed (sphere, ellipsoid or Gaussian blob) and labelled microbleed (default {d.plant_p:g})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model-id", default="cmbdetect-candidates-custom")
    p.add_argument("--model-version", default=None, help="version in the card (default: today's date)")
    p.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    import datetime

    from ..detection.candidates import StageSettings
    from ..detection.classifier import ClassifierConfig
    from ..errors import CaseError
    from ..training.candidates import CandidateTrainConfig, collect, train_classifier

    if not (0 <= args.microbleed_share < 1 and 0 <= args.cartoon <= 1 and 0 <= args.black_level <= 1 and 0 <= args.plant <= 1):
        print("error: --microbleed-share must lie in [0, 1), --cartoon, --black-level and --plant in [0, 1]", file=sys.stderr)
        return 2
    if not 0 < args.candidate_threshold < 1 or not 0 <= args.min_size <= args.max_size:
        print("error: --candidate-threshold must lie in (0, 1) and --min-size/--max-size make a range", file=sys.stderr)
        return 2
    settings = StageSettings(args.candidate_threshold, args.min_size, args.max_size, args.keep_at, args.definite_at)
    config = CandidateTrainConfig(
        epochs=args.epochs, samples_per_epoch=args.samples_per_epoch, batch_size=args.batch_size, learning_rate=args.lr,
        stop_patience=args.stop_patience, max_minutes=args.max_minutes, width=args.width, seed=args.seed,
        max_per_class=args.max_per_class, patch_size=args.patch_size, microbleed_share=args.microbleed_share,
        cartoon_p=args.cartoon, black_level_p=args.black_level, plant_p=args.plant,
    )  # fmt: skip
    net = ClassifierConfig(width=config.width, patch_size=config.patch_size, patch_spacing_mm=config.patch_spacing_mm)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    card = {
        "id": args.model_id,
        "version": args.model_version or datetime.date.today().isoformat(),
        "title": "Candidate classifier (stage 2): microbleed or which mimic",
        "trained": True,
        "training_data": {"source": "synthetic only: cmbdetect synth, no patient data", "folders": [str(d) for d in args.data]},
        "intended_use": "Research only. Not validated on patients; not for clinical use.",
    }
    try:
        data = collect(args.data, args.out, settings, net, args.probabilities, args.detector, say, args.unet, args.max_per_class)
        card = train_classifier(data, args.out, config, settings, card, say)
    except (ValueError, CaseError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t = card["training"]
    print(f"{t['train_candidates']} training and {t['val_candidates']} validation candidates {t['candidates_by_class']}")
    print(f"best validation loss {t['best_val_loss']:.4f} at epoch {t['best_epoch']}; validation: {t['validation_without_phase']}")
    print(f"model: {args.out / 'best.safetensors'}  (use it with: cmbdetect detect ... --candidate-model {args.out / 'best.safetensors'})")
    return 0
