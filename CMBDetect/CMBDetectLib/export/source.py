"""What the DICOM input gave us: the source series' headers, in the volume's slice order."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CaseError
from ..io import DicomSeries


@dataclass
class DicomSource:
    """The series a case was read from: its identity (io.DicomSeries) and one pydicom header
    per slice (no pixel data), in the order of the volume's slices, which is GDCM's order of
    `series.files`, the one SimpleITK read the voxels in."""

    series: DicomSeries
    headers: list  # pydicom.Dataset, one per slice


def read_dicom_source(series: DicomSeries, case: str, shape: tuple[int, int, int]) -> DicomSource:
    """The headers of `series`, checked against the volume (k, j, i) read from it.

    CaseError when the writers could not reference the series slice by slice: a multi-frame
    file, a file pydicom cannot read, or no frame of reference to place a segmentation in.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for name in series.files:
        try:
            headers.append(pydicom.dcmread(name, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise CaseError(case, f"DICOM export: cannot read the header of {name}: {exc}") from None
    if len(headers) != shape[0] or any(int(h.get("NumberOfFrames", 1) or 1) != 1 for h in headers):
        raise CaseError(
            case,
            f"DICOM export needs one single-frame image per slice; series {series.uid} has "
            f"{len(headers)} file(s) for {shape[0]} slices",
        )
    if any((h.get("Rows"), h.get("Columns")) != shape[1:] for h in headers):
        raise CaseError(case, f"DICOM export: the images of series {series.uid} are not all {shape[2]}x{shape[1]}")
    missing = [k for k in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in headers[0]]
    if missing:
        raise CaseError(case, f"DICOM export: series {series.uid} has no {', '.join(missing)}, needed to place a segmentation on it")
    return DicomSource(series, headers)
