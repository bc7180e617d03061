"""The DICOM Segmentation: one segment per lesion, on the source series' own frames."""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes as dcm_codes

from .. import __version__
from ..detection.lesions import CLASS_COLORS
from . import codes
from .source import DicomSource

SERIES_NUMBER_OFFSET = 1000  # SEG and SR series numbers: the source's + 1000 and + 1001


def algorithm(result) -> hd.AlgorithmIdentificationSequence:
    """CMBDetect, its version, and what decided the result: the models and the threshold."""
    parameters = {"model": f"{result.model_id} {result.model_version}", "threshold": f"{result.params.threshold:g}"}
    stage = getattr(result, "candidate_stage", None)
    if stage:
        parameters["candidate_classifier"] = f"{stage['classifier_id']} {stage['classifier_version']}"
    return hd.AlgorithmIdentificationSequence(
        name="CMBDetect", version=__version__, family=dcm_codes.cid7162.ArtificialIntelligence, parameters=parameters
    )


def series_number(source: DicomSource, offset: int) -> int:
    number = source.headers[0].get("SeriesNumber")
    return (int(number) if number not in (None, "") else 0) + offset


def build_segmentation(result, source: DicomSource, tracking_uids: dict[int, str]) -> hd.seg.Segmentation:
    """A BINARY SEG of the result's lesions (at least one), segment n = the n-th lesion of the
    lesion table, labelled "CMB <id>" with the lesion's tracking UID.

    The spacing between slices comes from the slices' positions, not from the source headers:
    GDCM, for one, writes a Spacing Between Slices of 1 into every slice it writes, whatever
    their spacing, and readers of the SEG that trust it (dcmqi does) would stack the segments
    wrongly. Without it in the sources, highdicom computes it from the positions.
    """
    if not result.lesions:
        raise ValueError("a DICOM Segmentation needs at least one segment")
    lookup = np.zeros(int(result.labels.max()) + 1, dtype=np.uint16)
    for number, lesion in enumerate(result.lesions, start=1):
        lookup[lesion.id] = number
    segments = lookup[result.labels]  # (k, j, i): frame k is source.headers[k]
    found = algorithm(result)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=lesion.name,
            segmented_property_category=codes.LESION_CATEGORY,
            segmented_property_type=codes.LESION_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=found,
            tracking_uid=tracking_uids[lesion.id],
            tracking_id=lesion.name,
            anatomic_regions=[codes.REGION],
            display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in CLASS_COLORS[lesion.size_class])),
        )
        for number, lesion in enumerate(result.lesions, start=1)
    ]
    headers = copy.deepcopy(source.headers)
    for header in headers:
        header.pop("SpacingBetweenSlices", None)
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number(source, SERIES_NUMBER_OFFSET),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="CMBDetect",
        manufacturer_model_name=result.model_id,
        software_versions=__version__,
        device_serial_number=result.model_version,
        series_description="CMBDetect microbleeds",
    )
    codes.declare_scheme(seg)
    return seg
