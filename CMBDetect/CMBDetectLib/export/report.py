"""The TID 1500 measurement report: per lesion its size, the classifier's verdict and its MARS
location (category, structure, side), per case the counts by class and by MARS category."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes as dcm_codes

from .. import __version__
from . import codes
from .segmentation import SERIES_NUMBER_OFFSET, series_number
from .source import DicomSource


def _number(name, value: float, unit, **kwargs) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, **kwargs)


def _lesion_group(lesion, number: int, seg, source: DicomSource, tracking_uid: str, found) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = [
        _number(dcm_codes.SCT.Diameter, lesion.diameter_mm, dcm_codes.UCUM.Millimeter, method=codes.EQUIVALENT_DIAMETER),
        _number(dcm_codes.SCT.Volume, lesion.volume_mm3, dcm_codes.UCUM.CubicMillimeter),
    ]
    evaluations = [hd.sr.QualitativeEvaluation(codes.SIZE_CLASS, codes.SIZE_VALUES[lesion.size_class])]
    if getattr(lesion, "certainty", ""):  # the candidate stage's verdict; the single-stage pipeline has none
        measurements.append(_number(codes.P_MICROBLEED, lesion.p_microbleed, codes.NO_UNITS))
        evaluations.append(hd.sr.QualitativeEvaluation(dcm_codes.DCM.CertaintyOfFinding, codes.CERTAINTY_VALUES[lesion.certainty]))
    if lesion.mars_region:  # with --no-regions, no location
        evaluations.append(hd.sr.QualitativeEvaluation(codes.MARS_REGION, codes.MARS_REGION_VALUES[lesion.mars_region]))
        evaluations.append(hd.sr.QualitativeEvaluation(codes.MARS_STRUCTURE, codes.MARS_STRUCTURE_VALUES[lesion.mars_structure]))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=lesion.name),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(source.series.uid),
        ),  # fmt: skip
        finding_type=codes.LESION_TYPE,
        finding_sites=[_site(lesion.side)],
        algorithm_id=found,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _site(side: str) -> hd.sr.FindingSite:
    """The brain, with the lesion's side: laterality left or right, or the midline modifier."""
    if side == "midline":
        return hd.sr.FindingSite(codes.REGION, topographical_modifier=codes.MIDLINE)
    return hd.sr.FindingSite(codes.REGION, laterality=codes.LATERALITY.get(side))


def _counts_group(result, found) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    lesions = result.lesions
    counts = {
        "n_small": sum(lesion.size_class == "small" for lesion in lesions),
        "n_large": sum(lesion.size_class == "large" for lesion in lesions),
    }
    if getattr(result, "candidate_stage", None) is not None:
        counts["n_definite"] = sum(getattr(lesion, "certainty", "") == "definite" for lesion in lesions)
        counts["n_possible"] = sum(getattr(lesion, "certainty", "") == "possible" for lesion in lesions)
    if getattr(result, "anatomy", None) is not None:  # regions were asked for
        counts.update({key: sum(lesion.mars_region == key.removeprefix("n_").replace("region_", "") for lesion in lesions)
                       for key in codes.REGION_COUNTS})  # fmt: skip
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="Microbleed counts"),
        finding_type=codes.LESION_TYPE,
        finding_sites=[hd.sr.FindingSite(codes.REGION)],
        algorithm_id=found,
        measurements=[
            _number(codes.N_LESIONS, len(lesions), codes.LESIONS_UNIT),
            *(_number({**codes.CLASS_COUNTS, **codes.REGION_COUNTS}[key], n, codes.LESIONS_UNIT) for key, n in counts.items()),
        ],
    )


def build_report(result, source: DicomSource, seg, tracking_uids: dict[int, str]) -> hd.sr.Comprehensive3DSR:
    """The report, referencing the SEG's segments (`seg` is None when there is no lesion) and,
    through them and its evidence, the source series."""
    found = hd.sr.AlgorithmIdentification(name="CMBDetect", version=__version__)
    groups = [
        _lesion_group(lesion, number, seg, source, tracking_uids[lesion.id], found)
        for number, lesion in enumerate(result.lesions, start=1)
    ]
    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="CMBDetect", manufacturer_name="CMBDetect", model_name=result.model_id,
        ),  # fmt: skip
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=dcm_codes.SCT.ImagingProcedure,
        imaging_measurements=[*groups, _counts_group(result, found)],
    )
    report = hd.sr.Comprehensive3DSR(
        evidence=[*source.headers, *([seg] if seg is not None else [])],
        content=content,
        series_number=series_number(source, SERIES_NUMBER_OFFSET + 1),
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="CMBDetect",
        series_description="CMBDetect microbleed measurements",
    )
    codes.declare_scheme(report)
    return report
