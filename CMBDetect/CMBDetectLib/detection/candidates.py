"""Stage 2: the candidate stage. The U-Net proposes, a small 3D classifier decides, and says why.

The U-Net's probability map is thresholded low (sensitivity first); each 3D connected
component in the size range is a *candidate*. For each candidate, a patch centred on its
centroid is resampled to isotropic voxels in patient space (axes along L, P, S, so an
oblique or anisotropic scan gives the classifier the same view as an axial isotropic one),
with channels: SWI magnitude scaled to the white-matter peak and the high-pass phase when the
user gives one (with a flag channel saying whether it is there). The U-Net's probability is
not a channel: it is saturated near 1 on true and false candidates alike (issue 11), and
leaving it out lets the classifier be trained on candidates from any proposer (see
training/candidates.py).
The classifier (classifier.py) gives P(microbleed) and, for the rest, the mimic it most
resembles: vein, calcification, iron-rich nucleus, air-tissue edge or other.

A candidate with P(microbleed) >= `keep_at` (0.5 unless the classifier's card says
otherwise) is kept as a microbleed, graded *definite* when P >= `definite_at` (0.8) and
*possible* otherwise, after the MARS scale's two grades of certainty. Everything else is
rejected with its reason. The stage works on patches, not voxels: its cost is proportional
to the number of candidates.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from typing import TYPE_CHECKING, Callable

import numpy as np
from scipy import ndimage

from ..io import Geometry, sha256_of
from ..models import CardIdentity, LazyNetwork, read_weights, resolve, verified_sha256
from .configs import ClassifierConfig
from .lesions import Lesion, extract_lesions
from .phase import check_phase
from .preprocess import white_matter_peak
from .records import CALCIFICATION, CLASSES, MICROBLEED, Candidate

if TYPE_CHECKING:  # torch only where the classifier is trained or has no ONNX Runtime to run on
    from .classifier import CandidateNet
    from .context import ContextModel

CANDIDATE_THRESHOLD = 0.15  # the U-Net threshold for candidates (the paper's 0.4 is stage 1 alone)
CANDIDATE_MIN_MM = 2.0
CANDIDATE_MAX_MM = 10.0
KEEP_AT = 0.5
DEFINITE_AT = 0.8
# A bleed blooms over several slices; where the U-Net's probability dips on one slice, the
# two halves would be two candidates (two "microbleeds"). Candidates are found on the map
# closed by this many slices along the slice axis, so such a dip is bridged.
BRIDGE_SLICES = 1
# What a card calibrated now is decided with; a card without a setting keeps the old behaviour,
# so that the figures it holds stand.
CURRENT_STAGE = {"bridge_slices": BRIDGE_SLICES, "grow_outlines": 1}
OPERATING_POINTS = ("review", "count")
PHASE_SIGNS = ("auto", "keep", "flip")
# Phase sign evidence (auto): the mean P(calcification) of the candidates read with the phase as
# given and negated must differ by at least this much, over at least MIN_SIGN_CANDIDATES
# candidates; otherwise the phase is not used (the no-phase rule applies) and the summary says so.
MIN_SIGN_EVIDENCE = 0.05
MIN_SIGN_CANDIDATES = 3
PHASE_SCALE_RAD = 1.0  # phase enters the network in radians, clipped to +-pi


@dataclass
class StageSettings:
    """How candidates are found and decided; saved in (and read from) the classifier's card."""

    candidate_threshold: float = CANDIDATE_THRESHOLD
    min_diameter_mm: float = CANDIDATE_MIN_MM
    max_diameter_mm: float = CANDIDATE_MAX_MM
    keep_at: float = KEEP_AT
    definite_at: float = DEFINITE_AT
    bridge_slices: float = 0  # cards written before bridging have none: their figures stand
    grow_outlines: float = 0  # 1: each candidate grown into its dark spot (outline.py); older cards: off

    @classmethod
    def from_card(cls, card: dict) -> "StageSettings":
        data = card.get("stage", {})
        return cls(**{k: float(v) for k, v in data.items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Calibration:
    """A monotone map from the stage's P(microbleed) to a calibrated probability: the piecewise
    linear interpolation of isotonic-regression knots fitted on a tuning set (training/calibration.py).
    Stored in the classifier's card, so applying it needs numpy only."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        x, y = tuple(float(v) for v in data["x"]), tuple(float(v) for v in data["y"])
        if len(x) != len(y) or len(x) < 2 or any(b < a for a, b in zip(x, x[1:])) or any(b < a for a, b in zip(y, y[1:])):
            raise ValueError("a calibration needs two or more increasing knots x and non-decreasing values y")
        return cls(x, y)

    def as_dict(self) -> dict[str, list[float]]:
        return {"x": list(self.x), "y": list(self.y)}

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(p, np.float64), self.x, self.y).astype(np.float32)


def phase_mode(phase_used: bool) -> str:
    return "phase" if phase_used else "no_phase"


class LoadedClassifier(LazyNetwork, CardIdentity):
    def __init__(self, network: "CandidateNet | None", card: dict, path: Path, sha256: str = "",
                 build: "Callable[[], CandidateNet] | None" = None) -> None:  # fmt: skip
        self._network, self._build, self._engine = network, build, None
        self.card, self.path, self.sha256 = card, Path(path), sha256

    @property
    def config(self) -> ClassifierConfig:
        return ClassifierConfig.from_dict(self.card["network"])

    def with_current_stage(self) -> "LoadedClassifier":
        """A copy deciding as a card calibrated now does (CURRENT_STAGE), the same network: for
        calibrate and adapt, which score candidates as the card they write will decide. The
        loaded (cached) classifier itself is left as its card says."""
        card = {**self.card, "stage": {**self.card.get("stage", {}), **CURRENT_STAGE}}
        return LoadedClassifier(self._network, card, self.path, self.sha256, self._build)

    def classify(self, patches: np.ndarray) -> np.ndarray:
        """(N, n_classes) softmax verdicts, by ONNX Runtime from the model cache when it is
        installed (engines.ClassifierEngine), else torch."""
        if self._engine is None:
            if not self.sha256:  # not identified: nothing to key a cache entry by
                return classify_patches(self.network, patches)
            from .engines import ClassifierEngine

            self._engine = ClassifierEngine(self)
        if len(patches) == 0:
            return np.zeros((0, self.config.n_classes), np.float32)
        return self._engine(patches)

    @property
    def settings(self) -> StageSettings:
        return StageSettings.from_card(self.card)

    def context_model(self, phase_used: bool) -> "ContextModel | None":
        """The card's logistic model on context features (context.py), None for cards without."""
        from .context import ContextModel

        data = self.card.get("context", {}).get(phase_mode(phase_used))
        return ContextModel.from_dict(data) if data else None

    def calibration(self, phase_used: bool) -> Calibration | None:
        data = self.card.get("calibration", {}).get(phase_mode(phase_used))
        return Calibration.from_dict(data) if data else None

    @property
    def default_operating_point(self) -> str | None:
        return self.card.get("operating_points", {}).get("default")

    def keep_at(self, operating_point: str | None, phase_used: bool) -> float:
        """The calibrated P(microbleed) a candidate needs to be kept at this operating point
        (None: the card's default point, or the stage's keep_at for a card without points)."""
        points = self.card.get("operating_points", {})
        name = operating_point or points.get("default")
        if name is None:
            return self.settings.keep_at
        if name not in OPERATING_POINTS:
            raise ValueError(f"unknown operating point {name!r}; choose one of {list(OPERATING_POINTS)}")
        if name not in points:
            raise ValueError(f"candidate classifier {self.id} {self.version} has no operating point {name!r} in its card (it was not calibrated)")
        return float(points[name][phase_mode(phase_used)])


@dataclass
class StageResult:
    labels: np.ndarray  # uint16, kept lesions 1..N
    lesions: list[Candidate]
    rejected_labels: np.ndarray  # uint16, rejected candidates 1..M
    rejected: list[Candidate]
    probability: np.ndarray  # P(microbleed) map (see microbleed_probability_map)
    seconds: float
    n_candidates: int
    keep_at: float = KEEP_AT  # the calibrated P(microbleed) a candidate needed to be kept
    p_map_floor: float = CANDIDATE_THRESHOLD  # below this the probability map is not P(microbleed)
    candidate_threshold: float = CANDIDATE_THRESHOLD
    operating_point: str | None = None
    calibrated: bool = False
    context_model: bool = False  # P(microbleed) from the card's context model (context.py)
    phase_used: bool = False
    phase_sign: "PhaseSign | None" = None


# ---------------------------------------------------------------------------- patches


def patch_offsets_mm(config: ClassifierConfig) -> np.ndarray:
    """(S,) offsets from the centre, mm, of an isotropic patch's voxel centres along one axis."""
    s = config.patch_size
    return (np.arange(s, dtype=float) - (s - 1) / 2.0) * config.patch_spacing_mm


def patch_index_coordinates(geometry: Geometry, centre_lps: np.ndarray, config: ClassifierConfig) -> np.ndarray:
    """(3, S, S, S) continuous (k, j, i) indices of a patch's voxels.

    The patch's axes run along patient S, P, L (array order, like the scan's k, j, i for an
    axial scan), so the classifier sees the anatomy the same way whatever the grid's
    direction and spacing; B0 is along S, which keeps the dipole pattern of the phase upright.
    """
    o = patch_offsets_mm(config)
    ds, dp, dl = np.meshgrid(o, o, o, indexing="ij")
    lps = np.stack([dl, dp, ds], axis=-1) + np.asarray(centre_lps, float)  # (S, S, S, 3)
    m = geometry.ijk_to_lps()
    ijk = (lps - m[:3, 3]) @ np.linalg.inv(m[:3, :3]).T
    return np.moveaxis(ijk[..., ::-1], -1, 0)  # (k, j, i) first


def sample_patches(
    magnitude: np.ndarray, phase: np.ndarray | None, geometry: Geometry, centres_lps: np.ndarray, config: ClassifierConfig
) -> np.ndarray:
    """(N, 3, S, S, S) float32 patches: magnitude, phase, phase-present flag.

    `magnitude` (scaled to the WM peak) and `phase` (radians, or None) are (k, j, i) on
    `geometry`'s grid. Linear interpolation; outside the volume is 0.
    """
    n, s = len(centres_lps), config.patch_size
    out = np.zeros((n, 3, s, s, s), np.float32)
    for row, centre in enumerate(np.asarray(centres_lps, float).reshape(-1, 3)):
        coords = patch_index_coordinates(geometry, centre, config)
        out[row, 0] = ndimage.map_coordinates(magnitude, coords, order=1, mode="constant", cval=0.0)
        if phase is not None:
            out[row, 1] = ndimage.map_coordinates(phase, coords, order=1, mode="constant", cval=0.0)
            out[row, 2] = 1.0
    np.clip(out[:, 1], -np.pi, np.pi, out=out[:, 1])
    out[:, 1] *= np.float32(1.0 / PHASE_SCALE_RAD)
    return out


def scaled_magnitude(image: np.ndarray) -> np.ndarray:
    """SWI magnitude divided by its white-matter peak: scanner units cancel, WM is about 1."""
    peak = white_matter_peak(image)
    return (np.asarray(image, np.float32) / np.float32(peak if peak > 0 else 1.0)).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- classifier


def classify_patches(network: "CandidateNet", patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, n_classes) softmax probabilities, by torch."""
    import torch

    network.eval()
    out = []
    for start in range(0, len(patches), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(patches[start : start + batch_size]))
        with torch.inference_mode():
            out.append(torch.softmax(network(x), dim=1).numpy())
    if not out:
        return np.zeros((0, network.config.n_classes), np.float32)
    return np.concatenate(out).astype(np.float32)


def without_phase(probabilities: np.ndarray) -> np.ndarray:
    """The classifier's verdicts when no phase image was given: calcification folded into
    microbleed.

    On SWI magnitude a calcification and a bleed are both dark, round and blooming; only the
    sign of the phase tells diamagnetic calcium from paramagnetic iron. Whatever separates them
    in magnitude alone is a property of the generator the classifier was trained on (on a sharp
    black sphere, with no phase, 0.4.0's classifier answered "calcification" at 0.998, and
    0.5.0's still splits plain dark blobs between the two), so without phase a
    calcification-like candidate is kept, as a *possible* microbleed at most (the certainty rule
    in run_candidate_stage), rather than rejected for a reason the image cannot show."""
    merged = np.array(probabilities, np.float32, copy=True)
    merged[:, MICROBLEED] += merged[:, CALCIFICATION]
    merged[:, CALCIFICATION] = 0.0
    return merged


def find_candidates(probability: np.ndarray, geometry: Geometry, settings: StageSettings) -> tuple[np.ndarray, list[Lesion]]:
    """Connected components of the U-Net probability at the candidate threshold, in size range,
    on the map closed along the slice axis (BRIDGE_SLICES) so that one bleed is one candidate."""
    bridge = int(settings.bridge_slices)
    if bridge > 0:
        probability = ndimage.grey_closing(probability, size=(2 * bridge + 1, 1, 1), mode="nearest")
    return extract_lesions(probability, geometry, settings.candidate_threshold, settings.min_diameter_mm, settings.max_diameter_mm)


def microbleed_probability_map(probability: np.ndarray, candidates: np.ndarray, p_microbleed: np.ndarray, threshold: float) -> np.ndarray:
    """P(microbleed) per voxel: the classifier's P inside each candidate; elsewhere the U-Net's
    probability, capped below the candidate threshold (nothing outside a candidate was called)."""
    out = np.minimum(probability, np.float32(np.nextafter(np.float32(threshold), np.float32(0))))
    inside = candidates > 0
    lut = np.concatenate([[0.0], np.asarray(p_microbleed, np.float32)]).astype(np.float32)
    out[inside] = lut[candidates[inside]]
    return out.astype(np.float32, copy=False)


def _renumber(candidates: np.ndarray, ids: list[int]) -> np.ndarray:
    lut = np.zeros(int(candidates.max(initial=0)) + 1, np.uint16)
    for new, old in enumerate(ids, start=1):
        lut[old] = new
    return lut[candidates]


@dataclass
class PhaseSign:
    """How the phase image was read: as given ("kept"), negated ("flipped"), or not at all
    ("ignored": the evidence for either sign was too weak), with that evidence."""

    used: str
    asked: str
    evidence: float | None = None  # mean P(calcification) as given minus negated; > 0: flip
    n_candidates: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "phase_sign": self.used,
            "phase_sign_asked": self.asked,
            "phase_sign_evidence": None if self.evidence is None else round(self.evidence, 4),
        }


def _classifier(network: "CandidateNet | Callable[[np.ndarray], np.ndarray]") -> Callable[[np.ndarray], np.ndarray]:
    """A network (torch) or a function that already classifies (LoadedClassifier.classify)."""
    if hasattr(network, "state_dict"):
        return lambda patches: classify_patches(network, patches)  # type: ignore[arg-type]
    return network  # type: ignore[return-value]


def choose_phase_sign(
    network: "CandidateNet | Callable[[np.ndarray], np.ndarray]", patches: np.ndarray, asked: str = "auto"
) -> tuple[np.ndarray, PhaseSign]:
    """The classifier's probabilities with the phase read in the right sign, and that sign.

    Vendors differ in the handedness of their phase: a paramagnetic bleed is negative on some
    and positive on others. With the wrong sign the classifier calls nearly every bleed a
    calcification, so `auto` reads the candidates both ways and keeps the sign under which they
    look less like calcifications (veins and bleeds, paramagnetic, outnumber calcifications in
    any brain). The rule is symmetric: a phase and its negation give the same verdicts."""
    if asked not in PHASE_SIGNS:
        raise ValueError(f"phase sign must be one of {list(PHASE_SIGNS)}, not {asked!r}")
    classify = _classifier(network)
    negated = patches.copy()
    negated[:, 1] *= -1.0
    if asked == "keep":
        return classify(patches), PhaseSign("kept", asked)
    if asked == "flip":
        return classify(negated), PhaseSign("flipped", asked)
    as_given, flipped = classify(patches), classify(negated)
    evidence = float(as_given[:, CALCIFICATION].mean() - flipped[:, CALCIFICATION].mean()) if len(patches) else 0.0
    if len(patches) < MIN_SIGN_CANDIDATES or abs(evidence) < MIN_SIGN_EVIDENCE:
        return as_given, PhaseSign("ignored", asked, evidence, len(patches))
    if evidence > 0:
        return flipped, PhaseSign("flipped", asked, evidence, len(patches))
    return as_given, PhaseSign("kept", asked, evidence, len(patches))


def run_candidate_stage(
    image: np.ndarray,
    probability: np.ndarray,
    geometry: Geometry,
    classifier: LoadedClassifier,
    phase: np.ndarray | None = None,
    operating_point: str | None = None,
    phase_sign: str = "auto",
    candidate_threshold: float | None = None,
) -> StageResult:
    """Find candidates in the U-Net's probability map and keep or reject each one.

    A candidate is kept when its calibrated P(microbleed) reaches the operating point's
    threshold (the classifier card's; `operating_point` None: its default); *definite* when the
    calibrated P reaches `definite_at`. A card without a calibration uses the raw P, and then
    *definite* needs the network's own P(microbleed), not the calcification folded in."""
    start = time.perf_counter()
    check_phase(phase, image.shape)
    settings = classifier.settings
    if candidate_threshold is not None:
        settings = replace(settings, candidate_threshold=float(candidate_threshold))
    cand_labels, cands = find_candidates(probability, geometry, settings)
    sign = None
    magnitude = scaled_magnitude(image) if cands else None
    if cands:
        centres = np.array([c.centroid_lps for c in cands])
        patches = sample_patches(magnitude, phase, geometry, centres, classifier.config)
        if phase is not None:
            raw, sign = choose_phase_sign(classifier.classify, patches, phase_sign)
            if sign.used == "ignored":  # read as if there were no phase at all
                patches[:, 1:] = 0.0
                raw = classifier.classify(patches)
        else:
            raw = classifier.classify(patches)
    else:
        raw = np.zeros((0, len(CLASSES)), np.float32)
        if phase is not None:
            sign = PhaseSign("ignored", phase_sign, None, 0)
    phase_used = phase is not None and sign is not None and sign.used != "ignored"
    probs = raw if phase_used else without_phase(raw)
    calibration = classifier.calibration(phase_used)
    p_stage = probs[:, MICROBLEED]
    context = classifier.context_model(phase_used)
    if context is not None and cands:
        from .context import context_features

        p_stage = context(context_features(magnitude, geometry, cand_labels, cands, probs))
    p_final = calibration(p_stage) if calibration is not None else p_stage
    if settings.grow_outlines and cands:
        from .outline import grow_outlines, redescribe

        # After the decision, so that it changes outlines and sizes, never what is kept.
        order = [cands[n].id for n in np.argsort(-np.asarray(p_final), kind="stable")]
        cand_labels = grow_outlines(image, geometry, cand_labels, order, settings.max_diameter_mm)
        cands = redescribe(cands, cand_labels, geometry, probability)
    keep_at = classifier.keep_at(operating_point, phase_used)
    kept: list[Candidate] = []
    rejected: list[Candidate] = []
    kept_ids: list[int] = []
    rejected_ids: list[int] = []
    for cand, p, p_raw, p_mb in zip(cands, probs, raw, p_final):
        p_mb = float(p_mb)
        verdict = {name: round(float(v), 4) for name, v in zip(CLASSES, p)}
        fields = {k: getattr(cand, k) for k in Lesion.__dataclass_fields__}
        if p_mb >= keep_at:
            fields["id"] = len(kept) + 1
            # Uncalibrated, definite needs the network's own P(microbleed): one kept only because
            # calcification was folded in (no phase) stays possible.
            own = p_mb if calibration is not None else float(p_raw[MICROBLEED])
            certainty = "definite" if own >= settings.definite_at else "possible"
            kept.append(Candidate(**fields, p_microbleed=p_mb, certainty=certainty, class_probabilities=verdict))
            kept_ids.append(cand.id)
        else:
            fields["id"] = len(rejected) + 1
            mimic = CLASSES[1 + int(np.argmax(p[1:]))]
            rejected.append(Candidate(**fields, p_microbleed=p_mb, reason=mimic, class_probabilities=verdict))
            rejected_ids.append(cand.id)
    # Outside the candidates the map holds the U-Net's probability kept below this floor, so that
    # a cut at or above it (the live threshold in Slicer) sees candidates only.
    floor = min(settings.candidate_threshold, keep_at) if keep_at > 0 else settings.candidate_threshold
    p_map = microbleed_probability_map(probability, cand_labels, p_final, floor)
    return StageResult(
        labels=_renumber(cand_labels, kept_ids),
        lesions=kept,
        rejected_labels=_renumber(cand_labels, rejected_ids),
        rejected=rejected,
        probability=p_map,
        seconds=time.perf_counter() - start,
        n_candidates=len(cands),
        keep_at=keep_at,
        p_map_floor=floor,
        candidate_threshold=settings.candidate_threshold,
        operating_point=operating_point or classifier.default_operating_point,
        calibrated=calibration is not None,
        context_model=context is not None,
        phase_used=phase_used,
        phase_sign=sign,
    )


# ---------------------------------------------------------------------------- weights and card



def save_classifier(network: "CandidateNet", path: Path, card: dict) -> dict:
    """Weights (safetensors) and card `<same name>.json`; the card gains config, size, sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(path))
    path.chmod(0o644)
    card = dict(card)
    card["kind"] = "candidate-classifier"
    card["classes"] = list(CLASSES)
    card["network"] = network.config.as_dict()
    card["file"] = path.name
    card["size_bytes"] = path.stat().st_size
    card["sha256"] = sha256_of(path)
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_classifier_file(path: Path, expected_sha256: str | None = None, lazy: bool = False) -> LoadedClassifier:
    """Weights and card; the weights must match the sha256 the registry (`expected_sha256`) and the card record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"candidate classifier weights missing: {path}")
    card_file = path.with_suffix(".json")
    if not card_file.is_file():
        raise FileNotFoundError(f"candidate classifier card missing: {card_file}")
    card = json.loads(card_file.read_text())
    sha256 = verified_sha256(path, card, expected_sha256, "candidate classifier")
    if card.get("kind") != "candidate-classifier":
        raise ValueError(f"{path.name} is not a candidate classifier (its card's kind is {card.get('kind')!r})")
    if list(card.get("classes", [])) != list(CLASSES):
        raise ValueError(f"{path.name} was trained for classes {card.get('classes')}, this version knows {list(CLASSES)}")
    config = ClassifierConfig.from_dict(card["network"])

    def build() -> "CandidateNet":
        from .classifier import CandidateNet

        network = CandidateNet(config)
        network.load_state_dict(read_weights(path))
        return network.eval()

    return LoadedClassifier(None if lazy else build(), card, path, sha256, build)


def load_candidate_classifier(spec: str, directory: Path | None = None, lazy: bool = False) -> LoadedClassifier:
    """The stage-2 candidate classifier named by a registry id or a .safetensors path; registry
    entries must match their recorded sha256. `lazy`: its network is built on first use."""
    path, expected = resolve(spec, directory)
    return load_classifier_file(path, expected, lazy)
