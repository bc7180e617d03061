"""Consensus ground truth from the readers' decisions, on each image's own grid.

Per case, in order of preference:
1. an endorsed ground truth: the latest labelling of the case that a second reader endorsed;
2. the majority: every candidate (matching.py) that a strict majority of the readers who
   reviewed the case rated a microbleed. Its voxels are the detector's voxels for that lesion
   (from `<case>_lesions.nii.gz`) joined with those of every reader-added lesion matched to it.
Cases nobody reviewed are left out, and said so; a case that fails (a voxel file changed or
missing, a grid that differs, an unsafe name) is named, and the other cases go on.

Written to OUT (the lesions numbered 1..N in each file):
- `labels/<case>.seg.nrrd`: a Slicer segmentation, one segment per lesion, which
  `cmbdetect evaluate --truth OUT` reads directly;
- `train.csv` (case, image, label -> the `.seg.nrrd`): for `cmbdetect train --data OUT/train.csv`;
- `consensus.csv`: per case, where the truth came from and how many lesions it holds.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from CMBDetectLib.detection.outputs import write_segmentation_nrrd
from CMBDetectLib.errors import CaseError

from . import analysis, voxelfiles
from .study import detector_labels, load_image, resolve
from .store import Study, StudyError


@dataclass
class ConsensusCase:
    case: str
    source: str  # "endorsed ground truth by <reader> (endorsed by ...)" or "majority of N readers"
    n_lesions: int
    label_path: Path | None


def majority_labels(study: Study, case_name: str, image, candidates, readers, rat, ctx) -> tuple[np.ndarray, int]:
    case = study.case(case_name)
    reviewed = [m for m, r in enumerate(readers) if case.id in ctx["reviewed"][r]]
    out = np.zeros(image.shape, np.uint16)
    if not reviewed:
        return out, 0
    need = len(reviewed) // 2 + 1  # a strict majority of those who reviewed the case
    det = None
    n = 0
    by_id = {l.id: l for l in ctx["lesions"]}
    for k, c in enumerate(candidates):
        if c.case_id != case.id:
            continue
        votes = np.nansum(rat[k, reviewed])
        if votes < need:
            continue
        mask = np.zeros(image.shape, bool)
        if c.detector_lesion is not None:
            det = detector_labels(study, case_name, image) if det is None else det
            mask |= det == by_id[c.detector_lesion].detector_label
        for lesion_id in c.added.values():
            path, digest = study.file(by_id[lesion_id].file_id)
            mask |= voxelfiles.read_checked(path, digest, case_name, image) > 0
        n += 1
        out[mask] = n
    return out, n


def _export(
    study: Study, out: Path, staging: Path, cases: list[str] | None, use_endorsed: bool
) -> tuple[list[ConsensusCase], list[str], list[str]]:
    candidates, readers, _, rat, ctx = analysis.ratings(study)
    reader_ids = list(readers)
    names = readers
    written, skipped, failed = [], [], []
    rows = []
    for case in study.cases():
        if cases is not None and case.name not in cases:
            continue
        try:
            voxelfiles.check_case_name(case.name, out / "labels")
            image = load_image(study, case.name)
            endorsed = [g for g in study.groundtruths(case.id) if g["endorsed_by"]] if use_endorsed else []
            if endorsed:
                g = endorsed[-1]
                path, digest = study.file(g["file_id"])
                labels = voxelfiles.read_checked(path, digest, case.name, image).astype(np.uint16)
                source = f"ground truth by {names[g['reader_id']]}, endorsed by {', '.join(names[r] for r in g['endorsed_by'])}"
            else:
                reviewed = [r for r in reader_ids if case.id in ctx["reviewed"][r]]
                if not reviewed:
                    skipped.append(f"{case.name}: no reader has reviewed it")
                    continue
                labels, _ = majority_labels(study, case.name, image, candidates, reader_ids, rat, ctx)
                source = f"majority of {len(reviewed)} reader(s): {', '.join(names[r] for r in reviewed)}"
        except (CaseError, StudyError) as exc:
            failed.append(str(exc))
            continue
        lesions = voxelfiles.describe(labels, image.geometry)
        seg = staging / "labels" / f"{case.name}.seg.nrrd"
        seg.parent.mkdir(exist_ok=True)
        write_segmentation_nrrd(seg, labels, lesions, image.geometry)
        written.append(ConsensusCase(case.name, source, len(lesions), out / "labels" / seg.name))
        rows.append({"case": case.name, "image": str(resolve(study, case.image)), "label": f"labels/{seg.name}"})
    with open(staging / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["case", "image", "label"])
        w.writeheader()
        w.writerows(rows)
    with open(staging / "consensus.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case", "lesions", "source"])
        w.writerows([c.case, c.n_lesions, c.source] for c in written)
    # Into place by renames: the label files first, the two CSVs last, so that train.csv never
    # names a file that is not there yet.
    for c in written:
        c.label_path.parent.mkdir(exist_ok=True)
        os.replace(staging / "labels" / c.label_path.name, c.label_path)
    for name in ("train.csv", "consensus.csv"):
        os.replace(staging / name, out / name)
    return written, skipped, failed


def export_consensus(
    study: Study, out: str | Path, cases: list[str] | None = None, use_endorsed: bool = True
) -> tuple[list[ConsensusCase], list[str], list[str]]:
    """Write the consensus of every reviewed case; returns what was written, the cases skipped
    (nobody reviewed them) and the cases that failed ("case: problem"; the others go on).

    Everything is written into a hidden folder inside OUT first: an error or an interruption
    there leaves OUT as it was."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".consensus-tmp-", dir=out))
    try:
        return _export(study, out, staging, cases, use_endorsed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
