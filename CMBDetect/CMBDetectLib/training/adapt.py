"""Adapting the two-stage model to a site from its own labelled cases (`cmbdetect adapt`).

The cases come from a `SiteSource`: `LabelledFolders` (label maps as `evaluate --truth` reads
them) here, or a CMBReview study (CMBReviewLib/adaptation.py: the readers' consensus as label
maps, and their "incorrect" verdicts as a map of the mimics they named). The core never imports
CMBReviewLib; the command layer picks the source.

1. The site's cases are split by case, seeded, into *fit* cases (about 70%) and *calibration*
   cases (the rest, at least one each way).
2. Stage 1: the base U-Net is fine-tuned on the fit cases (training/loop.py, a small learning
   rate); the best validation Dice is kept, and that includes the base itself (epoch 0).
3. Stage 2, for a base whose classifier card has a context model (0.7.0 on): the base
   classifier is kept, and its context model (detection/context.py) is refitted towards the
   site on the adapted U-Net's candidates of every case (a candidate that overlaps a true lesion
   is a microbleed): the base's coefficients stay a fixed offset and only ridge-penalised
   corrections are fitted (training/calibration.py, fit_context_towards). Its out-of-fold P is
   calibrated and the operating points are chosen on it.
4. Stage 2, for a base without one: the adapted U-Net's candidates on the fit cases are the
   samples: a candidate that overlaps a true lesion is a microbleed, any other is "other" (or the
   mimic a `mimics/` map names, where the site has one), and a true lesion that no candidate
   reached is a microbleed sample at its centre; from a study, a detection the readers judged
   incorrect that no candidate reached is a sample of its mimic at its centre. A copy of the
   base classifier is fine-tuned on them (training/candidates.py), then calibrated and its
   operating points chosen on the calibration cases, which neither training step saw.
5. OUT holds unet.safetensors + unet.json (its card names classifier.safetensors, relative to
   the folder) and classifier.safetensors + classifier.json, with provenance; OUT/work holds the
   training logs and checkpoints. The shipped models are read, never written.

One time budget bounds the whole run: a share for each training loop, which stops before an
epoch that would not fit its share (training/budget.py) and keeps its best epoch.
"""

from __future__ import annotations

import csv
import datetime
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .. import __version__
from ..detection.candidates import (
    LoadedClassifier,
    StageSettings,
    find_candidates,
    sample_patches,
    save_classifier,
    scaled_magnitude,
)
from ..detection.classifier import ClassifierConfig
from ..detection.records import CLASSES, MICROBLEED
from ..errors import CaseError, InputError
from ..evaluation.metrics import instance_labels
from ..io import Geometry, Volume, read_phase, read_volume
from ..labels import read_label
from ..models import (
    FOLDER_WEIGHTS,
    LoadedModel,
    card_path,
    load_model,
    models_dir,
    read_registry,
    save_model,
)
from .budget import Budget
from .sitecases import SiteCase, SiteSource
from .calibration import MODES, ModeFit, calibrated_card, fit_mode, score_case
from .candidates import (
    CandidateSet,
    CandidateTrainConfig,
    candidate_classes,
    train_classifier,
)

CLASSIFIER_WEIGHTS = "classifier.safetensors"
WORK = "work"
Progress = Callable[[str], None]


@dataclass
class AdaptConfig:
    max_minutes: float = 20.0  # the whole run
    calibration_fraction: float = 0.3
    seed: int = 0
    unet_share: float = 0.45  # of the budget, for stage 1's fine-tuning
    classifier_reserve: float = 0.1  # of the budget, kept after stage 2's training for calibration and writing
    unet_learning_rate: float = 1e-4  # a tenth of training from scratch: adapt, do not forget
    unet_steps_per_epoch: int = 20  # short epochs, so the budget is kept to within one of them
    unet_batch_size: int = 8
    classifier_learning_rate: float = 1e-4
    classifier_samples_per_epoch: int = 512
    classifier_epochs: int = 60
    fine_tune_classifier: bool = False  # even where the base has a context model to refit (module docstring, 3 and 4)
    model_id: str = "cmbdetect-adapted"
    version: str = field(default_factory=lambda: datetime.date.today().isoformat())


@dataclass
class AdaptResult:
    out: Path
    unet_card: dict
    classifier_card: dict
    fits: dict[str, ModeFit]
    fit_cases: list[str]
    calibration_cases: list[str]
    unet_kept: str  # "adapted" | "base"
    n_samples: dict[str, int]
    minutes: float


# ---------------------------------------------------------------------------- inputs


@dataclass
class CaseArrays:
    volume: Volume
    truth: np.ndarray  # instances 1..n (connected components, as evaluate counts lesions)
    phase: np.ndarray | None
    mimics: np.ndarray | None
    verdicts: bool = False  # SiteCase.verdicts


def read_case(case: SiteCase) -> CaseArrays:
    """Image, truth (refused on another grid, never resampled), phase and mimic maps of one case."""
    volume = read_volume(case.image, case.name)
    truth, _ = instance_labels(read_label(case.truth, case.name, volume))
    phase = read_phase(case.phase, case.name, volume) if case.phase is not None else None
    mimics = None
    if case.mimics is not None:
        m = read_volume(case.mimics, case.name)
        if m.shape != volume.shape or not m.geometry.matches(volume.geometry):
            raise CaseError(case.name, "mimic map is not on the image's grid")
        mimics = np.rint(m.array).astype(np.int16)
    return CaseArrays(volume, truth.astype(np.int32, copy=False), phase, mimics, case.verdicts)


def check_cases(cases: list[SiteCase]) -> None:
    """Read every case once before any training: a bad case stops the run while it costs nothing."""
    problems, lesions = [], 0
    for case in cases:
        try:
            lesions += int(read_case(case).truth.max(initial=0))
        except (CaseError, ValueError, OSError) as exc:
            problems.append(str(exc) if str(exc).startswith(case.name) else f"{case.name}: {exc}")
    if problems:
        raise InputError("\n".join(problems))
    if len(cases) < 2:
        raise InputError(f"{len(cases)} case: adapting needs at least 2 (fit and calibration cases)")
    if lesions == 0:
        raise InputError("no case has a labelled microbleed: nothing to adapt to")


def split_cases(names: list[str], calibration_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(fit, calibration) by case, seeded; at least one case on each side."""
    order = list(np.random.default_rng(seed).permutation(sorted(names)))
    n_cal = min(max(1, int(round(calibration_fraction * len(order)))), len(order) - 1)
    return sorted(order[n_cal:]), sorted(order[:n_cal])


# ---------------------------------------------------------------------------- stage 2 samples


def truth_centres_lps(truth: np.ndarray, ids: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(n, 3) LPS centroids of the given truth instances."""
    if len(ids) == 0:
        return np.zeros((0, 3))
    kji = np.array(ndimage.center_of_mass(truth > 0, truth, ids), float).reshape(-1, 3)
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return (ijk1 @ geometry.ijk_to_lps().T)[:, :3]


def unreached_verdicts(mimics: np.ndarray, cand_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reviewed detections (regions of a verdict map, one class each) that no candidate
    touches: their class indices and a label map of them (1..n), for samples at their centres."""
    regions = np.zeros(mimics.shape, np.int32)
    classes: list[int] = []
    for code in np.unique(mimics[mimics > 0]):
        labelled, n = ndimage.label(mimics == code)
        for r in range(1, n + 1):
            region = labelled == r
            if not (cand_map[region] > 0).any():
                classes.append(int(code))
                regions[region] = len(classes)
    return np.array(classes, int), regions


def site_samples(
    arrays: CaseArrays, probability: np.ndarray, settings: StageSettings, config: ClassifierConfig
) -> dict[str, np.ndarray]:
    """Stage 2's training samples of one case: every candidate of stage 1, labelled from the
    truth (microbleed) or else the mimic map (its mimic) or else "other"; every true lesion no
    candidate touched, as a microbleed sample at its centre (what stage 1 missed is what a
    site's classifier most needs to see); and, with a verdict map (a review study), every
    detection readers judged incorrect that no candidate touched, as a sample of its mimic."""
    geometry = arrays.volume.geometry
    cand_map, cands = find_candidates(probability, geometry, settings)
    mimics = arrays.mimics if arrays.mimics is not None else np.zeros(arrays.truth.shape, np.uint8)
    # "other" (code 5) in a verdict map is the default class already; the engine's codes stop at 4.
    classes = candidate_classes(cand_map, len(cands), arrays.truth, np.where(mimics < CLASSES.index("other"), mimics, 0))
    touched = np.unique(arrays.truth[(cand_map > 0) & (arrays.truth > 0)])
    missed = np.setdiff1d(np.arange(1, int(arrays.truth.max(initial=0)) + 1), touched)
    if arrays.verdicts and arrays.mimics is not None:
        negative_classes, negatives = unreached_verdicts(np.where(arrays.truth > 0, 0, arrays.mimics), cand_map)
    else:
        negative_classes, negatives = np.zeros(0, int), np.zeros(arrays.truth.shape, np.int32)
    centres = np.concatenate([
        np.array([c.centroid_lps for c in cands]).reshape(-1, 3),
        truth_centres_lps(arrays.truth, missed, geometry),
        truth_centres_lps(negatives, np.arange(1, len(negative_classes) + 1), geometry),
    ])  # fmt: skip
    labels = np.r_[classes, np.full(len(missed), MICROBLEED), negative_classes].astype(np.int8)
    sources = np.array(["unet"] * len(cands) + ["missed"] * len(missed) + ["reviewed"] * len(negative_classes), dtype="U9")
    s = config.patch_size
    patches = (
        sample_patches(scaled_magnitude(arrays.volume.array), arrays.phase, geometry, centres, config)
        if len(centres) else np.zeros((0, config.in_channels, s, s, s), np.float32)
    )  # fmt: skip
    return {"patches": patches.astype(np.float16), "labels": labels, "sources": sources, "has_phase": np.array(arrays.phase is not None)}


def _candidate_set(items: dict[str, dict[str, np.ndarray]], config: ClassifierConfig) -> CandidateSet:
    s = config.patch_size
    names = list(items)
    parts = [items[n] for n in names]
    return CandidateSet(
        patches=np.concatenate([p["patches"] for p in parts]) if parts else np.zeros((0, config.in_channels, s, s, s), np.float16),
        labels=np.concatenate([p["labels"].astype(int) for p in parts]) if parts else np.zeros(0, int),
        cases=np.array([n for n in names for _ in range(len(items[n]["labels"]))]),
        has_phase=np.array([bool(items[n]["has_phase"]) for n in names for _ in range(len(items[n]["labels"]))], bool),
        sources=np.concatenate([p["sources"] for p in parts]) if parts else np.zeros(0, "U9"),
    )


# ---------------------------------------------------------------------------- the run


def _base_identity(base: str | None) -> str:
    """The base model as a registry id or a path: never None, which would mean 'from scratch' to the loop."""
    return base if base else str(read_registry()["default"])


def check_output(out: Path) -> None:
    out = Path(out)
    if (out / FOLDER_WEIGHTS).exists() or (out / CLASSIFIER_WEIGHTS).exists():
        raise InputError(f"{out} already holds a model; choose another folder (an adapted model is never overwritten)")
    shipped = models_dir().resolve()
    if out.resolve() == shipped or shipped in out.resolve().parents:
        raise InputError(f"{out} is inside the shipped models folder {shipped}, which adapt never writes")


def adapt(
    source: SiteSource,
    out: Path,
    base: str | None = None,
    config: AdaptConfig | None = None,
    progress: Progress | None = None,
) -> AdaptResult:
    """Adapt the base model (registry id, weights or model folder; None: the default) to the
    site's cases from `source` and write the new model into OUT (module docstring). Bad inputs
    raise InputError before any training, and leave nothing behind."""
    from ..detection.pipeline import (
        DetectionParams,
        card_classifier,
        detect_volume,
        get_classifier,
    )
    from .loop import TrainConfig, train

    config = config or AdaptConfig()
    say = progress or (lambda message: None)
    budget = Budget(config.max_minutes)
    out = Path(out)
    check_output(out)
    base_spec = _base_identity(base)
    base_model: LoadedModel = load_model(base_spec)
    classifier_spec = card_classifier(base_model)
    if not classifier_spec:
        raise InputError(f"model {base_model.id} {base_model.version} has no candidate classifier: adapt needs a two-stage model")
    # Scored as the card written here will decide (calibrated_card writes the current stage).
    base_classifier: LoadedClassifier = get_classifier(classifier_spec).with_current_stage()
    work = out / WORK
    made = out if not out.exists() else (work if not work.exists() else None)
    try:
        cases = source.cases(work / "inputs")
        check_cases(cases)
    except (InputError, CaseError):
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)  # what a source derived: nothing partial stays
        raise
    by_name = {c.name: c for c in cases}
    fit_names, cal_names = split_cases(list(by_name), config.calibration_fraction, config.seed)
    say(f"{len(cases)} cases: {len(fit_names)} to fit ({', '.join(fit_names)}), {len(cal_names)} to calibrate ({', '.join(cal_names)})")
    work.mkdir(parents=True, exist_ok=True)

    # Stage 1: fine-tune on the fit cases, from a case list in OUT/work (the loop's CSV input).
    fit_list = work / "fit_cases.csv"
    with open(fit_list, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "image", "label"])
        writer.writerows([n, str(Path(by_name[n].image).absolute()), str(Path(by_name[n].truth).absolute())] for n in fit_names)
    unet_minutes = max(config.unet_share * config.max_minutes - budget.elapsed(), 0.01)
    say(f"stage 1: fine-tuning {base_model.id} {base_model.version} for up to {unet_minutes:.1f} min")
    unet_config = TrainConfig(
        crop=128, batch_size=config.unet_batch_size, learning_rate=config.unet_learning_rate, steps_per_epoch=config.unet_steps_per_epoch,
        plateau_patience=5, stop_patience=10, max_minutes=unet_minutes, val_slices=64, seed=config.seed, init=base_spec,
    )  # fmt: skip
    trained = train(fit_list, work / "unet", unet_config, log=say, show_progress=False,
                    data_description={"source": source.description, "cases": fit_names},
                    model_id=config.model_id, model_version=config.version)  # fmt: skip
    t = trained["training"]
    # The base is epoch 0: fine-tuning that did not beat it on the fit cases' validation slices is not kept.
    unet_kept = "adapted" if t["best_val_dice"] > t["initial_val_dice"] else "base"
    unet_path = work / "unet" / "best.safetensors" if unet_kept == "adapted" else base_model.path
    say(f"stage 1: validation Dice {t['initial_val_dice']} (base) -> {t['best_val_dice']} (best epoch {t['best_epoch']}): {unet_kept} U-Net kept")

    # Stage 2. A base with a context model (0.7.0 on) keeps its classifier and has its context
    # model refitted towards the site on every case's candidates, out of fold by case: measured
    # on a simulated site, fine-tuning the classifier on 7 cases ranked worse than the base's
    # verdicts in context, and left 3 cases to calibrate on. A base without one gets its
    # classifier fine-tuned on the fit cases and calibrated on the calibration cases.
    priors = {mode: base_classifier.context_model(mode == "phase") for mode in MODES}
    refit = priors["no_phase"] is not None and not config.fine_tune_classifier
    stage2_names = fit_names + cal_names if refit else cal_names
    net_config = base_classifier.network.config
    settings = base_classifier.settings
    params = DetectionParams(model=str(unet_path), single_stage=True, device="cpu")
    samples: dict[str, dict[str, np.ndarray]] = {}
    probabilities: dict[str, np.ndarray] = {}
    scored: dict[str, list] = {mode: [] for mode in MODES}

    def score(name: str, a: CaseArrays, probability: np.ndarray, classifier: LoadedClassifier) -> None:
        scored["no_phase"].append(score_case(name, a.volume.array, probability, a.volume.geometry, a.truth, classifier, context=refit))
        if a.phase is not None:
            scored["phase"].append(score_case(name, a.volume.array, probability, a.volume.geometry, a.truth, classifier, a.phase, context=refit))

    # Stage 1 on every case, once: with a refit each case is scored at once (and its volumes let
    # go); otherwise the fit cases' candidates become the classifier's samples and the
    # calibration cases' probability maps are kept for the calibration after its training.
    for name in fit_names + cal_names:
        arrays = read_case(by_name[name])
        probability = detect_volume(arrays.volume, params, case=name).probability
        if refit:
            score(name, arrays, probability, base_classifier)
        elif name in fit_names:
            samples[name] = site_samples(arrays, probability, settings, net_config)
        else:
            probabilities[name] = probability
        say(f"stage 1: {name} done ({budget.elapsed():.1f} min)")

    base_card = {k: v for k, v in base_classifier.card.items() if k not in ("calibration", "operating_points", "calibration_fit", "reproduce", "training_curve", "context")}
    base_card.update(id=f"{config.model_id}-candidates", version=config.version, title="Candidate classifier adapted with cmbdetect adapt",
                     training_data={"source": source.description, "cases": fit_names})  # fmt: skip
    kept_base = {**base_card, "stage": settings.as_dict(), "training": {"best_epoch": 0, "epochs_run": 0, "minutes": 0.0}}
    if refit:
        cands = scored["no_phase"]
        n_samples = {"microbleed_candidates": int(sum(c.is_true.sum() for c in cands)),
                     "other_candidates": int(sum((~c.is_true).sum() for c in cands)), "cases": len(cands)}  # fmt: skip
        say(f"stage 2: {base_classifier.id} {base_classifier.version} kept; its context model refitted on {n_samples}")
        adapted, classifier_kept, classifier_card = base_classifier, "base", kept_base
    else:
        # Stage 2: a copy of the base classifier fine-tuned on the site's samples.
        data = _candidate_set(samples, net_config)
        n_samples = {
            "microbleed_candidates": int(((data.labels == MICROBLEED) & (data.sources == "unet")).sum()),
            "missed_microbleeds": int((data.sources == "missed").sum()),
            "other_candidates": int(((data.labels != MICROBLEED) & (data.sources == "unet")).sum()),
            "reviewed_mimics": int((data.sources == "reviewed").sum()),
            "by_class": {c: int((data.labels == i).sum()) for i, c in enumerate(CLASSES)},
        }
        say(f"stage 2: samples from the fit cases: {n_samples}")
        classifier_minutes = max(budget.left() - config.classifier_reserve * config.max_minutes, 0.01)
        train_config = CandidateTrainConfig(
            epochs=config.classifier_epochs, samples_per_epoch=config.classifier_samples_per_epoch, learning_rate=config.classifier_learning_rate,
            max_minutes=classifier_minutes, seed=config.seed, width=net_config.width, patch_size=net_config.patch_size,
            patch_spacing_mm=net_config.patch_spacing_mm,
        )  # fmt: skip
        if (data.labels != MICROBLEED).any():
            say(f"stage 2: fine-tuning {base_classifier.id} {base_classifier.version} for up to {classifier_minutes:.1f} min")
            train_classifier(data, work / "classifier", train_config, settings, base_card, say, init=base_classifier.network)
            adapted = get_classifier(str((work / "classifier" / "best.safetensors").absolute()))
            classifier_kept, classifier_card = "adapted", adapted.card
        else:
            # Nothing to learn to reject: the base classifier's weights, calibrated on the site's cases below.
            say("stage 2: stage 1 proposes no false candidate on the fit cases: the base classifier is kept, and calibrated")
            adapted, classifier_kept, classifier_card = base_classifier, "base", kept_base
        for name in cal_names:
            score(name, read_case(by_name[name]), probabilities.pop(name), adapted)

    # Calibration and operating points: on every case's out-of-fold P after a refit, otherwise
    # on the calibration cases, which no training step saw.
    fits: dict[str, ModeFit] = {}
    for mode, scored_cases in scored.items():
        if not scored_cases:
            continue
        try:
            fits[mode] = fit_mode(scored_cases, prior=priors[mode] if refit else None)
        except ValueError as exc:
            raise InputError(f"the cases ({', '.join(stage2_names)}) cannot calibrate stage 2 ({mode}): {exc}; "
                             "add labelled cases" + ("" if refit else " or raise --calibration-fraction")) from None  # fmt: skip
    if "phase" not in fits:
        fits["phase"] = fits["no_phase"]  # as `cmbdetect calibrate`: scans with phase use the no-phase calibration
    provenance = {"calibration_cases": stage2_names, "out_of_fold": refit, "base_classifier": f"{base_classifier.id} {base_classifier.version}",
                  "proposer": f"{config.model_id} {config.version}", "phase_calibrated": bool(scored["phase"])}  # fmt: skip
    trained_classifier = classifier_card["training"]
    classifier_card = calibrated_card(classifier_card, fits, provenance, "count")

    # The model folder: weights first, cards last, each renamed into place; unet.json is the last
    # file, so a folder that loads is a complete one.
    unet_network = load_model(str(unet_path)).network
    # Only what describes these weights: the base card's figures and history are not this model's.
    source_card = trained if unet_kept == "adapted" else base_model.card
    unet_card = {k: source_card[k] for k in ("preprocessing", "training", "training_data") if k in source_card}
    unet_card.update(
        id=config.model_id, version=config.version, trained=True, cmbdetect_version=__version__,
        title=f"{base_model.id} {base_model.version} adapted to a site with cmbdetect adapt",
        candidate_classifier=CLASSIFIER_WEIGHTS,
        intended_use="Research only. Synthetic-trained base model adapted on a few labelled cases; not validated on patients; not for clinical use.",
    )  # fmt: skip
    unet_card["adaptation"] = {
        "description": ("The U-Net fine-tuned on the fit cases; the base classifier kept and its context model refitted "
                        "towards the site on the candidates of every case, calibrated and its operating points chosen on "
                        "out-of-fold P (each case scored by a model fitted without it; the fit cases' candidates come from a "
                        "U-Net trained on them). The figures below are on those cases: few, and from the same site, so "
                        "optimistic for another site." if refit else
                        "Both stages fine-tuned on the fit cases; stage 2 calibrated and its operating points chosen on the "
                        "calibration cases, which no training step saw. The figures below are on those calibration cases: few, "
                        "and from the same site, so optimistic for another site."),
        "adapted_from": {"model": base_model.id, "version": base_model.version, "sha256": base_model.sha256,
                         "classifier": base_classifier.id, "classifier_version": base_classifier.version,
                         "classifier_sha256": base_classifier.sha256},
        "cases": {"fit": fit_names, "calibration": cal_names, "stage_2": stage2_names},
        "source": source.provenance(),
        "inputs": [by_name[n].inputs() for n in sorted(by_name)],
        "u_net": {"kept": unet_kept, "initial_val_dice": t["initial_val_dice"], "best_val_dice": t["best_val_dice"],
                  "best_epoch": t["best_epoch"], "minutes": t["minutes"]},
        "classifier": {"kept": classifier_kept, "context_refitted": refit, "samples": n_samples, **{k: trained_classifier[k] for k in ("best_epoch", "epochs_run", "minutes")}},
        "calibration_cases_figures": {mode: fit.card_figures()["operating_points"] for mode, fit in fits.items()},
        "max_minutes": config.max_minutes,
        "seed": config.seed,
        "calibration_fraction": config.calibration_fraction,
        "config": asdict(config),
    }  # fmt: skip
    staging = work / "final"
    staging.mkdir(exist_ok=True)
    classifier_card = save_classifier(adapted.network, staging / CLASSIFIER_WEIGHTS, classifier_card)
    unet_card = save_model(unet_network, staging / FOLDER_WEIGHTS, unet_card)
    for name in (CLASSIFIER_WEIGHTS, FOLDER_WEIGHTS, Path(CLASSIFIER_WEIGHTS).with_suffix(".json").name, card_path(Path(FOLDER_WEIGHTS)).name):
        os.replace(staging / name, out / name)
    staging.rmdir()
    return AdaptResult(out, unet_card, classifier_card, fits, fit_names, cal_names, unet_kept, n_samples, budget.elapsed())
