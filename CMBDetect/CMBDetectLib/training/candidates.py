"""Training the candidate classifier (stage 2) on synthetic cases whose mimics are known.

1. Candidates come from two proposers. (a) The U-Net, exactly as at detection time
   (candidates.find_candidates), where its probability map is given (a folder of
   `<case>_prob.nii.gz`, as `cmbdetect detect --single-stage` writes) or computed here
   (`--unet`). (b) A cheap dark-spot proposer (black top-hat of the magnitude): every small
   dark structure in the size range, which is what the U-Net fires on, true or false. On a
   2-core CPU the U-Net costs minutes per case when the machine is shared; the dark-spot
   proposer costs seconds, so it is what makes a training set of many cases affordable.
   The classifier does not see the U-Net's probability, so both kinds of candidate look alike
   to it.
2. Each candidate is labelled from the synthetic engine's maps: a candidate that overlaps a
   labelled microbleed is a microbleed; otherwise it takes the mimic code (mimics/<case>,
   synth.MIMIC_CODES) that most of its mimic voxels carry: vein, calcification, iron-rich
   nucleus, air-tissue edge; a candidate on no mimic at all is "other". At most
   `max_per_class` dark-spot candidates of each mimic class are kept per case (veins alone
   give hundreds), all microbleeds are.
3. Patches (candidates.sample_patches) are cached per case in `OUT/patches/<case>.npz`, so an
   interrupted run starts where it stopped.
4. The classifier is trained with class-balanced sampling and augmentation (flips, 90-degree
   turns about the S axis, magnitude gain and gamma, phase withheld from half the samples so
   one network serves scans with and without phase, simple bleeds planted into some samples,
   planted.py), with early stopping on a validation split made by case. The best model is
   written as weights plus card.
"""

from __future__ import annotations

import copy
import csv
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..detection.candidates import (
    StageSettings,
    find_candidates,
    sample_patches,
    save_classifier,
    scaled_magnitude,
)
from ..detection.classifier import CandidateNet, ClassifierConfig
from ..detection.records import CLASSES, MICROBLEED
from ..errors import CaseError
from ..evaluation.metrics import instance_majority
from ..io import Volume, case_name, is_volume_file, read_volume
from .budget import next_epoch_fits
from .planted import plant

PATCHES = "patches"
# Planted bleeds go onto bleeds and into candidates on no mimic, never onto a mimic: that
# would teach the classifier that veins or calcifications are bleeds. (Planting into the deep
# nuclei as well, at --plant 0.4, kept 88% of the planted bleeds of Testing/bench_planted.py
# but tripled false positives in the shifted domain: docs/candidates.md.)
PLANT_INTO = (MICROBLEED, CLASSES.index("other"))
PROBABILITIES = "probabilities"
BEST = "best.safetensors"
LOG = "training_log.csv"

Progress = Callable[[str], None]


@dataclass
class CandidateTrainConfig:
    """Defaults: the recipe of the shipped classifier (0.5.0), but for --max-minutes."""

    epochs: int = 60
    samples_per_epoch: int = 2048  # drawn per epoch (see microbleed_share)
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    stop_patience: int = 8  # epochs without a lower validation loss
    val_fraction: float = 0.2
    phase_dropout: float = 0.5  # share of training samples shown without their phase
    black_level_p: float = 0.5  # share of training samples given a random black level (augment)
    cartoon_p: float = 0.3  # share of training samples drawn as a two-level cartoon (augment)
    # Share of the microbleed and "other" samples that get a simple bleed planted at their
    # centre and become microbleeds (planted.py): a bleed's look must not be one renderer's.
    plant_p: float = 0.3
    # Share of each epoch's samples that are microbleeds (the rest spread evenly over the
    # mimic classes); 0: every class equally likely. Above 1/6 it tilts a candidate that the
    # magnitude alone cannot settle (a round dark dot without phase: bleed or calcification?)
    # towards a bleed, as microbleeds are far commoner than calcifications among candidates.
    microbleed_share: float = 0.3
    max_minutes: float = 0.0  # 0: no limit
    seed: int = 0
    width: int = 8
    patch_size: int = 20
    patch_spacing_mm: float = 0.75
    max_per_class: int = 25  # dark-spot candidates per mimic class per case


@dataclass
class CaseFiles:
    name: str
    image: Path
    label: Path
    mimics: Path
    phase: Path | None = None


@dataclass
class CandidateSet:
    patches: np.ndarray  # (N, 4, S, S, S) float16
    labels: np.ndarray  # (N,) int, index into CLASSES
    cases: np.ndarray  # (N,) str
    has_phase: np.ndarray  # (N,) bool
    diameters: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sources: np.ndarray = field(default_factory=lambda: np.zeros(0, "U9"))  # "unet" | "dark_spot"


# ---------------------------------------------------------------------------- data


def _volumes(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {case_name(p): p for p in sorted(folder.iterdir()) if p.is_file() and is_volume_file(p)}


def list_cases(data: Path) -> list[CaseFiles]:
    """Cases of a `cmbdetect synth` folder; labels and mimic maps are required, phase optional."""
    data = Path(data)
    images = _volumes(data / "images")
    if not images:
        raise ValueError(f"{data} has no images/ folder with volumes (a `cmbdetect synth --out` folder is expected)")
    labels, mimics, phases = _volumes(data / "labels"), _volumes(data / "mimics"), _volumes(data / "phase")
    out = []
    for name, image in images.items():
        if name not in labels:
            raise CaseError(name, f"no label map in {data / 'labels'}")
        if name not in mimics:
            raise CaseError(name, f"no mimic map in {data / 'mimics'}: the candidate labels come from it (cmbdetect synth writes one per case)")
        out.append(CaseFiles(name, image, labels[name], mimics[name], phases.get(name)))
    return out


def candidate_classes(candidates: np.ndarray, n: int, truth: np.ndarray, mimics: np.ndarray) -> np.ndarray:
    """Class index (CLASSES) of candidates 1..n of a candidate label map, from the engine's maps.

    A candidate touching a labelled microbleed is a microbleed. Otherwise the majority of the
    non-zero mimic codes inside it names the mimic (codes 1-4 are CLASSES 1-4); none: other.
    """
    out = np.full(n, CLASSES.index("other"), int)
    if n == 0:
        return out
    code, has_mimic = instance_majority(candidates, n, mimics, 5)
    out[has_mimic] = code[has_mimic]
    out[instance_majority(candidates, n, truth > 0, 2)[1]] = MICROBLEED
    return out


DARK_SPOT_CONTRAST = 0.3  # black top-hat depth, in units of the white-matter signal
DARK_SPOT_WINDOW_MM = 7.0  # in-plane closing window: wider than a bleed, narrower than a sinus


def dark_spot_candidates(magnitude: np.ndarray, geometry, settings: StageSettings) -> tuple[np.ndarray, list]:
    """Components of small dark structures (black top-hat of the WM-scaled magnitude, in-plane)
    inside tissue, in the candidate size range: a cheap stand-in for the U-Net's proposals."""
    from scipy import ndimage

    from ..detection.lesions import extract_lesions

    n = int(np.ceil(DARK_SPOT_WINDOW_MM / min(geometry.spacing[0], geometry.spacing[1]))) | 1
    closed = ndimage.grey_closing(magnitude, size=(1, n, n))
    mask = (closed > 0.5) & (closed - magnitude > DARK_SPOT_CONTRAST)
    return extract_lesions(mask.astype(np.float32), geometry, 0.5, settings.min_diameter_mm, settings.max_diameter_mm)


def _cap(classes: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Indices kept: every microbleed, at most `limit` of each other class."""
    keep = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        if c != MICROBLEED and len(idx) > limit:
            idx = np.sort(rng.choice(idx, limit, replace=False))
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, int)


def unet_probability(volume: Volume, detector: str | None, case: str) -> np.ndarray:
    """Stage 1 alone: the detector's probability map on the native grid."""
    from ..detection.pipeline import DetectionParams, detect_volume

    return detect_volume(volume, DetectionParams(model=detector, single_stage=True), case=case).probability


def case_candidates(
    files: CaseFiles,
    settings: StageSettings,
    config: ClassifierConfig,
    probability_dir: Path | None,
    cache_dir: Path,
    detector: str | None = None,
    run_unet: bool = False,
    max_per_class: int = 25,
) -> dict[str, np.ndarray]:
    """Patches and classes of one case's candidates (cached in cache_dir/<case>.npz)."""
    cached = cache_dir / f"{files.name}.npz"
    if cached.is_file():
        with np.load(cached) as z:
            item = {k: z[k] for k in z.files}
        size = item["patches"].shape[-1]
        if size >= config.patch_size and (size - config.patch_size) % 2 == 0:
            # Same spacing, same centre: the central part of a larger cached patch is exactly
            # the smaller patch (sample_patches centres its voxel grid on the candidate).
            m = (size - config.patch_size) // 2
            item["patches"] = item["patches"][..., m : size - m, m : size - m, m : size - m]
            return item
    volume = read_volume(files.image, files.name)
    truth = read_volume(files.label, files.name)
    mimics = read_volume(files.mimics, files.name)
    for what, other in (("label map", truth), ("mimic map", mimics)):
        if other.shape != volume.shape or not other.geometry.matches(volume.geometry):
            raise CaseError(files.name, f"{what} is not on the image's grid")
    phase = None
    if files.phase is not None:
        phase_volume = read_volume(files.phase, files.name)
        if phase_volume.shape != volume.shape:
            raise CaseError(files.name, "phase image is not on the image's grid")
        phase = phase_volume.array.astype(np.float32)
    prob_file = None if probability_dir is None else _volumes(probability_dir).get(f"{files.name}_prob")
    probability = None
    if prob_file is not None:
        probability = read_volume(prob_file, files.name).array.astype(np.float32)
        if probability.shape != volume.shape:
            raise CaseError(files.name, f"probability map {prob_file.name} is not on the image's grid")
    elif run_unet:
        probability = unet_probability(volume, detector, files.name)
    magnitude = scaled_magnitude(volume.array)
    rng = np.random.default_rng(seed_of(files.name))
    centres, classes, sources, diameters = [], [], [], []
    proposers = [("dark_spot", lambda: dark_spot_candidates(magnitude, volume.geometry, settings))]
    if probability is not None:
        proposers.insert(0, ("unet", lambda: find_candidates(probability, volume.geometry, settings)))
    for source, propose in proposers:
        cand_map, cands = propose()
        found = candidate_classes(cand_map, len(cands), truth.array, mimics.array)
        keep = np.arange(len(cands)) if source == "unet" else _cap(found, max_per_class, rng)
        for i in keep:
            centres.append(cands[i].centroid_lps)
            classes.append(found[i])
            sources.append(source)
            diameters.append(cands[i].diameter_mm)
    s = config.patch_size
    if centres:
        patches = sample_patches(magnitude, phase, volume.geometry, np.array(centres), config)
    else:
        patches = np.zeros((0, config.in_channels, s, s, s), np.float32)
    out = {
        "patches": patches.astype(np.float16),
        "labels": np.array(classes, np.int8),
        "sources": np.array(sources, dtype="U9"),
        "diameters": np.array(diameters, np.float32),
        "has_phase": np.array(phase is not None),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{files.name}.tmp.npz"
    np.savez(tmp, **out)
    tmp.replace(cached)
    return out


def collect(
    data: list[Path],
    out: Path,
    settings: StageSettings,
    config: ClassifierConfig,
    probabilities: list[Path] | None = None,
    detector: str | None = None,
    progress: Progress | None = None,
    run_unet: bool = False,
    max_per_class: int = 25,
) -> CandidateSet:
    """Candidates of every case of every folder, labelled and patched."""
    cases = [c for d in data for c in list_cases(d)]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("two data folders hold cases with the same name")
    prob_dirs = probabilities or [None] * len(data)
    if len(prob_dirs) == 1 and len(data) > 1:
        prob_dirs = prob_dirs * len(data)
    folder_of = {c.name: prob_dirs[i] for i, d in enumerate(data) for c in list_cases(d)}
    parts, labels, case_ids, phase_flags, diameters, sources = [], [], [], [], [], []
    for n, files in enumerate(cases, start=1):
        item = case_candidates(files, settings, config, folder_of[files.name], Path(out) / PATCHES, detector, run_unet, max_per_class)
        parts.append(item["patches"])
        labels.append(item["labels"].astype(int))
        case_ids += [files.name] * len(item["labels"])
        phase_flags += [bool(item["has_phase"])] * len(item["labels"])
        diameters.append(item["diameters"])
        sources.append(item["sources"])
        if progress:
            by = {src: int((item["sources"] == src).sum()) for src in ("unet", "dark_spot")}
            progress(f"{n}/{len(cases)} {files.name}: {len(item['labels'])} candidates {by}")
    s = config.patch_size
    return CandidateSet(
        patches=np.concatenate(parts) if parts else np.zeros((0, config.in_channels, s, s, s), np.float16),
        labels=np.concatenate(labels) if labels else np.zeros(0, int),
        cases=np.array(case_ids),
        has_phase=np.array(phase_flags, bool),
        diameters=np.concatenate(diameters) if diameters else np.zeros(0),
        sources=np.concatenate(sources) if sources else np.zeros(0, "U9"),
    )


# ---------------------------------------------------------------------------- training


def augment(
    batch: np.ndarray,
    has_phase: np.ndarray,
    rng: np.random.Generator,
    phase_dropout: float,
    black_level_p: float = 0.5,
    cartoon_p: float = 0.0,
    planted: np.ndarray | None = None,
    spacing_mm: float = 0.75,
) -> np.ndarray:
    """Flips on every axis, 90-degree turns about S (the B0 axis: the phase's dipole pattern
    stays upright), a two-level cartoon of the magnitude or a random black level, magnitude
    gain and gamma, and phase withheld from some samples. Samples marked in `planted` get a
    simple bleed at their centre (planted.py) and no phase."""
    out = batch.astype(np.float32, copy=True)
    for n in range(len(out)):
        x = out[n]
        if planted is not None and planted[n]:
            x[0] = plant(np.clip(x[0], 0.0, None), spacing_mm, rng)
        for axis in (1, 2, 3):
            if rng.random() < 0.5:
                x = np.flip(x, axis=axis)
        x = np.rot90(x, k=int(rng.integers(4)), axes=(2, 3))
        x = np.ascontiguousarray(x)
        mag = np.clip(x[0], 0.0, None)
        if rng.random() < cartoon_p:
            # A cartoon of the patch: dark structures and tissue as two flat levels with fresh
            # noise, as a hand-made phantom or another simulator may draw them. Edge profiles and
            # texture then say nothing, and shape (and phase) must carry the decision.
            cut = rng.uniform(0.35, 0.7)
            mag = np.where(mag < cut, rng.uniform(0.0, 0.15), rng.uniform(0.8, 1.2)).astype(np.float32)
            mag = np.clip(mag + rng.normal(0.0, rng.uniform(0.0, 0.05), mag.shape).astype(np.float32), 0.0, None)
        elif rng.random() < black_level_p:
            # A random black level: everything below it turns black. Veins, nuclei and air edges
            # then look as dark as a bleed does (at 7 T or a long TE they do), so the network
            # must tell them apart by shape and phase, not by how dark they are.
            lo = rng.uniform(0.0, 0.6)
            mag = np.clip((mag - lo) / (1.0 - lo), 0.0, None)
        x[0] = rng.uniform(0.85, 1.15) * mag ** rng.uniform(0.8, 1.25)
        if not has_phase[n] or rng.random() < phase_dropout or (planted is not None and planted[n]):
            x[1:] = 0.0
        out[n] = x
    return out


def split_by_case(cases: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train/validation masks over candidates; whole cases go to one side."""
    names = sorted(set(cases.tolist()))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    n_val = max(1, int(round(fraction * len(names)))) if len(names) > 1 else 0
    val_names = {names[i] for i in order[:n_val]}
    val = np.array([c in val_names for c in cases], bool)
    return ~val, val


def _balanced_indices(labels: np.ndarray, n: int, rng: np.random.Generator, microbleed_share: float = 0.0) -> np.ndarray:
    """n indices drawn so that every present class is equally likely, or microbleeds with
    probability `microbleed_share` and the other classes evenly."""
    present = np.unique(labels)
    per_class = {c: np.flatnonzero(labels == c) for c in present}
    weights = np.full(len(present), 1.0 / len(present))
    others = present != MICROBLEED
    if microbleed_share > 0 and others.any() and (~others).any():
        weights = np.where(others, (1.0 - microbleed_share) / others.sum(), microbleed_share)
    classes = rng.choice(present, size=n, p=weights)
    return np.array([rng.choice(per_class[c]) for c in classes], int)


@torch.no_grad()
def predict(network: CandidateNet, patches: np.ndarray, with_phase: bool, batch_size: int = 64) -> np.ndarray:
    network.eval()
    out = []
    for start in range(0, len(patches), batch_size):
        x = patches[start : start + batch_size].astype(np.float32)
        if not with_phase:
            x[:, 1:] = 0.0
        out.append(torch.softmax(network(torch.from_numpy(x)), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


def _auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores))


def validation_figures(probs: np.ndarray, labels: np.ndarray, keep_at: float) -> dict[str, object]:
    kept = probs[:, MICROBLEED] >= keep_at
    bleed = labels == MICROBLEED
    figures: dict[str, object] = {
        "candidates": int(len(labels)),
        "microbleeds": int(bleed.sum()),
        "microbleeds_kept": int((kept & bleed).sum()),
        "mimics_kept": int((kept & ~bleed).sum()),
        "auc_microbleed_vs_rest": _auc(probs[:, MICROBLEED], bleed),
        "mimic_accuracy": None,
    }
    mimic = ~bleed & ~kept
    if mimic.any():
        guess = 1 + np.argmax(probs[mimic, 1:], axis=1)
        figures["mimic_accuracy"] = round(float((guess == labels[mimic]).mean()), 4)
    return figures


def train_classifier(
    data: CandidateSet,
    out: Path,
    config: CandidateTrainConfig,
    settings: StageSettings,
    card: dict,
    progress: Progress | None = None,
    init: CandidateNet | None = None,
) -> dict:
    """Train, keep the lowest-validation-loss model, write OUT/best.safetensors + card.

    `init`: fine-tune a copy of this network (its own configuration; `config`'s width and patch
    settings are not used), as `cmbdetect adapt` does; it is left unchanged."""
    report = progress or (lambda message: None)
    if len(data.labels) == 0:
        raise ValueError("no candidates found in the training cases: nothing to train on")
    if not (data.labels == MICROBLEED).any() or (data.labels == MICROBLEED).all():
        raise ValueError("the training candidates need both microbleeds and mimics")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_mask, val_mask = split_by_case(data.cases, config.val_fraction, config.seed)
    if not val_mask.any():
        val_mask = train_mask.copy()  # one case: validate on it (said in the card)
    if init is not None:
        network = copy.deepcopy(init)
        network.train()
    else:
        network = CandidateNet(ClassifierConfig(width=config.width, patch_size=config.patch_size, patch_spacing_mm=config.patch_spacing_mm))
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    # Validation loss weighs each class equally, as training sees them, so the many "other"
    # candidates cannot hide a poor microbleed score.
    val_labels = data.labels[val_mask]
    counts = np.bincount(val_labels, minlength=len(CLASSES)).astype(float)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    val_loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights / weights.sum() * (counts > 0).sum(), dtype=torch.float32))
    train_idx = np.flatnonzero(train_mask)
    val_patches = data.patches[val_mask]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_rows: list[dict[str, object]] = []

    def validation_loss() -> float:
        network.eval()
        with torch.no_grad():
            # Validation without phase and with it (where the case has one): both uses count.
            logits = []
            for with_phase in (False, True):
                for s in range(0, len(val_patches), 64):
                    x = val_patches[s : s + 64].astype(np.float32)
                    if not with_phase:
                        x[:, 1:] = 0.0
                    logits.append(network(torch.from_numpy(x)))
            val_y = torch.from_numpy(np.concatenate([val_labels, val_labels]).astype(np.int64))
            val_loss = float(val_loss_fn(torch.cat(logits), val_y))
        return val_loss

    best = (float("inf"), 0)
    best_state = None
    if init is not None:
        # The base network is epoch 0: fine-tuning that never beats it on validation is not kept.
        best = (validation_loss(), 0)
        best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        report(f"epoch 0 (the network fine-tuned from): validation loss {best[0]:.4f}")
    start = time.perf_counter()
    budget_s = config.max_minutes * 60
    epoch_seconds: list[float] = []
    for epoch in range(1, config.epochs + 1):
        # Nothing to keep yet (from scratch, first epoch): that epoch runs whatever the budget.
        if config.max_minutes and best_state is not None and not next_epoch_fits(time.perf_counter() - start, epoch_seconds, budget_s):
            report(f"stopping: another epoch (~{max(epoch_seconds, default=0) / 60:.1f} min) would not fit in the time budget of {config.max_minutes:g} minutes")
            break
        epoch_start = time.perf_counter()
        # With a model to keep already (an epoch, or the network fine-tuned from), the budget may
        # cut this epoch short; it is then not counted (training/budget.py).
        can_abandon = bool(config.max_minutes) and best_state is not None
        abandoned = False
        network.train()
        chosen = train_idx[_balanced_indices(data.labels[train_idx], config.samples_per_epoch, rng, config.microbleed_share)]
        losses = []
        for b in range(0, len(chosen), config.batch_size):
            if can_abandon and time.perf_counter() - start >= budget_s:
                abandoned = True
                break
            idx = chosen[b : b + config.batch_size]
            labels = data.labels[idx].astype(np.int64)
            planted = np.isin(labels, PLANT_INTO) & (rng.random(len(idx)) < config.plant_p)
            labels[planted] = MICROBLEED
            x = torch.from_numpy(augment(data.patches[idx], data.has_phase[idx], rng, config.phase_dropout, config.black_level_p,
                                         config.cartoon_p, planted, config.patch_spacing_mm))  # fmt: skip
            y = torch.from_numpy(labels)
            optimiser.zero_grad()
            loss = loss_fn(network(x), y)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        if abandoned:
            report(f"stopping: the time budget of {config.max_minutes:g} minutes ran out during epoch {epoch}, which is not kept")
            break
        val_loss = validation_loss()
        minutes = (time.perf_counter() - start) / 60
        row = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5), "val_loss": round(val_loss, 5), "minutes": round(minutes, 2)}
        log_rows.append(row)
        with open(out / LOG, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            w.writerows(log_rows)
        if val_loss < best[0]:
            best = (val_loss, epoch)
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        report(f"epoch {epoch}: train loss {row['train_loss']:.4f}, validation loss {val_loss:.4f} (best {best[0]:.4f} at {best[1]})")
        epoch_seconds.append(time.perf_counter() - epoch_start)
        if epoch - best[1] >= config.stop_patience or (config.max_minutes and minutes >= config.max_minutes):
            break
    assert best_state is not None
    network.load_state_dict(best_state)
    probs_without = predict(network, val_patches, with_phase=False)
    probs_with = predict(network, val_patches, with_phase=True)
    has_phase_val = data.has_phase[val_mask]
    card = dict(card)
    card.setdefault("kind", "candidate-classifier")
    card["stage"] = settings.as_dict()
    card["cmbdetect_version"] = __version__
    card["training"] = {
        **asdict(config),
        "best_epoch": best[1],
        "best_val_loss": round(best[0], 5),
        "epochs_run": len(log_rows),
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "candidates_by_class": {c: int((data.labels == i).sum()) for i, c in enumerate(CLASSES)},
        "candidates_by_source": {src: int((data.sources == src).sum()) for src in ("unet", "dark_spot")},
        "train_candidates": int(train_mask.sum()),
        "val_candidates": int(val_mask.sum()),
        "train_cases": int(len(set(data.cases[train_mask].tolist()))),
        "val_cases": int(len(set(data.cases[val_mask].tolist()))),
        "validation_without_phase": validation_figures(probs_without, val_labels, settings.keep_at),
        "validation_with_phase": validation_figures(probs_with[has_phase_val], val_labels[has_phase_val], settings.keep_at)
        if has_phase_val.any() else None,
    }
    card["training_curve"] = log_rows
    return save_classifier(network, out / BEST, card)


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------- measuring


def restage(
    images: Path,
    probabilities: Path,
    out: Path,
    classifier: str,
    phase: Path | None = None,
    model_card: dict | None = None,
    operating_point: str | None = None,
) -> list[dict[str, object]]:
    """Stage 2 on saved stage-1 probability maps (`<case>_prob.nii.gz` of a single-stage run),
    writing the same files `cmbdetect detect` writes. The U-Net's probabilities are what
    detect_volume passes to the candidate stage, so the result is the two-stage pipeline's;
    comparing stages this way costs the U-Net once per case, not once per stage."""
    from ..detection.outputs import write_case_outputs
    from ..detection.pipeline import DetectionParams, DetectionResult, get_classifier
    from ..detection.candidates import run_candidate_stage

    loaded = get_classifier(classifier)
    card = model_card or {}
    rows = []
    probs = _volumes(Path(probabilities))
    for name, image_path in _volumes(Path(images)).items():
        volume = read_volume(image_path, name)
        prob = read_volume(probs[f"{name}_prob"], name).array.astype(np.float32)
        ph = None
        if phase is not None:
            ph = read_volume(_volumes(Path(phase))[name], name).array.astype(np.float32)
        stage = run_candidate_stage(volume.array, prob, volume.geometry, loaded, ph, operating_point)
        info = {
            "classifier_id": loaded.id, "classifier_version": loaded.version, **loaded.settings.as_dict(),
            "phase_used": ph is not None, "n_candidates": stage.n_candidates, "n_rejected": len(stage.rejected),
            "seconds": round(stage.seconds, 3),
        }  # fmt: skip
        result = DetectionResult(
            probability=stage.probability, labels=stage.labels, lesions=stage.lesions, geometry=volume.geometry,
            model_id=str(card.get("id", "restaged")), model_version=str(card.get("version", "")), model_trained=True,
            seconds=stage.seconds, params=DetectionParams(), rejected=stage.rejected,
            rejected_labels=stage.rejected_labels, candidate_stage=info,
        )  # fmt: skip
        write_case_outputs(result, Path(out), name)
        rows.append({"case": name, **info})
    return rows
