"""A case's result files, all on the input's grid, written all-or-nothing.

Per case: `<case>.seg.nrrd` (Slicer segmentation, one segment per lesion), `<case>_lesions.nii.gz`
(label map), `<case>_prob.nii.gz` (probability map, stored compactly: see `write_probability`),
`<case>_lesions.csv` (with each lesion's MARS region, structure and side), `<case>_registration.png`
(the registration's QC picture; not with --no-regions), on request `<case>_preview.png`
(preview.py), and `<case>_summary.json`.
With the candidate stage (candidates.py), `<case>_rejected.csv` lists the candidates it turned
down and why, the lesion CSV gains P(microbleed) and certainty, and `<case>_prob` is
P(microbleed). For a case read from a DICOM series, `--dicom-out DIR` adds `<case>_seg.dcm` and
`<case>_sr.dcm` in DIR (export/). The columns, rows and tags are records.py's (torch-free, for
Slicer's process). Everything is written into a hidden folder first, flushed to the disk, and moved
into place only when every file exists, the summary last, so a failed case (a full disk included)
leaves nothing behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from ..errors import BatchError, CaseError
from ..io import Geometry, atomic_path, fsync_file, write_volume
from .lesions import CLASS_COLORS, Lesion
from ..anatomy.picture import write_registration_picture
from .preview import write_preview
from .records import (
    LESION_COLUMNS, REJECTED_COLUMNS, Candidate, dicom_output_paths, lesion_row, output_paths, rejected_row, segment_tags,
)  # fmt: skip


def listed_name(out_dir: Path, path: Path) -> str:
    """How the summary names a file: relative to the output folder when inside it, else absolute."""
    try:
        return Path(path).relative_to(out_dir).as_posix()
    except ValueError:
        return str(Path(path).absolute())


def prepare_output_folder(out_dir: Path) -> None:
    """Create `out_dir` if needed and prove a file can be written there; BatchError if not.

    Called before any case runs: a read-only or uncreatable folder would otherwise show only
    when each case's detection is done and its files cannot be put anywhere.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A real file, not os.access: ACLs, read-only mounts and full quotas answer only to a write.
        fd, probe = tempfile.mkstemp(prefix=".cmbdetect_probe_", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BatchError(f"cannot write to the output folder {out_dir}: {exc.strerror or exc}") from exc


def write_rejected_csv(path: Path, rejected: list[Candidate]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REJECTED_COLUMNS)
        writer.writeheader()
        writer.writerows(rejected_row(c) for c in rejected)


def write_lesion_csv(path: Path, lesions: list[Lesion]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LESION_COLUMNS)
        writer.writeheader()
        writer.writerows(lesion_row(l) for l in lesions)


def write_segmentation_nrrd(path: Path, labels: np.ndarray, lesions: list[Lesion], geometry: Geometry) -> None:
    """A `.seg.nrrd` that Slicer loads: one binary-labelmap layer, one segment per lesion.

    The header carries the grid in LPS (as the image it came from) and Slicer's segment
    fields: ID, name, colour, label value, layer, extent and tags (terminology, size).
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D array, not shape {labels.shape}")
    dtype = np.uint8 if len(lesions) < 256 else np.uint16
    data = labels.astype(dtype)
    directions = geometry.direction_matrix @ np.diag(geometry.spacing)  # columns: i, j, k steps
    header: dict[str, object] = {
        "type": "unsigned char" if dtype == np.uint8 else "unsigned short",
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": directions.T,  # one row per axis, in file (i, j, k) order
        "space origin": np.asarray(geometry.origin, dtype=float),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    kji = np.argwhere(labels > 0)
    owners = labels[tuple(kji.T)] if kji.size else np.empty(0, dtype=labels.dtype)
    for n, lesion in enumerate(lesions):
        pts = kji[owners == lesion.id]
        if pts.size:
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            extent = f"{lo[2]} {hi[2]} {lo[1]} {hi[1]} {lo[0]} {hi[0]}"
        else:
            extent = "0 -1 0 -1 0 -1"
        color = CLASS_COLORS[lesion.size_class]
        prefix = f"Segment{n}_"
        header[prefix + "ID"] = f"CMB_{lesion.id}"
        header[prefix + "Name"] = lesion.name
        header[prefix + "NameAutoGenerated"] = "0"
        header[prefix + "Color"] = " ".join(f"{c:.6f}" for c in color)
        header[prefix + "ColorAutoGenerated"] = "0"
        header[prefix + "LabelValue"] = str(lesion.id)
        header[prefix + "Layer"] = "0"
        header[prefix + "Extent"] = extent
        header[prefix + "Tags"] = segment_tags(lesion)
    # pynrrd writes unknown keys as `key:=value`, the form Slicer reads its fields from.
    nrrd.write(str(path), data, header, index_order="C")


PROBABILITY_LEVELS = 65535  # uint16 steps of 1/65535: at most 7.7e-6 from the float map


def write_probability(path: Path, probability: np.ndarray, geometry: Geometry) -> None:
    """The probability map as NIfTI uint16 with scl_slope = 1/65535: readers get floats back.

    Every NIfTI reader (ITK/SimpleITK, nibabel, Slicer) applies scl_slope, so `cmbdetect
    evaluate` reads values within 7.7e-6 of the map in memory: far below any threshold step or
    ROC bin. Half the bytes of float32, and the many exact zeros (outside the head) compress
    at gzip's fastest level in a fraction of the time a float map takes.
    """
    path = Path(path)
    scaled = np.empty(probability.shape, np.uint16)
    for k in range(0, probability.shape[0], 16):  # in slabs: no full-size float temporary
        slab = np.rint(probability[k : k + 16] * np.float32(PROBABILITY_LEVELS))
        scaled[k : k + 16] = np.clip(slab, 0, PROBABILITY_LEVELS)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=path.parent) as scratch:
        # SimpleITK writes the grid (qform and sform) exactly as for every other output; nibabel
        # then adds the scaling, which SimpleITK cannot set, and gzips at its fastest level. The
        # header depends on the geometry alone, so a 2x2x2 image gives it: writing the full map
        # here would cost time and, on a nearly full disk, print niftilib's "NWAD" error for a
        # scratch file whose voxels nobody reads.
        plain = Path(scratch) / "grid.nii"
        write_volume(np.zeros((2, 2, 2), np.uint16), geometry, plain, compress=False)
        header = nib.load(str(plain)).header.copy()
    image = nib.Nifti1Image(scaled.T, None, header=header)
    image.header.set_slope_inter(1.0 / PROBABILITY_LEVELS, 0.0)  # after construction, which resets it
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def write_case_outputs(
    result, out_dir: Path, case: str, image: np.ndarray | None = None, *, dicom_source: dict | None = None, dicom=None
) -> dict[str, Path]:
    """Write every file of one case, then move them into `out_dir` together (summary last).

    With the input `image` (k, j, i), a preview PNG of the detections is written too. A file
    that cannot be written (a full disk) raises CaseError naming it, and nothing is left.
    `dicom_source`: what identifies the DICOM series the case was read from, for the summary.
    `dicom`: an export.DicomExport; its objects are staged and moved into its folder with the
    rest, before the summary, which lists them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    two_stage = getattr(result, "candidate_stage", None) is not None
    anatomy = getattr(result, "anatomy", None)
    final = output_paths(out_dir, case, preview=image is not None, rejected=two_stage, registration=anatomy is not None)
    staging = Path(tempfile.mkdtemp(prefix=f".cmbdetect-{case}-", dir=out_dir))
    dicom_staging: Path | None = None
    moved: list[Path] = []
    try:
        staged = output_paths(staging, case, preview=image is not None, rejected=two_stage, registration=anatomy is not None)
        staged_dicom: dict[str, Path] = {}
        if dicom is not None:
            dicom_staging = Path(tempfile.mkdtemp(prefix=f".cmbdetect-{case}-", dir=dicom.folder))
            try:
                staged_dicom = dicom.write(result, case, dicom_output_paths(dicom_staging, case))
                for path in staged_dicom.values():
                    fsync_file(path)
            except OSError as exc:
                raise CaseError(case, f"cannot write the DICOM objects in {dicom.folder}: {exc.strerror or exc}") from None
        final_dicom = {key: Path(dicom.folder) / path.name for key, path in staged_dicom.items()}
        files = {k: v.name for k, v in final.items() if k != "summary"}
        files.update({k: listed_name(out_dir, v) for k, v in final_dicom.items()})
        files["summary"] = final["summary"].name
        source = {"dicom_source": dicom_source} if dicom_source else {}
        summary = {"case": case, **result.summary(), **source, "files": files}
        writers = {
            "segmentation": lambda p: write_segmentation_nrrd(p, result.labels, result.lesions, result.geometry),
            "labels": lambda p: write_volume(result.labels, result.geometry, p),
            "probability": lambda p: write_probability(p, result.probability, result.geometry),
            "lesions_csv": lambda p: write_lesion_csv(p, result.lesions),
            "rejected_csv": lambda p: write_rejected_csv(p, result.rejected),
            "preview": lambda p: write_preview(
                image, result.labels, result.lesions, result.geometry, p, case,
                rejected=result.rejected if two_stage else None, rejected_labels=result.rejected_labels,
            ),
            "registration": lambda p: write_registration_picture(anatomy.registration, p, case),
            "summary": lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"),
        }  # fmt: skip
        for key, path in staged.items():  # the summary last
            try:
                writers[key](path)
                fsync_file(path)  # a write error the disk reports late (NFS, quota) surfaces here
            except OSError as exc:
                raise CaseError(case, f"cannot write {final[key].name} in {out_dir}: {exc.strerror or exc}") from None
        for key, path in [*staged_dicom.items(), *staged.items()]:
            target = final_dicom[key] if key in final_dicom else final[key]
            os.chmod(path, 0o644)
            os.replace(path, target)
            moved.append(target)
    except BaseException:
        for path in moved:  # a case is either complete or absent
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if dicom_staging is not None:
            shutil.rmtree(dicom_staging, ignore_errors=True)
    return {**final_dicom, **final}
