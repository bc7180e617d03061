"""A case's result files, all on the input's grid, written all-or-nothing.

Per case: `<case>.seg.nrrd` (Slicer segmentation, one segment per lesion), `<case>_lesions.nii.gz`
(label map), `<case>_prob.nii.gz` (probability map, stored compactly: see `write_probability`),
`<case>_lesions.csv`, on request `<case>_preview.png` (preview.py), and `<case>_summary.json`.
With the candidate stage (candidates.py), `<case>_rejected.csv` lists the candidates it turned
down and why, the lesion CSV gains P(microbleed) and certainty, and `<case>_prob` is
P(microbleed). For a case read from a DICOM series, `--dicom-out DIR` adds `<case>_seg.dcm` and
`<case>_sr.dcm` in DIR (export/). Everything is written into a hidden folder first and moved
into place only when every file exists, the summary last, so a failed case leaves nothing behind.
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

from ..errors import BatchError
from ..io import Geometry, atomic_path, write_volume
from .candidates import Candidate
from .classifier import CLASSES
from .lesions import CLASS_COLORS, Lesion
from .preview import write_preview

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
    "summary": "{case}_summary.json",
}
OPTIONAL_FILES = ("rejected_csv", "preview")
# With `--dicom-out DIR`, for a case read from a DICOM series: the DICOM Segmentation (only when
# there is a lesion: a SEG needs a segment) and the measurement report, written by export/.
DICOM_FILES = {"dicom_seg": "{case}_seg.dcm", "dicom_sr": "{case}_sr.dcm"}


def every_output_path(out_dir: Path, case: str) -> dict[str, Path]:
    """Every file `case` may have in `out_dir`, whichever options wrote it (what a redo clears)."""
    return {key: Path(out_dir) / name.format(case=case) for key, name in OUTPUT_FILES.items()}


def output_paths(out_dir: Path, case: str, preview: bool = False, rejected: bool = False) -> dict[str, Path]:
    """The files one run writes for `case`: the fixed ones, plus the preview and the rejected
    candidates' CSV when asked for."""
    wanted = {"rejected_csv": rejected, "preview": preview}
    return {key: path for key, path in every_output_path(out_dir, case).items() if wanted.get(key, True)}


def dicom_output_paths(dicom_dir: Path, case: str) -> dict[str, Path]:
    """The DICOM objects `case` may have in the `--dicom-out` folder."""
    return {key: Path(dicom_dir) / name.format(case=case) for key, name in DICOM_FILES.items()}


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


def lesion_row(lesion: Lesion) -> dict[str, object]:
    i, j, k = lesion.centroid_ijk
    r, a, s = lesion.centroid_ras
    l_, p, s2 = lesion.centroid_lps
    values = [
        lesion.id, lesion.size_class, lesion.diameter_mm, lesion.volume_mm3, lesion.n_voxels,
        i, j, k, r, a, s, l_, p, s2, lesion.mean_probability, lesion.max_probability,
        getattr(lesion, "p_microbleed", ""), getattr(lesion, "certainty", ""),
    ]  # fmt: skip
    if not isinstance(lesion, Candidate):
        values[-2:] = ["", ""]
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


def segment_tags(lesion: Lesion) -> str:
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
    return "".join(f"{k}:{v}|" for k, v in tags.items())


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
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        # SimpleITK writes the grid (qform and sform) exactly as for every other output; nibabel
        # then adds the scaling, which SimpleITK cannot set, and gzips at its fastest level.
        plain = Path(scratch) / "grid.nii"
        write_volume(scaled, geometry, plain, compress=False)
        header = nib.load(str(plain)).header.copy()
    image = nib.Nifti1Image(scaled.T, None, header=header)
    image.header.set_slope_inter(1.0 / PROBABILITY_LEVELS, 0.0)  # after construction, which resets it
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def write_case_outputs(
    result, out_dir: Path, case: str, image: np.ndarray | None = None, *, dicom_source: dict | None = None, dicom=None
) -> dict[str, Path]:
    """Write every file of one case, then move them into `out_dir` together (summary last).

    With the input `image` (k, j, i), a preview PNG of the detections is written too.
    `dicom_source`: what identifies the DICOM series the case was read from, for the summary.
    `dicom`: an export.DicomExport; its objects are staged and moved into its folder with the
    rest, before the summary, which lists them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    two_stage = getattr(result, "candidate_stage", None) is not None
    final = output_paths(out_dir, case, preview=image is not None, rejected=two_stage)
    staging = Path(tempfile.mkdtemp(prefix=f".cmbdetect-{case}-", dir=out_dir))
    dicom_staging: Path | None = None
    moved: list[Path] = []
    try:
        staged = output_paths(staging, case, preview=image is not None, rejected=two_stage)
        write_segmentation_nrrd(staged["segmentation"], result.labels, result.lesions, result.geometry)
        write_volume(result.labels, result.geometry, staged["labels"])
        write_probability(staged["probability"], result.probability, result.geometry)
        write_lesion_csv(staged["lesions_csv"], result.lesions)
        if two_stage:
            write_rejected_csv(staged["rejected_csv"], result.rejected)
        if image is not None:
            write_preview(
                image, result.labels, result.lesions, result.geometry, staged["preview"], case,
                rejected=result.rejected if two_stage else None, rejected_labels=result.rejected_labels,
            )  # fmt: skip
        staged_dicom: dict[str, Path] = {}
        if dicom is not None:
            dicom_staging = Path(tempfile.mkdtemp(prefix=f".cmbdetect-{case}-", dir=dicom.folder))
            staged_dicom = dicom.write(result, case, dicom_output_paths(dicom_staging, case))
        final_dicom = {key: Path(dicom.folder) / path.name for key, path in staged_dicom.items()}
        files = {k: v.name for k, v in final.items() if k != "summary"}
        files.update({k: listed_name(out_dir, v) for k, v in final_dicom.items()})
        files["summary"] = final["summary"].name
        source = {"dicom_source": dicom_source} if dicom_source else {}
        summary = {"case": case, **result.summary(), **source, "files": files}
        staged["summary"].write_text(json.dumps(summary, indent=2) + "\n")
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
