"""What a lesion is recorded as, without torch: the candidate stage's verdict, the columns and
rows of the lesion and rejected-candidate CSVs, the segment tags, the terminology and a case's
file names.

Slicer's own process shows results (mrml/display.py, mrml/job.py) and must not import torch or
safetensors to do so; the stage that computes verdicts (candidates.py, classifier.py) and the
writers of the files (outputs.py) take these definitions from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .lesions import Lesion

# The classifier's outputs, in this order: a microbleed, or the mimic a candidate most resembles.
CLASSES = ("microbleed", "vein", "calcification", "nucleus", "air_edge", "other")
MICROBLEED = 0
CALCIFICATION = CLASSES.index("calcification")
CERTAINTIES = ("definite", "possible")

# Slicer's DICOM-based terminology has no microbleed code; haemorrhage in the brain is the nearest.
TERMINOLOGY_ENTRY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^49755003^Morphologically Altered Structure"
    "~SCT^50960005^Hemorrhage"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~SCT^12738006^Brain"
    "~^^"
)

LESION_COLUMNS = [
    "id", "size_class", "diameter_mm", "volume_mm3", "n_voxels",
    "centroid_i", "centroid_j", "centroid_k",
    "centroid_r", "centroid_a", "centroid_s",
    "centroid_l", "centroid_p", "centroid_s_lps",
    "mean_probability", "max_probability",
    # Stage 2 (candidates.py); empty in the single-stage pipeline.
    "p_microbleed", "certainty",
    # MARS location (anatomy/): "unknown" when the registration failed QC, empty with --no-regions.
    "mars_region", "mars_structure", "side",
]  # fmt: skip

# `<case>_rejected.csv`: the candidates stage 2 turned down, with the reason (the most likely mimic).
REJECTED_COLUMNS = [
    "id", "reason", "p_microbleed", *(f"p_{c}" for c in CLASSES[1:]),
    "diameter_mm", "volume_mm3", "n_voxels",
    "centroid_i", "centroid_j", "centroid_k",
    "centroid_r", "centroid_a", "centroid_s",
    "centroid_l", "centroid_p", "centroid_s_lps",
    "mean_probability", "max_probability",
]  # fmt: skip


@dataclass
class Candidate(Lesion):
    """A candidate after stage 2: a Lesion plus the classifier's verdict."""

    p_microbleed: float = 0.0
    certainty: str = ""  # kept: "definite" | "possible"; rejected: ""
    reason: str = ""  # rejected: the most likely mimic (CLASSES[1:]); kept: ""
    class_probabilities: dict[str, float] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return not self.reason

    @property
    def name(self) -> str:
        return f"CMB {self.id}" if self.kept else f"Rejected {self.id}"


# Every file a case can have, in the order they are moved into place: the one list of a case's
# outputs, which writing, resuming and clearing a case all read (a file missing here could not be
# written, so none can be forgotten when a case is cleared). The summary comes last: its presence
# means the case is complete.
OUTPUT_FILES = {
    "segmentation": "{case}.seg.nrrd",
    "labels": "{case}_lesions.nii.gz",
    "probability": "{case}_prob.nii.gz",
    "lesions_csv": "{case}_lesions.csv",
    "rejected_csv": "{case}_rejected.csv",  # with the candidate stage only
    "preview": "{case}_preview.png",  # on request only
    "registration": "{case}_registration.png",  # the registration's QC picture; not with --no-regions
    "summary": "{case}_summary.json",
}
OPTIONAL_FILES = ("rejected_csv", "preview", "registration")
# With `--dicom-out DIR`, for a case read from a DICOM series: the DICOM Segmentation (only when
# there is a lesion: a SEG needs a segment) and the measurement report, written by export/.
DICOM_FILES = {"dicom_seg": "{case}_seg.dcm", "dicom_sr": "{case}_sr.dcm"}


def every_output_path(out_dir: Path, case: str) -> dict[str, Path]:
    """Every file `case` may have in `out_dir`, whichever options wrote it (what a redo clears)."""
    return {key: Path(out_dir) / name.format(case=case) for key, name in OUTPUT_FILES.items()}


def output_paths(out_dir: Path, case: str, preview: bool = False, rejected: bool = False, registration: bool = False) -> dict[str, Path]:
    """The files one run writes for `case`: the fixed ones, plus the preview, the rejected
    candidates' CSV and the registration's QC picture when asked for."""
    wanted = {"rejected_csv": rejected, "preview": preview, "registration": registration}
    return {key: path for key, path in every_output_path(out_dir, case).items() if wanted.get(key, True)}


def dicom_output_paths(dicom_dir: Path, case: str) -> dict[str, Path]:
    """The DICOM objects `case` may have in the `--dicom-out` folder."""
    return {key: Path(dicom_dir) / name.format(case=case) for key, name in DICOM_FILES.items()}


def lesion_row(lesion: Lesion) -> dict[str, object]:
    i, j, k = lesion.centroid_ijk
    r, a, s = lesion.centroid_ras
    l_, p, s2 = lesion.centroid_lps
    values = [
        lesion.id, lesion.size_class, lesion.diameter_mm, lesion.volume_mm3, lesion.n_voxels,
        i, j, k, r, a, s, l_, p, s2, lesion.mean_probability, lesion.max_probability,
        getattr(lesion, "p_microbleed", ""), getattr(lesion, "certainty", ""),
        lesion.mars_region, lesion.mars_structure, lesion.side,
    ]  # fmt: skip
    if not isinstance(lesion, Candidate):
        values[-5:-3] = ["", ""]
    return {c: (round(v, 4) if isinstance(v, float) else v) for c, v in zip(LESION_COLUMNS, values)}


def rejected_row(candidate: Candidate) -> dict[str, object]:
    i, j, k = candidate.centroid_ijk
    r, a, s = candidate.centroid_ras
    l_, p, s2 = candidate.centroid_lps
    values = [
        candidate.id, candidate.reason, candidate.p_microbleed,
        *(candidate.class_probabilities.get(c, 0.0) for c in CLASSES[1:]),
        candidate.diameter_mm, candidate.volume_mm3, candidate.n_voxels,
        i, j, k, r, a, s, l_, p, s2, candidate.mean_probability, candidate.max_probability,
    ]  # fmt: skip
    return {c: (round(v, 4) if isinstance(v, float) else v) for c, v in zip(REJECTED_COLUMNS, values)}


def segment_tags(lesion: Lesion) -> str:
    """Slicer's file form of a segment's tags, "key:value|key:value|" (terminology, size, verdict)."""
    tags = {
        "TerminologyEntry": TERMINOLOGY_ENTRY,
        "CMBDetect.SizeClass": lesion.size_class,
        "CMBDetect.DiameterMm": f"{lesion.diameter_mm:.2f}",
        "CMBDetect.VolumeMm3": f"{lesion.volume_mm3:.2f}",
        "CMBDetect.MeanProbability": f"{lesion.mean_probability:.3f}",
        "CMBDetect.MaxProbability": f"{lesion.max_probability:.3f}",
    }
    if isinstance(lesion, Candidate):
        tags["CMBDetect.PMicrobleed"] = f"{lesion.p_microbleed:.3f}"
        tags["CMBDetect.Certainty"] = lesion.certainty
    if lesion.mars_region:
        tags["CMBDetect.MarsRegion"] = lesion.mars_region
        tags["CMBDetect.MarsStructure"] = lesion.mars_structure
        tags["CMBDetect.Side"] = lesion.side
    return "".join(f"{k}:{v}|" for k, v in tags.items())


def candidate_record(candidate: Candidate) -> dict[str, object]:
    """A candidate and its verdict as plain JSON values, exactly (no rounding): the worker
    hands the run's candidates to Slicer this way, and the scene keeps them for the live
    threshold (mrml/results.py)."""
    return asdict(candidate)


def candidate_from_record(record: dict) -> Candidate:
    fields = dict(record)
    for key in ("centroid_ijk", "centroid_lps", "centroid_ras"):
        fields[key] = tuple(float(v) for v in fields[key])
    fields["class_probabilities"] = dict(fields.get("class_probabilities") or {})
    return Candidate(**fields)
