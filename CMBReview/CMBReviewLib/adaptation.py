"""A review study as the site's cases for `cmbdetect adapt --study` (CMBDetectLib/training/adapt.py).

Here, not in CMBDetectLib, because it reads the study store: CMBDetectLib's core never imports
CMBReviewLib, and only its command layer chooses this source.

Per case a reader reviewed (consensus.py decides what the readers agree on):
- microbleeds: the consensus label map (`export_consensus`): the detections a majority judged
  correct, and the lesions readers added as missed, with the mask grown from their click (or an
  endorsed ground truth, where a case has one);
- mimics: every detection that lies outside that consensus and that a reader judged incorrect,
  coded by the class its reason maps to (REASON_CLASS; several readers: the reason most of them
  gave, ties in MIMIC_REASONS order), written as a verdict map on the image's grid.
Cases nobody reviewed are left out, and said so; a case the consensus cannot be made of stops
the run, naming it, before anything is trained.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from CMBDetectLib.detection.records import CLASSES
from CMBDetectLib.errors import CaseError, InputError
from CMBDetectLib.io import sha256_of, write_volume
from CMBDetectLib.labels import read_label
from CMBDetectLib.training.sitecases import SiteCase

from . import analysis
from .consensus import export_consensus
from .store import MIMIC_REASONS, Study, StudyError
from .study import detector_labels, load_image, resolve

# A reader's reason for "incorrect" -> the candidate stage's class (detection/records.CLASSES).
# Partial volume, cavernous malformations and the rest have no class of their own: "other".
REASON_CLASS = {
    "vessel": "vein",
    "calcification": "calcification",
    "iron_deposit": "nucleus",
    "artefact": "air_edge",
    "partial_volume": "other",
    "cavernous_malformation": "other",
    "other": "other",
}
assert set(REASON_CLASS) == set(MIMIC_REASONS) and set(REASON_CLASS.values()) <= set(CLASSES[1:])


def consensus_reason(reasons: list[str]) -> str:
    """The reason most readers gave; a tie goes to the first in MIMIC_REASONS."""
    counts = Counter(reasons)
    return max(MIMIC_REASONS, key=lambda r: (counts[r], -MIMIC_REASONS.index(r)))


def verdict_map(study: Study, case: str, truth: np.ndarray, context: dict) -> tuple[np.ndarray, dict[str, int]]:
    """Class codes (CLASSES 1..5) on the voxels of each detection readers judged incorrect and
    the consensus does not hold; and how many of each class."""
    image = load_image(study, case)
    c = study.case(case)
    detections = detector_labels(study, case, image)
    out = np.zeros(image.shape, np.uint8)
    counts: dict[str, int] = {}
    for lesion in study.lesions(c.id):
        if lesion.source != "detector":
            continue
        reasons = [v.reason or "other" for (_, lesion_id), v in context["verdicts"].items() if lesion_id == lesion.id and v.verdict == "incorrect"]
        voxels = detections == lesion.detector_label
        if not reasons or not voxels.any() or (truth[voxels] > 0).any():
            continue
        name = REASON_CLASS[consensus_reason(reasons)]
        out[voxels] = CLASSES.index(name)
        counts[name] = counts.get(name, 0) + 1
    return out, counts


@dataclass
class ReviewStudy:
    """--study STUDY.db: a SiteSource (CMBDetectLib/training/adapt.py)."""

    path: Path
    progress: Callable[[str], None] | None = None
    description: str = "a CMBReview study's consensus (cmbdetect adapt --study)"
    _provenance: dict = field(default_factory=dict)

    def cases(self, work: Path) -> list[SiteCase]:
        path = Path(self.path)
        if not path.is_file():
            raise InputError(f"--study {path}: no such file")
        try:
            study = Study.open(path)
        except StudyError as exc:
            raise InputError(f"--study {path}: {exc}") from None
        with study:
            written, skipped, failed = export_consensus(study, work / "consensus")
            if failed:
                raise InputError("\n".join(failed))
            if not written:
                raise InputError(f"--study {path}: no case has been reviewed yet ({len(study.cases())} cases, {len(study.readers())} readers)")
            for line in skipped:
                (self.progress or (lambda m: None))(f"left out: {line}")
            _, _, _, _, context = analysis.ratings(study)
            cases, described = [], []
            for c in written:
                image_path = resolve(study, study.case(c.case).image)
                try:
                    image = load_image(study, c.case)
                    truth = read_label(c.label_path, c.case, image)
                    mimics, counts = verdict_map(study, c.case, truth, context)
                except (CaseError, StudyError, OSError) as exc:
                    raise InputError(str(exc) if str(exc).startswith(c.case) else f"{c.case}: {exc}") from None
                verdicts = work / "verdicts" / f"{c.case}.nrrd"  # NRRD: the geometry in double precision
                write_volume(mimics, image.geometry, verdicts)
                cases.append(SiteCase(c.case, image_path, c.label_path, mimics=verdicts, verdicts=True))
                described.append({"case": c.case, "consensus": c.source, "microbleeds": c.n_lesions, "mimics": counts})
            readers = list(study.readers().values())
        # Hashed closed: the last connection's close folds the WAL into the file.
        self._provenance = {
            "kind": "CMBReview study",
            "study": str(path.absolute()),
            "study_sha256": sha256_of(path),
            "readers": readers,
            "cases": described,
            "left_out": skipped,
            "reason_classes": REASON_CLASS,
        }
        return cases

    def provenance(self) -> dict:
        return self._provenance
