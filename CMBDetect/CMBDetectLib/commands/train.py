"""`cmbdetect train --data DIR --out DIR`: the paper's training recipe, resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "train (or fine-tune) the residual U-Net on labelled SWI cases"


def configure(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    p.add_argument("--data", required=True, type=Path, nargs="+", help="folders with images/ and labels/ (as `cmbdetect synth` writes), or CSVs with image,label columns")
    p.add_argument("--out", required=True, type=Path, help="folder for checkpoints, the best model, the log and curves")
    p.add_argument("--init", default=None, help="fine-tune from this model (registry id or .safetensors); default: train from scratch")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--width", type=int, default=d.base_channels, help=f"base channels of the U-Net (default {d.base_channels}; the paper used 64)")
    p.add_argument("--crop", type=int, default=d.crop, help=f"training crop size in pixels of the 384 plane (default {d.crop})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"crops per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.learning_rate, help=f"Adam learning rate (default {d.learning_rate:g})")
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch, help=f"steps between validations (default {d.steps_per_epoch})")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--plateau-patience", type=int, default=d.plateau_patience, help="epochs without better validation Dice before lr x0.1 (paper: 30)")
    p.add_argument("--stop-patience", type=int, default=d.stop_patience, help="epochs without better validation Dice before stopping (paper: 60)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="stop after this many minutes (0: no limit)")
    p.add_argument("--val-slices", type=int, default=d.val_slices, help=f"whole slices scored per validation (default {d.val_slices})")
    p.add_argument("--pos-weight", type=float, default=d.pos_weight, help="BCE weight of lesion pixels (default 1: the paper's plain BCE)")
    p.add_argument("--dice-weight", type=float, default=d.dice_weight, help=f"weight of a soft-Dice term added to the BCE (default {d.dice_weight:g}; 0 gives the paper's plain BCE, which learned far slower here: docs/training.md)")
    p.add_argument("--hard-negatives", type=float, default=d.hard_negatives, help=f"share of negative crops centred on dark non-lesion spots such as veins (default {d.hard_negatives:g}; 0: random, as in the paper)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model-id", default="cmbdetect-custom", help="id written into the model card (default cmbdetect-custom)")
    p.add_argument("--model-version", default=None, help="version written into the model card (default: today's date)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _defaults():
    from ..training.loop import TrainConfig

    return TrainConfig()


def run(args: argparse.Namespace) -> int:
    from ..errors import CaseError
    from ..training.loop import TrainConfig, train

    config = TrainConfig(
        base_channels=args.width, crop=args.crop, batch_size=args.batch_size, learning_rate=args.lr,
        steps_per_epoch=args.steps_per_epoch, max_epochs=args.max_epochs, plateau_patience=args.plateau_patience,
        stop_patience=args.stop_patience, max_minutes=args.max_minutes, val_slices=args.val_slices,
        pos_weight=args.pos_weight, dice_weight=args.dice_weight, hard_negatives=args.hard_negatives, seed=args.seed,
        init=args.init,
    )  # fmt: skip
    try:
        card = train(
            args.data, args.out, config, resume=args.resume, show_progress=not args.quiet,
            data_description={"folders": [str(d) for d in args.data]}, model_id=args.model_id, model_version=args.model_version,
        )  # fmt: skip
    except (ValueError, CaseError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t = card["training"]
    print(f"best validation Dice {t['best_val_dice']:.3f} at epoch {t['best_epoch']} (before training: {t['initial_val_dice']:.3f})")
    print(f"model: {args.out / 'best.safetensors'}  (use it with: cmbdetect detect ... --model {args.out / 'best.safetensors'})")
    return 0
