"""DICOM out: a Segmentation and a TID 1500 measurement report for a case read from a DICOM
series, written with highdicom.

Writers only: they take a finished detection result and what the DICOM input gave us (the
source series' headers: study, series and frame-of-reference UIDs, each slice's position), and
the detector never knows DICOM exists. highdicom and pydicom are imported only here, and only
when DICOM export is asked for: inside 3D Slicer 5.10 (pydicom 2.4, which current highdicom
does not support) it is a command-line feature for now.
"""

from __future__ import annotations

from .source import DicomSource, read_dicom_source
from .writer import DicomExport, check_available

__all__ = ["DicomExport", "DicomSource", "check_available", "read_dicom_source"]
