"""Voxel files of a study: reader-added lesions and ground-truth labellings, as `.seg.nrrd`.

Each file lies on its case's image grid, in `<study>.files/<case>/`, named by case, reader and
what it holds (`<case>.<reader>.added-<token>.seg.nrrd`, `<case>.<reader>.groundtruth-<token>.seg.nrrd`).
It is written to a temporary file and then hard-linked to its final name: the link fails if the
name exists, so no file, least of all another reader's, is ever overwritten. The database keeps
each file's sha256; reading checks it.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import ndimage

from CMBDetectLib.detection.lesions import Lesion, equivalent_diameter_mm, size_class
from CMBDetectLib.cohort.names import inside, printable, unsafe_name_reason
from CMBDetectLib.detection.outputs import write_segmentation_nrrd
from CMBDetectLib.io import Geometry, Volume, sha256_of
from CMBDetectLib.labels import read_label

from .store import StudyError


def describe(labels: np.ndarray, geometry: Geometry, probability: np.ndarray | None = None) -> list[Lesion]:
    """One Lesion per nonzero label value (ids kept), measured in mm on the grid's spacing."""
    ids = [int(v) for v in np.unique(labels) if v != 0]
    if not ids:
        return []
    counts = ndimage.sum_labels(np.ones(labels.shape), labels, ids)
    centroids_kji = np.atleast_2d(np.array(ndimage.center_of_mass(labels > 0, labels, ids)))
    centroids_ijk = centroids_kji[:, ::-1]
    lps = geometry.index_to_lps(centroids_ijk)
    means = ndimage.mean(probability, labels, ids) if probability is not None else np.ones(len(ids))
    maxima = ndimage.maximum(probability, labels, ids) if probability is not None else np.ones(len(ids))
    out = []
    for n, lesion_id in enumerate(ids):
        d = float(equivalent_diameter_mm(int(counts[n]), geometry.spacing))
        out.append(
            Lesion(
                id=lesion_id, n_voxels=int(counts[n]), volume_mm3=float(counts[n] * geometry.voxel_volume_mm3),
                diameter_mm=d, size_class=size_class(d), centroid_ijk=tuple(map(float, centroids_ijk[n])),
                centroid_lps=tuple(map(float, lps[n])), centroid_ras=(-float(lps[n][0]), -float(lps[n][1]), float(lps[n][2])),
                mean_probability=float(means[n]), max_probability=float(maxima[n]),
            )  # fmt: skip
        )
    return out


def write_new(folder: Path, case: str, reader: str, kind: str, labels: np.ndarray, geometry: Geometry) -> tuple[Path, str]:
    """Write a labelling as a new, never-overwriting `.seg.nrrd`; returns (path, sha256)."""
    if labels.ndim != 3 or not np.any(labels):
        raise StudyError(f"{case}: an empty or non-3D labelling is not a decision")
    check_case_name(case, folder)
    folder = Path(folder) / case
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    final = folder / f"{case}.{reader}.{kind}-{stamp}-{secrets.token_hex(3)}.seg.nrrd"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".seg.nrrd", dir=folder)
    os.close(fd)
    try:
        write_segmentation_nrrd(Path(tmp), labels.astype(np.uint16), describe(labels, geometry), geometry)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.link(tmp, final)  # atomic, and fails rather than replace an existing file
    finally:
        Path(tmp).unlink(missing_ok=True)
    return final, sha256_of(final)


def check_case_name(case: str, folder: Path) -> None:
    """A case's files go into `folder`; a name that would take them elsewhere (which studies
    made before names were checked may hold) is refused, with detect's reason."""
    reason = unsafe_name_reason(case) or (None if inside(folder, case) else "the case name leads outside its folder")
    if reason:
        raise StudyError(f"{printable(case)}: {reason}")


def read_checked(path: Path, sha256: str, case: str, like: Volume) -> np.ndarray:
    """A stored labelling on its image's grid, after checking it is the file the study recorded."""
    if not path.is_file():
        raise StudyError(f"{case}: voxel file {path.name} is missing from {path.parent}")
    if sha256_of(path) != sha256:
        raise StudyError(f"{case}: voxel file {path.name} was changed after it was recorded (sha256 differs)")
    return read_label(path, case, like)
