"""Writing a case's DICOM objects beside its other outputs (detection/outputs.py moves them
into place with the rest, all or nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CaseError
from .source import DicomSource


def check_available() -> None:
    """RuntimeError saying what to install when highdicom (and a pydicom it supports) is missing."""
    try:
        import highdicom  # noqa: F401
    except (ImportError, AttributeError) as exc:  # an old pydicom breaks highdicom's own imports
        raise RuntimeError(
            f"DICOM export needs highdicom and pydicom 3 (pip install highdicom): {exc}. "
            "Inside 3D Slicer 5.10 (pydicom 2.4) DICOM export is a command-line feature for now"
        ) from None


@dataclass
class DicomExport:
    """Where a case's DICOM objects go, and the series they refer to."""

    folder: Path
    source: DicomSource

    def write(self, result, case: str, paths: dict[str, Path]) -> dict[str, Path]:
        """Write the SEG (when there is a lesion) and the SR to `paths` (dicom_seg, dicom_sr);
        returns those written. The tracking UIDs tie each SR lesion to its segment."""
        import highdicom as hd

        from .report import build_report
        from .segmentation import build_segmentation

        tracking = {lesion.id: hd.UID() for lesion in result.lesions}
        try:
            seg = build_segmentation(result, self.source, tracking) if result.lesions else None
            report = build_report(result, self.source, seg, tracking)
        except (ValueError, TypeError, AttributeError) as exc:  # highdicom refuses what it cannot encode
            raise CaseError(case, f"DICOM export: {exc}") from None
        written = {}
        if seg is not None:
            seg.save_as(paths["dicom_seg"], enforce_file_format=True)
            written["dicom_seg"] = paths["dicom_seg"]
        report.save_as(paths["dicom_sr"], enforce_file_format=True)
        written["dicom_sr"] = paths["dicom_sr"]
        return written
