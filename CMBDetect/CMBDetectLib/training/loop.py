"""Training as in the paper: BCE, Adam 1e-3, x0.1 on a validation-Dice plateau, early stop.

Fan et al. 2022: 3-slice samples whose centre slices are positive and negative 1:1; binary
cross-entropy; Adam at 1e-3; learning rate x0.1 when validation Dice stalls for 30 epochs;
stop after 60 without improvement; keep the best-validation-Dice model; augmentation by
flips, rotation, translation and contrast. We train on random crops (translation comes from
where the crop falls) and validate on whole 384x384 slices, as inference sees them. An
"epoch" is a fixed number of steps (`steps_per_epoch`), since samples are drawn, not listed.
"""

from __future__ import annotations

import csv
import json
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .. import __version__
from ..detection.inference import neighbour_indices
from ..io import read_volume
from ..labels import read_label
from ..models import LoadedModel, load_model, save_model
from ..detection.network import NetworkConfig, ResUNet
from ..detection.preprocess import constants as preprocess_constants
from ..detection.preprocess import preprocess, to_plane
from .budget import next_epoch_fits

CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"


@dataclass
class TrainConfig:
    base_channels: int = 16
    crop: int = 128
    batch_size: int = 16
    learning_rate: float = 1e-3
    steps_per_epoch: int = 100
    max_epochs: int = 1000
    plateau_patience: int = 30  # epochs without a better validation Dice before lr x0.1
    stop_patience: int = 60  # epochs without a better validation Dice before stopping
    max_minutes: float = 0.0  # 0: no time limit
    val_fraction: float = 0.2
    val_slices: int = 160  # whole validation slices scored each epoch (positives first)
    pos_weight: float = 1.0  # BCE weight of lesion pixels; 1 is the paper's plain BCE
    dice_weight: float = 1.0  # weight of a soft-Dice term added to the BCE; 0 is the paper's plain BCE
    hard_negatives: float = 0.5  # share of negative crops centred on dark non-lesion spots (veins, nuclei, calcifications)
    threshold: float = 0.4
    seed: int = 0
    init: str | None = None  # fine-tune from this model (registry id or .safetensors)


@dataclass
class CaseData:
    name: str
    stack: np.ndarray  # (k, 384, 384) float16, preprocessed
    target: np.ndarray  # (k, 384, 384) bool
    positive: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # slices with lesion pixels
    negative: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    head: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), int))  # (row, col) inside the head, for negative crops
    dark: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), int))  # (slice, row, col) of dark spots away from lesions


def load_case(name: str, image_path: Path, label_path: Path) -> CaseData:
    volume = read_volume(image_path, name)
    labels = read_label(label_path, name, like=volume)
    stack, info = preprocess(volume.array, name)
    target = to_plane(labels > 0, info).astype(bool)
    per_slice = target.reshape(target.shape[0], -1).any(axis=1)
    # Negative crops are taken where there is tissue, where mimics live, not in the air.
    centre = stack[stack.shape[0] // 2]
    head = np.argwhere(centre[::8, ::8] > 0.2) * 8
    if head.size == 0:
        head = np.argwhere(np.ones((48, 48), bool)) * 8
    dark = dark_spots(stack, target, np.random.default_rng(zlib.crc32(name.encode())))
    return CaseData(name, stack.astype(np.float16), target, np.flatnonzero(per_slice), np.flatnonzero(~per_slice), head, dark)


def dark_spots(stack: np.ndarray, target: np.ndarray, rng: np.random.Generator, limit: int = 2000) -> np.ndarray:
    """(slice, row, col) of small dark structures inside the head, at least ~8 pixels from any lesion.

    These are where a microbleed detector goes wrong: veins, iron-rich nuclei, calcifications and
    air-tissue edges are as dark as bleeds, and random crops meet them too rarely to learn them
    apart. "Small and dark" is the black top-hat (closing minus image) over ~14 pixels, which
    picks veins and dots but not the sinuses' large air; its top 2% inside the head are kept.
    Computed on every other pixel, for speed; coordinates are on the full 384 plane.
    """
    image, lesion = stack[:, ::2, ::2].astype(np.float32), target[:, ::2, ::2]
    in_plane = np.zeros((1, 3, 3), bool)
    in_plane[0] = ndimage.generate_binary_structure(2, 1)
    inside = ndimage.binary_erosion(ndimage.binary_fill_holes(image > 0.2, in_plane), in_plane, iterations=3)
    if not inside.any():
        return np.zeros((0, 3), int)
    tophat = ndimage.grey_closing(image, size=(1, 7, 7)) - image
    near_lesion = ndimage.binary_dilation(lesion, iterations=4) if lesion.any() else lesion
    # At least 0.05 of contrast, so that a flat, noiseless image has no "darkest 2%".
    found = np.argwhere(inside & (tophat > max(float(np.quantile(tophat[inside], 0.98)), 0.05)) & ~near_lesion)
    if len(found) > limit:
        found = found[rng.choice(len(found), limit, replace=False)]
    return found * np.array([1, 2, 2])


def split_by_patient(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """About 80/20 by case (patient), never splitting one patient's slices across the two."""
    order = list(np.random.default_rng(seed).permutation(sorted(names)))
    n_val = max(1, int(round(val_fraction * len(order)))) if len(order) > 1 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


class SampleDrawer:
    """Draws 3-slice crops, half centred on a lesion and half negative.

    Negative crops are centred, by share `hard_negatives`, on a dark non-lesion spot of any slice;
    the rest at a random intracranial point of a lesion-free slice, as in the paper.
    """

    def __init__(self, cases: list[CaseData], crop: int, rng: np.random.Generator, hard_negatives: float = 0.0) -> None:
        self.cases = cases
        self.crop = crop
        self.rng = rng
        self.hard_negatives = hard_negatives
        self.with_dark = [c for c in cases if len(c.dark)]
        self.with_lesions = [c for c in cases if c.positive.size]
        self.with_negatives = [c for c in cases if c.negative.size]
        if not self.with_lesions:
            raise ValueError("no training case has a labelled lesion: nothing to learn from")

    def _crop_at(self, case: CaseData, k: int, centre: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        size, half = self.crop, self.crop // 2
        plane = case.stack.shape[1]
        r0 = int(np.clip(centre[0] - half, 0, plane - size))
        c0 = int(np.clip(centre[1] - half, 0, plane - size))
        idx = neighbour_indices(case.stack.shape[0])[k]
        x = case.stack[idx, r0 : r0 + size, c0 : c0 + size].astype(np.float32)
        y = case.target[k, r0 : r0 + size, c0 : c0 + size].astype(np.float32)
        return x, y

    def draw(self, positive: bool) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        if positive or not self.with_negatives:
            case = self.with_lesions[rng.integers(len(self.with_lesions))]
            k = int(rng.choice(case.positive))
            pixels = np.argwhere(case.target[k])
            r, c = pixels[rng.integers(len(pixels))]
            jitter = rng.integers(-self.crop // 3, self.crop // 3 + 1, size=2)  # translation
            return self._crop_at(case, k, (r + jitter[0], c + jitter[1]))
        if self.with_dark and rng.random() < self.hard_negatives:
            case = self.with_dark[rng.integers(len(self.with_dark))]
            k, r, c = case.dark[rng.integers(len(case.dark))]
            jitter = rng.integers(-self.crop // 3, self.crop // 3 + 1, size=2)
            return self._crop_at(case, int(k), (int(r + jitter[0]), int(c + jitter[1])))
        case = self.with_negatives[rng.integers(len(self.with_negatives))]
        k = int(rng.choice(case.negative))
        r, c = case.head[rng.integers(len(case.head))]
        return self._crop_at(case, k, (int(r), int(c)))

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.draw(positive=i % 2 == 0) for i in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])[:, None]


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips, rotation and contrast changes, the same geometric change for image and target."""
    x, y = x.copy(), y.copy()
    for n in range(x.shape[0]):
        if rng.random() < 0.5:
            x[n], y[n] = x[n][:, :, ::-1], y[n][:, :, ::-1]
        if rng.random() < 0.5:
            x[n], y[n] = x[n][:, ::-1, :], y[n][:, ::-1, :]
        turns = int(rng.integers(4))
        x[n], y[n] = np.rot90(x[n], turns, axes=(1, 2)), np.rot90(y[n], turns, axes=(1, 2))
        if rng.random() < 0.3:
            angle = float(rng.uniform(-15, 15))
            x[n] = ndimage.rotate(x[n], angle, axes=(1, 2), reshape=False, order=1, mode="nearest")
            y[n] = ndimage.rotate(y[n], angle, axes=(1, 2), reshape=False, order=1, mode="nearest") > 0.5
        gamma = float(np.exp(rng.uniform(-0.35, 0.35)))  # contrast: gamma 0.7-1.4
        gain, offset = float(rng.uniform(0.85, 1.15)), float(rng.uniform(-0.08, 0.08))
        x[n] = np.clip(np.clip(x[n], 0, 1) ** gamma * gain + offset, 0, 1)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


class SegmentationLoss(nn.Module):
    """Binary cross-entropy (the paper's loss), optionally plus a soft-Dice term.

    Microbleeds fill about 0.1% of a crop; the Dice term weighs lesion pixels against the
    lesion's own size rather than the whole crop, which plain BCE learns only slowly.
    """

    def __init__(self, pos_weight: float = 1.0, dice_weight: float = 0.0) -> None:
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.bce(logits, target)
        if self.dice_weight:
            p = torch.sigmoid(logits)
            inter = (p * target).sum()
            loss = loss + self.dice_weight * (1 - (2 * inter + 1) / (p.sum() + target.sum() + 1))
        return loss


def validation_slices(cases: list[CaseData], limit: int, seed: int) -> list[tuple[int, int]]:
    """(case index, slice) pairs: every lesion slice up to half the limit, then lesion-free slices."""
    rng = np.random.default_rng(seed)
    positives = [(i, int(k)) for i, c in enumerate(cases) for k in c.positive]
    negatives = [(i, int(k)) for i, c in enumerate(cases) for k in c.negative]
    rng.shuffle(positives)
    rng.shuffle(negatives)
    chosen = positives[: limit // 2]
    chosen += negatives[: limit - len(chosen)]
    return sorted(chosen)


@torch.no_grad()
def validation_dice(model: ResUNet, cases: list[CaseData], slices: list[tuple[int, int]], threshold: float, batch: int = 8) -> float:
    """Pixel Dice pooled over the validation slices, on whole 384x384 slices."""
    model.eval()
    inter = total = 0.0
    for start in range(0, len(slices), batch):
        chunk = slices[start : start + batch]
        x = np.stack([cases[i].stack[neighbour_indices(cases[i].stack.shape[0])[k]].astype(np.float32) for i, k in chunk])
        y = np.stack([cases[i].target[k] for i, k in chunk])
        p = torch.sigmoid(model(torch.from_numpy(x)))[:, 0].numpy() >= threshold
        inter += float(np.logical_and(p, y).sum())
        total += float(p.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def _plot_curves(log_rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # optional (Slicer lacks it): the log CSV holds the same figures
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in log_rows]
    fig, ax1 = plt.subplots(figsize=(7, 4), dpi=100)
    ax1.plot(epochs, [r["train_loss"] for r in log_rows], color="tab:blue", label="training loss")
    ax1.set_xlabel(f"epoch ({log_rows[0]['steps']} steps each)" if log_rows else "epoch")
    ax1.set_ylabel("training loss (BCE + soft Dice unless --dice-weight 0)", color="tab:blue", fontsize=8)
    ax1.set_yscale("log")
    for before, after in zip(log_rows, log_rows[1:]):
        if float(after["lr"]) < float(before["lr"]):
            ax1.axvline(after["epoch"], color="grey", linestyle=":", linewidth=1)
            ax1.annotate(f"lr {float(after['lr']):.0e}", (after["epoch"], 1), xycoords=("data", "axes fraction"), fontsize=7, color="grey", ha="left", va="top")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [r["val_dice"] for r in log_rows], color="tab:red", label="validation Dice")
    ax2.set_ylabel("validation pixel Dice", color="tab:red")
    ax2.set_ylim(0, 1)
    fig.suptitle("CMBDetect training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def find_pairs(data: Path) -> list[tuple[str, Path, Path]]:
    """(case, image, label) from DIR/images + DIR/labels, or a CSV with image and label columns."""
    from ..io import case_name, is_volume_file

    data = Path(data)
    if data.suffix.lower() == ".csv":
        with open(data, newline="") as f:
            rows = list(csv.DictReader(f))
        missing = {"image", "label"} - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"{data} needs columns image and label (missing: {', '.join(sorted(missing))})")
        out = []
        for r in rows:
            img, lab = data.parent / r["image"], data.parent / r["label"]
            out.append((r.get("case") or case_name(img), img, lab))
        return out
    images, labels = data / "images", data / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise ValueError(f"{data} must hold images/ and labels/ folders (or pass a CSV with image,label columns)")
    label_files = {}
    for p in labels.iterdir():
        if is_volume_file(p):
            name = case_name(p)
            label_files[name[: -len(".seg")] if name.endswith(".seg") else name] = p
    pairs = []
    for p in sorted(images.iterdir()):
        if is_volume_file(p):
            name = case_name(p)
            if name not in label_files:
                raise ValueError(f"{name}: image has no label map in {labels}")
            pairs.append((name, p, label_files[name]))
    if not pairs:
        raise ValueError(f"no images found in {images}")
    return pairs


def train(
    data: Path | list[Path],
    out: Path,
    config: TrainConfig,
    resume: bool = False,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
    data_description: dict | None = None,
    model_id: str = "cmbdetect-custom",
    model_version: str | None = None,
) -> dict:
    """Train, keeping the best-validation-Dice model as OUT/best.safetensors (+ card). Returns the card."""
    from tqdm import tqdm

    begun = time.time()  # --max-minutes counts the cases' loading and the first validation too
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    pairs = [p for d in (data if isinstance(data, (list, tuple)) else [data]) for p in find_pairs(Path(d))]
    names = [p[0] for p in pairs]
    if len(set(names)) != len(names):
        raise ValueError("two training cases share a name; case names must be unique across --data folders")
    train_names, val_names = split_by_patient(names, config.val_fraction, config.seed)
    by_name = {p[0]: p for p in pairs}
    log(f"{len(pairs)} cases: {len(train_names)} for training, {len(val_names)} for validation (split by case)")
    cases = {n: load_case(*by_name[n]) for n in tqdm(sorted(by_name), desc="preprocessing", disable=not show_progress)}
    train_cases = [cases[n] for n in train_names]
    val_cases = [cases[n] for n in val_names] or train_cases
    val_idx = validation_slices(val_cases, config.val_slices, config.seed)
    drawer = SampleDrawer(train_cases, config.crop, rng, config.hard_negatives)

    init_card: dict = {}
    if config.init:
        loaded: LoadedModel = load_model(config.init)
        model, init_card = loaded.network, loaded.card
        log(f"fine-tuning from {loaded.id} {loaded.version}")
    else:
        model = ResUNet(NetworkConfig(base_channels=config.base_channels))
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="max", factor=0.1, patience=config.plateau_patience)
    loss_fn = SegmentationLoss(config.pos_weight, config.dice_weight)

    state = {"epoch": 0, "best_dice": -1.0, "best_epoch": 0, "seconds": 0.0, "log": []}
    checkpoint = out / CHECKPOINT
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)  # our own file, and never a pickle of objects
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        scheduler.load_state_dict(saved["scheduler"])
        state = json.loads(saved["state"])
        torch.set_rng_state(saved["torch_rng"])
        rng = np.random.default_rng([config.seed, state["epoch"]])
        drawer.rng = rng
        log(f"resumed at epoch {state['epoch']} (best validation Dice {state['best_dice']:.3f})")

    untrained_dice = validation_dice(model, val_cases, val_idx, config.threshold) if state["epoch"] == 0 else None
    if untrained_dice is not None:
        log(f"validation Dice before training: {untrained_dice:.3f}")
        state["initial_dice"] = untrained_dice
    started = begun - state["seconds"]
    # The fine-tuned network is what a budget spent before the first epoch keeps (epoch 0).
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.init and state["epoch"] == 0 else None
    budget_s = config.max_minutes * 60
    epoch_seconds: list[float] = []
    for epoch in range(state["epoch"] + 1, config.max_epochs + 1):
        has_model = state["best_epoch"] > 0 or initial_state is not None  # else the first epoch runs whatever the budget
        if config.max_minutes and has_model and not next_epoch_fits(time.time() - started, epoch_seconds, budget_s):
            log(f"stopping: another epoch (~{max(epoch_seconds, default=0) / 60:.1f} min) would not fit in the time budget of {config.max_minutes:g} minutes")
            break
        epoch_start = time.time()
        # A model to keep already (the best epoch on disk, or the network fine-tuned from): the
        # budget may cut this epoch short, which is then not counted.
        can_abandon = bool(config.max_minutes) and has_model
        model.train()
        losses = []
        bar = tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch}", leave=False, disable=not show_progress)
        for _ in bar:
            x, y = augment(*drawer.batch(config.batch_size), rng)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if can_abandon and time.time() - started >= budget_s:
                break
        if can_abandon and time.time() - started >= budget_s:
            log(f"stopping: the time budget of {config.max_minutes:g} minutes ran out during epoch {epoch}, which is not kept")
            break
        dice = validation_dice(model, val_cases, val_idx, config.threshold)
        scheduler.step(dice)
        elapsed = time.time() - started
        row = {
            "epoch": epoch, "steps": config.steps_per_epoch, "train_loss": float(np.mean(losses)),
            "val_dice": dice, "lr": optimiser.param_groups[0]["lr"], "minutes": round(elapsed / 60, 2),
        }  # fmt: skip
        state["log"].append(row)
        improved = dice > state["best_dice"]
        if improved:
            state["best_dice"], state["best_epoch"] = dice, epoch
            card = _card(config, state, data_description, init_card, elapsed)
            card["id"], card["version"] = model_id, model_version or card["version"]
            save_model(model, out / BEST, card)
        log(f"epoch {epoch}: loss {row['train_loss']:.4f}  validation Dice {dice:.3f}{'  (best)' if improved else ''}  lr {row['lr']:.0e}  {row['minutes']:.1f} min")
        state["epoch"], state["seconds"] = epoch, elapsed
        _write_log(out, state["log"])
        torch.save(
            {
                "model": model.state_dict(), "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                "state": json.dumps(state), "torch_rng": torch.get_rng_state(),
            },  # fmt: skip
            out / (CHECKPOINT + ".tmp"),
        )
        (out / (CHECKPOINT + ".tmp")).replace(checkpoint)
        epoch_seconds.append(time.time() - epoch_start)
        if epoch - state["best_epoch"] >= config.stop_patience:
            log(f"stopping: no better validation Dice for {config.stop_patience} epochs")
            break
        if config.max_minutes and elapsed / 60 >= config.max_minutes:
            log(f"stopping: time budget of {config.max_minutes:g} minutes reached")
            break
    if state["best_epoch"] == 0 and initial_state is not None:
        # No epoch fitted: the network fine-tuned from is the best there is.
        model.load_state_dict(initial_state)
        state["best_dice"] = state.get("initial_dice", -1.0)
        card = _card(config, state, data_description, init_card, time.time() - started)
        card["id"], card["version"] = model_id, model_version or card["version"]
        save_model(model, out / BEST, card)
    card = json.loads((out / BEST).with_suffix(".json").read_text())
    return card


def _write_log(out: Path, rows: list[dict]) -> None:
    with open(out / "training_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot_curves(rows, out / "training_curves.png")


def _card(config: TrainConfig, state: dict, data_description: dict | None, init_card: dict, elapsed: float) -> dict:
    return {
        "id": "cmbdetect-custom",
        "version": time.strftime("%Y%m%d"),
        "title": "Residual U-Net trained with cmbdetect train",
        "trained": True,
        "cmbdetect_version": __version__,
        "preprocessing": preprocess_constants(),
        "training": {
            **asdict(config),
            "best_epoch": state["best_epoch"],
            "best_val_dice": round(state["best_dice"], 4),
            "initial_val_dice": round(state.get("initial_dice", math.nan), 4),
            "minutes": round(elapsed / 60, 1),
            "fine_tuned_from": init_card.get("id"),
        },
        "training_data": data_description,
        "intended_use": "Research only. Not validated on patients; not for clinical use.",
    }
