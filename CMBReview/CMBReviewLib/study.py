"""Building a study from CMBDetect outputs, and the decisions that carry voxels.

A case is an SWI volume plus the folder where `cmbdetect detect` wrote its results:
`<case>_lesions.csv` (the detector's lesions: id, centroid, size), `<case>_lesions.nii.gz`
(their voxels, label = id) and `<case>_summary.json` (the detector's seconds). Paths are
stored relative to the study's folder when they lie under it, so a study folder can move.

A `cmbdetect longitudinal` output folder gives a study of new-bleed calls (longitudinal_case_list):
each pair's follow-up is a case, its detections are the follow-up's own outputs (OUT/followup/,
in detect's layout), and only its lesions that the pair's `<case>_changes.csv` calls new enter
the study: readers judge those like any detection, and add the new bleeds the tool missed.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from CMBDetectLib.cohort.names import printable, refuse_unsafe_and_duplicates
from CMBDetectLib.detection.lesions import Lesion
from CMBDetectLib.errors import CaseError
from CMBDetectLib.io import Geometry, Volume, case_name, is_volume_file, read_volume

from . import voxelfiles
from .regiongrow import grow_from_click
from .store import Study, StudyError, check_reader_name, now


def _stored_path(study: Study, path: Path) -> str:
    path = Path(path).resolve()
    try:
        return os.path.relpath(path, study.path.parent.resolve())
    except ValueError:  # another drive on Windows
        return str(path)


def resolve(study: Study, stored: str) -> Path:
    p = Path(stored)
    return p if p.is_absolute() else (study.path.parent / p).resolve()


def read_detector_lesions(detections: Path, case: str) -> tuple[list[dict], float | None]:
    """The detector's lesions of one case from `cmbdetect detect` outputs, and its seconds."""
    if not detections.is_dir():
        raise CaseError(case, f"detections folder not found: {detections}")
    summary_path = detections / f"{case}_summary.json"
    table = detections / f"{case}_lesions.csv"
    labels = detections / f"{case}_lesions.nii.gz"
    if not all(p.is_file() for p in (summary_path, table, labels)):
        raise CaseError(case, f"no complete CMBDetect result in {detections} (expected {summary_path.name}, {table.name} and {labels.name})")
    summary = json.loads(summary_path.read_text(encoding="utf-8-sig"))
    lesions = []
    with open(table, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            lesions.append(
                {
                    "id": int(row["id"]),
                    "ras": (float(row["centroid_r"]), float(row["centroid_a"]), float(row["centroid_s"])),
                    "diameter_mm": float(row["diameter_mm"]),
                    "n_voxels": int(row["n_voxels"]),
                    "size_class": row["size_class"],
                    "mean_probability": float(row["mean_probability"]),
                }
            )
    if len(lesions) != int(summary.get("n_lesions", len(lesions))):
        raise CaseError(case, f"{table.name} lists {len(lesions)} lesions, the summary {summary.get('n_lesions')}")
    seconds = summary.get("seconds")
    return lesions, float(seconds) if seconds is not None else None


# Grids agree when they agree this closely (mm, and direction cosines), as read_label and evaluate ask.
GRID_TOLERANCE = 1e-4


def grid_of(path: Path, case: str) -> tuple[tuple[int, ...], Geometry]:
    """A volume's shape (k, j, i) and geometry, from its header only (a DICOM folder is read)."""
    path = Path(path)
    if path.is_dir():
        volume = read_volume(path, case)
        return volume.shape, volume.geometry
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CaseError(case, f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from None
    geometry = Geometry(tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))
    return tuple(reader.GetSize())[::-1], geometry


def grid_differences(shape: tuple[int, ...], geometry: Geometry, like_shape: tuple[int, ...], like: Geometry) -> list[str]:
    """How one grid differs from another ("size ...", "spacing ... vs ..."); empty when they agree."""
    found = []
    if tuple(shape) != tuple(like_shape):
        found.append(f"size {'x'.join(map(str, shape[::-1]))} vs {'x'.join(map(str, like_shape[::-1]))}")
    if len(geometry.direction) != len(like.direction):
        return [*found, "not 3D"]
    for name in ("spacing", "origin", "direction"):
        a, b = np.asarray(getattr(geometry, name), float), np.asarray(getattr(like, name), float)
        if not np.allclose(a, b, atol=GRID_TOLERANCE, rtol=0):
            found.append(f"{name} {tuple(round(float(x), 4) for x in a)} vs {tuple(round(float(x), 4) for x in b)}")
    return found


def check_detections_grid(case: str, image: Path, detections: Path) -> None:
    """The detector's label map must lie on its image's grid, voxel for voxel."""
    labels = Path(detections) / f"{case}_lesions.nii.gz"
    differ = grid_differences(*grid_of(labels, case), *grid_of(Path(image), case))
    if differ:
        raise CaseError(case, f"detections {labels.name} are not on the image's grid ({'; '.join(differ)}): were they made from another image?")


def case_list(images: Path | None = None, detections: Path | None = None, csv_path: Path | None = None) -> list[tuple[str, Path, Path]]:
    """(case, image, detections folder) from a folder of images + a detections folder, or a CSV
    with columns image and detections (and optionally case); CSV paths are relative to the CSV."""
    if csv_path is not None:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        missing = {"image", "detections"} - set(rows[0].keys() if rows else ())
        if missing:
            raise StudyError(f"{csv_path} needs columns image and detections (missing: {', '.join(sorted(missing))})")
        base = Path(csv_path).parent
        return [(r.get("case") or case_name(Path(r["image"])), base / r["image"], base / r["detections"]) for r in rows]
    if images is None or detections is None:
        raise StudyError("give a folder of images and the folder of their CMBDetect results, or a CSV")
    if not Path(images).is_dir():
        raise StudyError(f"image folder not found: {images}")
    if not Path(detections).is_dir():
        raise StudyError(f"detections folder not found: {detections}")
    files = sorted(p for p in Path(images).iterdir() if is_volume_file(p) and not p.name.startswith("."))
    return [(case_name(p), p, Path(detections)) for p in files]


# A changes row and the follow-up's lesion row give one lesion's centroid to 3 and 4 decimals.
SAME_PLACE_MM = 0.01


def longitudinal_case_list(folder: Path) -> list[tuple[str, Path, Path, Path]]:
    """(case, image, detections folder, changes CSV) for each pair `cmbdetect longitudinal` wrote
    in `folder` (a pair it refused has no summary, so no case): the follow-up's case name, scan
    and outputs; check_cases keeps only the lesions the changes CSV calls new."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StudyError(f"longitudinal folder not found: {folder}")
    cases = []
    for path in sorted(folder.glob("*_summary.json")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            continue  # not a pair's summary; check_cases cannot name a case without one
        if not isinstance(summary, dict) or "followup_case" not in summary or "files" not in summary:
            continue
        image = Path(summary.get("parameters", {}).get("followup") or summary["followup"])
        cases.append((summary["followup_case"], image, folder / "followup", folder / summary["files"]["changes_csv"]))
    if not cases:
        raise StudyError(f"{folder} holds no pair of `cmbdetect longitudinal` (no <case>_summary.json with a follow-up)")
    return cases


def new_lesions_only(lesions: list[dict], changes_csv: Path, case: str) -> list[dict]:
    """The follow-up's detector lesions that `changes_csv` calls new, found by their centroid."""
    if not Path(changes_csv).is_file():
        raise CaseError(case, f"its changes list {changes_csv} is missing")
    with open(changes_csv, newline="", encoding="utf-8-sig") as f:
        new = [np.array([float(r[k]) for k in ("centroid_r", "centroid_a", "centroid_s")]) for r in csv.DictReader(f) if r["status"] == "new"]
    kept = []
    for point in new:
        near = [l for l in lesions if np.linalg.norm(np.asarray(l["ras"]) - point) <= SAME_PLACE_MM]
        if len(near) != 1:
            raise CaseError(case, f"{Path(changes_csv).name} has a new lesion at RAS {tuple(round(float(v), 2) for v in point)} that is "
                                  "not one lesion of the follow-up's lesions.csv: were they written by different runs?")  # fmt: skip
        kept.append(near[0])
    return sorted(kept, key=lambda l: l["id"])


@dataclass(frozen=True)
class CheckedCase:
    name: str
    image: Path
    detections: Path
    lesions: list[dict]
    seconds: float | None


def check_cases(cases: list[tuple], known: set[str] = frozenset()) -> tuple[list[CheckedCase], list[CaseError]]:
    """Each case checked before any is stored: a safe name, not `known`, its image readable,
    a complete CMBDetect result on the image's grid. A bad case is reported, the rest go on.
    A case is (name, image, detections) or, from longitudinal_case_list, (name, image,
    detections, changes CSV): then only its new lesions are kept.

    Case names follow `cmbdetect detect`'s rules (cohort/names.py): a name names the case's
    voxel files and consensus files, so one that could climb out of their folder is refused.
    """
    good, errors = [], []
    seen = {_folded(n) for n in known}
    refused = refuse_unsafe_and_duplicates([c[0] for c in cases])
    for n, (name, image, detections, *changes) in enumerate(cases):
        try:
            if n in refused:
                raise CaseError(printable(name), refused[n])
            if _folded(name) in seen:
                raise CaseError(name, "already in the study")
            if not Path(image).exists():
                raise CaseError(name, f"image not found: {image}")
            lesions, seconds = read_detector_lesions(Path(detections), name)
            if changes:
                lesions = new_lesions_only(lesions, changes[0], name)
            check_detections_grid(name, Path(image), Path(detections))
            good.append(CheckedCase(name, Path(image), Path(detections), lesions, seconds))
            seen.add(_folded(name))
        except (CaseError, ValueError, KeyError, OSError) as exc:
            errors.append(exc if isinstance(exc, CaseError) else CaseError(name, str(exc)))
    return good, errors


def _insert_cases(study: Study, cases: list[CheckedCase]) -> tuple[list[str], list[CaseError]]:
    added, errors = [], []
    for case in cases:
        try:
            with study.transaction() as con:  # the case and its lesions together, or neither
                position = con.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM cases").fetchone()[0]
                case_id = con.execute(
                    "INSERT INTO cases (name, image, detections, detector_seconds, position) VALUES (?, ?, ?, ?, ?)",
                    (case.name, _stored_path(study, case.image), _stored_path(study, case.detections), case.seconds, position),
                ).lastrowid
                con.executemany(
                    "INSERT INTO lesions (case_id, source, detector_label, r, a, s, diameter_mm, n_voxels, size_class, "
                    "mean_probability, created) VALUES (?, 'detector', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(case_id, l["id"], *l["ras"], l["diameter_mm"], l["n_voxels"], l["size_class"], l["mean_probability"], now())
                     for l in case.lesions],
                )  # fmt: skip
            added.append(case.name)
        except (sqlite3.IntegrityError, StudyError) as exc:
            errors.append(CaseError(case.name, str(exc)))
    return added, errors


def add_cases(study: Study, cases: list[tuple]) -> tuple[list[str], list[CaseError]]:
    """Add each case with its detector lesions (one transaction per case); a bad case is reported, the rest go on."""
    good, errors = check_cases(cases, {c.name for c in study.cases()})
    added, failed = _insert_cases(study, good)
    return added, errors + failed


def create_study(
    path: str | Path, cases: list[tuple], name: str | None = None, match_radius_mm: float = 5.0,
    readers: Sequence[str] = (),
) -> tuple[list[str], list[CaseError]]:  # fmt: skip
    """A new study with the cases that pass `check_cases` (the others reported) and `readers`;
    when no case passes or a reader's name is refused, nothing is created: a study cannot take
    cases later, so an empty one is no use."""
    path = Path(path)
    if path.exists():
        raise StudyError(f"study {path} exists already: open it instead")
    for reader in readers:
        check_reader_name(reader)
    if not cases:
        raise StudyError("no cases found")
    good, errors = check_cases(cases)
    if not good:
        raise StudyError("no case could be added, so no study was created:\n" + "\n".join(f"  {e}" for e in errors))
    with Study.create(path, name, match_radius_mm) as study:
        added, failed = _insert_cases(study, good)
        for reader in readers:
            study.add_reader(reader)
    return added, errors + failed


def _folded(name: str) -> str:
    # `A` and `a` are one folder on macOS and Windows, as in refuse_unsafe_and_duplicates.
    return unicodedata.normalize("NFC", name).casefold()


def load_image(study: Study, case: str) -> Volume:
    return read_volume(resolve(study, study.case(case).image), case)


def detector_labels(study: Study, case: str, like: Volume) -> np.ndarray:
    """The detector's label map of a case (label = lesion id), on the image's grid."""
    from CMBDetectLib.labels import read_label

    c = study.case(case)
    if c.detections is None:
        return np.zeros(like.shape, np.uint16)
    return read_label(resolve(study, c.detections) / f"{case}_lesions.nii.gz", case, like)


@dataclass(frozen=True)
class AddedFile:
    """An added lesion's voxel file, written and not yet recorded in the study."""

    case: str
    reader: str
    path: Path
    sha256: str
    lesion: Lesion


def write_added(study: Study, case: str, reader: str, mask: np.ndarray, image: Volume) -> AddedFile:
    """Write a missed lesion's voxels to a new file (recorded by `record_added`)."""
    mask = np.asarray(mask) > 0
    if mask.shape != image.shape:
        raise StudyError(f"{case}: the added lesion's mask {mask.shape} is not on the image grid {image.shape}")
    study.reader_id(reader), study.case(case)  # both known, before a file is written
    path, digest = voxelfiles.write_new(study.files_dir, case, reader, "added", mask.astype(np.uint16), image.geometry)
    (lesion,) = voxelfiles.describe(mask.astype(np.uint16), image.geometry)
    return AddedFile(case, reader, path, digest, lesion)


def record_added(study: Study, added: AddedFile, certainty: str = "definite") -> int:
    lesion = added.lesion
    return study.add_reader_lesion(
        study.case(added.case).id, study.reader_id(added.reader), str(added.path.relative_to(study.files_dir)), added.sha256,
        lesion.centroid_ras, lesion.n_voxels, lesion.diameter_mm, lesion.size_class, certainty,
    )  # fmt: skip


def add_missed(study: Study, case: str, reader: str, mask: np.ndarray, image: Volume, certainty: str = "definite") -> int:
    """Store a lesion the detector missed: its voxels to a new file, then one transaction."""
    return record_added(study, write_added(study, case, reader, mask, image), certainty)


def ras_to_kji(image: Volume, ras: tuple[float, float, float]) -> tuple[int, int, int]:
    lps = np.array([-ras[0], -ras[1], ras[2], 1.0])
    ijk = np.linalg.solve(image.geometry.ijk_to_lps(), lps)[:3]
    return tuple(int(v) for v in np.round(ijk[::-1]))  # type: ignore[return-value]


def add_missed_at(study: Study, case: str, reader: str, ras: tuple[float, float, float], image: Volume,
                  diameter_mm: float | None = None, certainty: str = "definite") -> int:  # fmt: skip
    """A missed lesion from one click at RAS: grown from the click (bounded to 10 mm), or a
    sphere of `diameter_mm` when given (for lists of positions from elsewhere)."""
    kji = ras_to_kji(image, ras)
    if any(not 0 <= v < n for v, n in zip(kji, image.shape)):
        raise StudyError(f"{case}: point RAS {tuple(round(v, 1) for v in ras)} lies outside the image")
    if diameter_mm:
        from .regiongrow import sphere_mask

        mask = sphere_mask(image.shape, image.geometry, kji, diameter_mm / 2)
    else:
        try:
            mask = grow_from_click(image.array, image.geometry, kji)
        except ValueError as exc:
            raise StudyError(f"{case}: {exc}") from None
    return add_missed(study, case, reader, mask, image, certainty)


def save_groundtruth(study: Study, case: str, reader: str, labels: np.ndarray, image: Volume) -> int:
    """A reader's ground-truth labelling of a case (a new version each time; old ones stay)."""
    if labels.shape != image.shape:
        raise StudyError(f"{case}: the labelling {labels.shape} is not on the image grid {image.shape}")
    reader_id, case_id = study.reader_id(reader), study.case(case).id
    path, digest = voxelfiles.write_new(study.files_dir, case, reader, "groundtruth", np.asarray(labels).astype(np.uint16), image.geometry)
    return study.add_groundtruth(case_id, reader_id, str(path.relative_to(study.files_dir)), digest)
