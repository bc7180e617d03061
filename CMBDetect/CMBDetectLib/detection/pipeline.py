"""Detect microbleeds in one volume: preprocess, 2.5D U-Net, back to the native grid, lesions.

This is the function the command line, the Slicer batch script and the Slicer module's
Logic all call. It reads and writes no files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import CaseError
from .engines import Engine, make_engine
from .head import HALO_PX, head_boxes
from .inference import Cancelled, predict_stack, select_device
from ..anatomy.locate import AnatomyResult, locate_lesions, location_counts
from ..io import Geometry, Volume
from .lesions import DEFAULT_THRESHOLD, MAX_DIAMETER_MM, MIN_DIAMETER_MM, Lesion, extract_lesions, lesion_counts
from ..models import LoadedModel, load_model, resolve
from .candidates import LoadedClassifier, load_candidate_classifier, run_candidate_stage
from .phase import check_phase
from .precision import Precision, resolve_precision
from .preprocess import preprocess, restore

__all__ = ["Cancelled", "DetectionParams", "DetectionResult", "detect_volume", "get_engine", "get_model"]

Progress = Callable[[float, str], None]


@dataclass
class DetectionParams:
    threshold: float = DEFAULT_THRESHOLD
    min_diameter_mm: float = MIN_DIAMETER_MM
    max_diameter_mm: float = MAX_DIAMETER_MM
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    batch_size: int | None = None  # None: 1 on CPU (fastest there), 8 on CUDA
    model: str | None = None  # registry id or .safetensors path; None = the registry's default
    engine: str = "auto"  # "auto" | "torch" | "onnxruntime" (engines.py); auto: precision.py's table
    # "auto" | "fp32" | "bf16" | "int8" (| "fp16" on CUDA): precision.py; auto from the CPU's flags
    precision: str = "auto"
    head_only: bool = True  # run the network only over the head's box per slice (head.py); False: dense pass
    # Stage 2 (candidates.py): on when the detector's card names a candidate classifier (or one
    # is given here); single_stage=True is the paper's pipeline, U-Net and threshold alone.
    single_stage: bool = False
    candidate_model: str | None = None  # registry id or .safetensors path; None = the detector card's
    # Which calibrated P(microbleed) keeps a candidate: "review" (sensitivity first, for expert
    # triage) or "count" (precision first, for burden counts); None: the classifier card's default.
    operating_point: str | None = None
    candidate_threshold: float | None = None  # stage 1's threshold for candidates; None: the classifier card's
    phase_sign: str = "auto"  # "auto" | "keep" | "flip": how a phase image's sign is read (candidates.py)
    regions: bool = True  # each lesion's MARS location through a registration to the template (anatomy/)


@dataclass
class DetectionResult:
    probability: np.ndarray  # (k, j, i) float32 on the input's grid
    labels: np.ndarray  # (k, j, i) uint16, lesion ids 1..N
    lesions: list[Lesion]
    geometry: Geometry
    model_id: str
    model_version: str
    model_trained: bool
    seconds: float
    params: DetectionParams = field(default_factory=DetectionParams)
    engine: str = ""  # the engine that ran the network, e.g. "onnxruntime"
    precision: str = ""  # the precision it ran at, resolved (precision.py), e.g. "fp32"
    threads: int = 0  # the engine's intra-op threads (this process's share of the cores)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, in order
    # Two-stage only: the rejected candidates (with their reason), their label map, and what ran.
    rejected: list = field(default_factory=list)
    rejected_labels: np.ndarray | None = None
    candidate_stage: dict | None = None
    anatomy: AnatomyResult | None = None  # None: regions were not asked for

    def regions_summary(self) -> dict[str, object] | None:
        """Counts per MARS category and side, the pattern, the registration's QC; None when off."""
        if self.anatomy is None:
            return None
        registration = self.anatomy.registration
        return {**location_counts(self.anatomy.locations), "registration": registration.qc(),
                "to_template": registration.matrix() if registration.ok else None,
                "atlas_version": self.anatomy.atlas_version}  # fmt: skip

    def summary(self) -> dict[str, object]:
        return {
            **lesion_counts(self.lesions),
            "seconds": round(self.seconds, 2),
            "model_id": self.model_id,
            "model_version": self.model_version,
            "model_trained": self.model_trained,
            "engine": self.engine,
            "precision": self.precision,
            # What cut the lesions: the network's probability (the paper's pipeline), or, with the
            # candidate stage, P(microbleed) at the stage's own cut (params.threshold is unused).
            "threshold": self.params.threshold if self.candidate_stage is None else self.candidate_stage["keep_at"],
            "threshold_of": "probability" if self.candidate_stage is None else "p_microbleed",
            "size_range_mm": [self.params.min_diameter_mm, self.params.max_diameter_mm],
            "cmbdetect_version": __version__,
            "stages": 1 if self.candidate_stage is None else 2,
            **({} if self.candidate_stage is None else {"candidate_stage": self.candidate_stage}),
            "regions": self.regions_summary(),
        }


def _weights_state(spec: str | None) -> tuple[str, int, int, int]:
    """The file `spec` names now, and its state: weights replaced at the same path (a model
    retrained in place) are loaded afresh, not served stale by a long-lived process such as a
    Dask worker, whose results would then carry the new weights' fingerprint."""
    path = resolve(spec)[0].absolute()  # the same relative name from another directory is another file
    try:
        st = path.stat()
    except OSError:
        return str(path), 0, 0, 0  # missing: the loader says so, in its own words
    return str(path), st.st_mtime_ns, st.st_size, st.st_ino


# Per (model, device): the file's state when it was loaded, and what was loaded.
_MODEL_CACHE: dict[tuple[str | None, str], tuple[tuple, LoadedModel]] = {}


def get_model(spec: str | None, device=None) -> LoadedModel:
    """Load once per model: a batch over a cohort must not re-read the weights. The network is
    built from them only when an engine needs it (a cached ONNX model does not)."""
    key, state = (spec, "any"), _weights_state(spec)
    cached = _MODEL_CACHE.get(key)
    if cached is None or cached[0] != state:
        _MODEL_CACHE[key] = (state, load_model(spec, lazy=True))
    return _MODEL_CACHE[key][1]


def resolved_precision(params: "DetectionParams", device=None) -> Precision:
    """The precision this run's network runs at (precision.py); ValueError where none runs it."""
    device = device or select_device(params.device)
    precision = resolve_precision(params.precision, device.type)
    from .precision import engine_for

    engine_for(params.engine, device.type, precision.name)  # an engine without those kernels: say so now
    return precision


_ENGINE_CACHE: dict[tuple[str | None, str, str, str], tuple[LoadedModel, Engine]] = {}


def get_engine(spec: str | None, device, engine: str = "auto", precision: str = "auto") -> Engine:
    """Build once per (model, device, engine, precision): the ONNX model is loaded once per process."""
    resolved = resolve_precision(precision, device.type).name
    key, model = (spec, str(device), engine, resolved), get_model(spec, device)
    cached = _ENGINE_CACHE.get(key)
    if cached is None or cached[0] is not model:  # the model was reloaded: rebuild from it
        _ENGINE_CACHE[key] = (model, make_engine(model, device, engine, resolved))
    return _ENGINE_CACHE[key][1]


_CLASSIFIER_CACHE: dict[str, tuple[tuple, LoadedClassifier]] = {}


def get_classifier(spec: str) -> LoadedClassifier:
    state = _weights_state(spec)
    cached = _CLASSIFIER_CACHE.get(spec)
    if cached is None or cached[0] != state:
        _CLASSIFIER_CACHE[spec] = (state, load_candidate_classifier(spec, lazy=True))
    return _CLASSIFIER_CACHE[spec][1]


def card_classifier(model: LoadedModel) -> str | None:
    """The candidate classifier a detector's card names: a registry id, or a file path, which
    is relative to the card's folder (an adapted model carries its own classifier beside it)."""
    spec = model.card.get("candidate_classifier")
    if not spec:
        return None
    spec = str(spec)
    if spec.endswith(".safetensors") or "/" in spec:
        return str((model.path.parent / spec).absolute())
    return spec


def stage_two_classifier(params: DetectionParams, model: LoadedModel) -> LoadedClassifier | None:
    """The candidate classifier this run uses, or None for the single-stage pipeline."""
    if params.single_stage:
        return None
    spec = params.candidate_model or card_classifier(model)
    return get_classifier(str(spec)) if spec else None


def detect_volume(
    volume: Volume,
    params: DetectionParams | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    case: str = "volume",
    phase: np.ndarray | None = None,
) -> DetectionResult:
    """Probability map, lesion label map and lesion list for one SWI volume, on its own grid.

    With a candidate classifier (the default model has one), the U-Net's components are
    candidates that stage 2 keeps or rejects; `phase` (k, j, i, on the volume's grid, radians)
    is optional and used by stage 2 only. The probability map is then P(microbleed)."""
    params = params or DetectionParams()
    try:
        # First: a phase the candidate stage would refuse must not cost a whole U-Net run.
        check_phase(phase, volume.array.shape)
    except ValueError as exc:
        raise CaseError(case, str(exc)) from None
    if params.single_stage and params.operating_point:
        raise ValueError("an operating point chooses stage 2's threshold on P(microbleed): it has no meaning with the single-stage pipeline")
    report = progress or (lambda fraction, message: None)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [start]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    report(0.0, "preprocessing")
    stack, info = preprocess(volume.array, case)
    lap("preprocess")
    device = select_device(params.device)
    model = get_model(params.model, device)
    engine = get_engine(params.model, device, params.engine, params.precision)
    lap("model")
    boxes = head_boxes(stack, engine.alignment, HALO_PX) if params.head_only else None
    lap("head")

    def on_slices(done: int, total: int) -> None:
        report(round(0.05 + 0.9 * done / total, 6), f"slice {done}/{total}")

    plane_probability = predict_stack(engine, stack, device, params.batch_size, on_slices, cancel, boxes)
    del stack
    lap("network")
    report(0.95, "finding lesions")
    probability = restore(plane_probability, info)
    del plane_probability
    lap("restore")
    # Stage 2, kept apart from stage 1: candidates in, kept lesions and rejections out. Without
    # it, stage 1's threshold and size range make the lesions (the paper's pipeline).
    rejected, rejected_labels, stage_info = [], None, None
    classifier = stage_two_classifier(params, model)
    if classifier is None:
        try:
            labels, lesions = extract_lesions(
                probability, volume.geometry, params.threshold, params.min_diameter_mm, params.max_diameter_mm
            )
        except ValueError as exc:
            raise CaseError(case, str(exc)) from None
        lap("lesions")
    else:
        report(0.97, "examining candidates")
        try:
            stage = run_candidate_stage(
                volume.array, probability, volume.geometry, classifier, phase, params.operating_point, params.phase_sign,
                candidate_threshold=params.candidate_threshold,
            )
        except ValueError as exc:
            raise CaseError(case, str(exc)) from None
        labels, lesions, probability = stage.labels, stage.lesions, stage.probability
        rejected, rejected_labels = stage.rejected, stage.rejected_labels
        stage_info = {
            "classifier_id": classifier.id,
            "classifier_version": classifier.version,
            **classifier.settings.as_dict(),
            "candidate_threshold": stage.candidate_threshold,
            "keep_at": round(stage.keep_at, 6),
            "p_map_floor": round(stage.p_map_floor, 6),
            "operating_point": stage.operating_point,
            "calibrated": stage.calibrated,
            "context_model": stage.context_model,
            "phase_given": phase is not None,
            "phase_used": stage.phase_used,
            **(stage.phase_sign.as_dict() if stage.phase_sign is not None else {}),
            "n_candidates": stage.n_candidates,
            "n_rejected": len(rejected),
            "seconds": round(stage.seconds, 3),
        }
        lap("candidates")
    anatomy = None
    if params.regions:
        report(0.98, "locating the lesions (registration to the MNI template)")
        try:
            anatomy = locate_lesions(volume, [lesion.centroid_lps for lesion in lesions])
        except RuntimeError as exc:  # the shipped atlas cannot be read
            raise CaseError(case, str(exc)) from None
        for lesion, where in zip(lesions, anatomy.locations):
            lesion.mars_region, lesion.mars_structure, lesion.side = where.mars_region, where.mars_structure, where.side
        lap("regions")
    report(1.0, f"{len(lesions)} microbleeds")
    return DetectionResult(
        probability=probability,
        labels=labels,
        lesions=lesions,
        geometry=volume.geometry,
        model_id=model.id,
        model_version=model.version,
        model_trained=model.trained,
        seconds=time.perf_counter() - start,
        params=params,
        engine=engine.name,
        precision=engine.precision,
        threads=getattr(engine, "threads", 0),
        timings=timings,
        rejected=rejected,
        rejected_labels=rejected_labels,
        candidate_stage=stage_info,
        anatomy=anatomy,
    )
