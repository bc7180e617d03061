"""DICOM in and out for `cmbdetect detect`, checked by tools we did not write.

In: a series written by GDCM (through SimpleITK) with an oblique orientation and anisotropic
spacing; a folder with several series is refused with the list unless one is chosen.
Out: the DICOM Segmentation and the TID 1500 measurement report, checked by dciodvfy
(dicom3tools), read back by dcmqi (Slicer's own SEG converter) onto the lesion map's voxels,
and by pydicom (the measurements against the lesion table).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CMBDetectLib.commands.detect import main as detect_main
from CMBDetectLib.errors import CaseError
from CMBDetectLib.export import codes as export_codes
from CMBDetectLib.io import read_volume
from handmade import constant_classifier, oblique_geometry, phantom, save_dark_spot_model, write_dicom_series

SWI_UID = "1.2.826.0.1.3680043.8.498.10.1"
MIP_UID = "1.2.826.0.1.3680043.8.498.10.2"
SHAPE = (12, 64, 64)
SPHERES = [((6, 20, 22), 5.0), ((5, 42, 44), 7.0)]
# DICOM codes the objects must carry (README, "DICOM export").
HEMORRHAGE, BRAIN, DIAMETER, VOLUME, N_LESIONS = "50960005", "12738006", "81827009", "118565006", "246206008"
LATERALITY = "272741003"  # the finding site's laterality modifier


def gdcm_geometry():
    return oblique_geometry(spacing=(0.9, 0.8, 2.5))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    detector = str(save_dark_spot_model(root / "dark-spot.safetensors", base_channels=2))
    keep_all = str(constant_classifier(root / "bleeds.safetensors", keep_at=0.5, favourite="microbleed"))
    return detector, keep_all


@pytest.fixture(scope="module")
def two_series(tmp_path_factory):
    """One folder, two series of one study: the SWI with two microbleeds, and a 'minIP' with none."""
    folder = tmp_path_factory.mktemp("dicom") / "sub-01"
    array, geometry, _ = phantom(shape=SHAPE, geometry=gdcm_geometry(), spheres_mm=SPHERES)
    write_dicom_series(folder, array, geometry, SWI_UID, description="SWI magnitude")
    plain, _, _ = phantom(shape=SHAPE, geometry=geometry, spheres_mm=[], seed=3)
    write_dicom_series(folder, plain, geometry, MIP_UID, description="SWI minIP")
    return folder


@pytest.fixture(scope="module")
def one_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom1") / "sub-02"
    array, geometry, _ = phantom(shape=SHAPE, geometry=gdcm_geometry(), spheres_mm=SPHERES)
    write_dicom_series(folder, array, geometry, SWI_UID)
    return folder


def batch_rows(out: Path) -> dict[str, dict]:
    return {r["case"]: r for r in csv.DictReader(open(out / "cmbdetect_batch.csv"))}


# --- DICOM in: the series is chosen, never guessed -------------------------------------------


def test_a_folder_with_two_series_is_refused_with_the_list(two_series):
    with pytest.raises(CaseError) as caught:
        read_volume(two_series, "sub-01")
    message = str(caught.value)
    assert message.startswith("sub-01: ") and "2 DICOM series" in message and "--series" in message
    for uid, description in ((SWI_UID, "SWI magnitude"), (MIP_UID, "SWI minIP")):
        assert f"{uid} ('{description}', 12 slices of 64x64)" in message
    assert read_volume(two_series, "sub-01", series=MIP_UID).shape == SHAPE
    with pytest.raises(CaseError, match=r"sub-01: DICOM series 1\.2\.3 is not in .*holds: .*SWI magnitude"):
        read_volume(two_series, "sub-01", series="1.2.3")


def test_detect_refuses_two_series_and_series_picks_one(tmp_path, two_series, models):
    detector, _ = models
    common = ["--model", detector, "--single-stage", "-q"]
    assert detect_main([str(two_series), "-o", str(tmp_path / "out"), *common]) == 1
    error = batch_rows(tmp_path / "out")["sub-01"]["error"]
    assert SWI_UID in error and MIP_UID in error and "SWI minIP" in error
    assert not (tmp_path / "out" / "sub-01_summary.json").exists()  # nothing partial

    assert detect_main([str(two_series), "-o", str(tmp_path / "out"), "--series", SWI_UID, *common]) == 0
    summary = json.loads((tmp_path / "out" / "sub-01_summary.json").read_text())
    assert summary["n_lesions"] == len(SPHERES) and summary["dicom_source"]["series_instance_uid"] == SWI_UID
    # Another series is another input: the case is redone, not skipped.
    assert detect_main([str(two_series), "-o", str(tmp_path / "out"), "--series", MIP_UID, *common]) == 0
    assert batch_rows(tmp_path / "out")["sub-01"]["status"] == "done"
    summary = json.loads((tmp_path / "out" / "sub-01_summary.json").read_text())
    assert summary["n_lesions"] == 0 and summary["dicom_source"]["series_instance_uid"] == MIP_UID


def test_a_case_list_chooses_the_series_per_case(tmp_path, two_series, one_series, models):
    detector, _ = models
    nifti = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk.ReadImage([str(p) for p in sorted(one_series.iterdir())]), str(nifti))
    with open(tmp_path / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["case", "image", "series"], ["a", str(two_series), SWI_UID], ["b", str(two_series), ""],
                     ["c", str(one_series), ""], ["d", str(nifti), SWI_UID]])  # fmt: skip
    assert detect_main([str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out"), "--model", detector, "--single-stage", "-q"]) == 1
    rows = batch_rows(tmp_path / "out")
    assert rows["a"]["status"] == "done" and rows["a"]["n_lesions"] == str(len(SPHERES))
    assert rows["b"]["status"] == "failed" and "2 DICOM series" in rows["b"]["error"]
    assert rows["c"]["status"] == "done"  # one series: nothing to choose
    assert rows["d"]["status"] == "failed" and "not a DICOM folder" in rows["d"]["error"]


def test_series_for_several_cases_is_refused_before_any_case(tmp_path, two_series, one_series, models):
    detector, _ = models
    code = detect_main([str(two_series), str(one_series), "-o", str(tmp_path / "out"), "--model", detector, "--series", SWI_UID, "-q"])
    assert code == 2 and not (tmp_path / "out" / "cmbdetect_batch.csv").exists()


# --- DICOM out: SEG and SR, read back by dciodvfy, dcmqi and pydicom ----------------------------


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed; .ci/run installs it")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def content_items(dataset, path=()):
    """Every SR content item, depth first, with the concept names of the containers above it."""
    for item in dataset.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
        yield path, name, item
        yield from content_items(item, (*path, name))


def measurement_groups(report) -> list[dict[str, object]]:
    """Each TID 1501/1411 group of the report: its tracking identifier, numbers and coded values."""
    groups = []
    for _, name, item in content_items(report):
        if item.ValueType == "CONTAINER" and name == "125007":  # Measurement Group
            values: dict[str, object] = {}
            for _, inner, child in content_items(item):
                if child.ValueType == "NUM":
                    values[inner] = float(child.MeasuredValueSequence[0].NumericValue)
                elif child.ValueType == "TEXT" and inner == "112039":  # Tracking Identifier
                    values["tracking_id"] = child.TextValue
                elif child.ValueType == "CODE":
                    values[inner] = child.ConceptCodeSequence[0].CodeValue
                elif child.ValueType == "UIDREF" and inner == "112040":  # Tracking Unique Identifier
                    values["tracking_uid"] = child.UID
            groups.append(values)
    return groups


def test_seg_and_sr_of_a_gdcm_oblique_series_pass_dciodvfy_and_read_back(tmp_path, one_series, models):
    import pydicom

    detector, keep_all = models
    out, dicom_dir = tmp_path / "out", tmp_path / "dicom-out"
    code = detect_main([str(one_series), "-o", str(out), "--dicom-out", str(dicom_dir),
                        "--model", detector, "--candidate-model", keep_all, "-q"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "sub-02_summary.json").read_text())
    seg_path, sr_path = dicom_dir / "sub-02_seg.dcm", dicom_dir / "sub-02_sr.dcm"
    assert {Path(summary["files"][k]).resolve() for k in ("dicom_seg", "dicom_sr")} == {seg_path.resolve(), sr_path.resolve()}
    rows = list(csv.DictReader(open(out / "sub-02_lesions.csv")))
    assert len(rows) == len(SPHERES) and all(r["certainty"] == "definite" for r in rows)
    assert not any(p.name.startswith(".") for p in dicom_dir.iterdir())  # no staging left behind

    for path in (seg_path, sr_path):
        assert dciodvfy_errors(path) == [], path.name

    # The SEG: the source series, its frame of reference, and our codes.
    source = pydicom.dcmread(sorted(one_series.iterdir())[0], stop_before_pixels=True)
    seg = pydicom.dcmread(seg_path)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == SWI_UID
    for segment, row in zip(seg.SegmentSequence, rows):
        assert segment.SegmentLabel == segment.TrackingID == f"CMB {row['id']}"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == HEMORRHAGE
        assert segment.AnatomicRegionSequence[0].CodeValue == BRAIN

    # dcmqi, Slicer's own SEG converter: each segment on the same voxels as the lesion map.
    from dcmqi import _lookup

    qi = tmp_path / "dcmqi"
    qi.mkdir()
    subprocess.run([str(_lookup("segimage2itkimage")), "--inputDICOM", str(seg_path), "--outputDirectory", str(qi),
                    "--prefix", "seg", "--outputType", "nifti"], check=True, capture_output=True)  # fmt: skip
    meta = json.loads((qi / "seg-meta.json").read_text())
    lesion_map = read_volume(out / "sub-02_lesions.nii.gz")
    inverse = np.linalg.inv(lesion_map.geometry.ijk_to_lps())
    seen = set()
    for number, segments in enumerate(meta["segmentAttributes"], start=1):
        assert len(segments) == 1  # one lesion per file
        lesion_id = int(segments[0]["SegmentLabel"].removeprefix("CMB "))
        image = sitk.ReadImage(str(qi / f"seg-{number}.nii.gz"))
        voxels = np.argwhere(sitk.GetArrayFromImage(image) > 0)[:, ::-1]  # (i, j, k)
        lps = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in ijk]) for ijk in voxels])
        ijk = np.rint(lps @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        assert np.abs(lps @ inverse[:3, :3].T + inverse[:3, 3] - ijk).max() < 1e-3  # on the grid, not near it
        got = {tuple(v) for v in ijk[:, ::-1]}  # (k, j, i)
        want = {tuple(v) for v in np.argwhere(lesion_map.array == lesion_id)}
        assert got == want, f"CMB {lesion_id}: dcmqi's voxels differ from the lesion map's"
        seen.add(lesion_id)
    assert seen == {int(r["id"]) for r in rows}

    # pydicom: the SR's measurements are the lesion table's and the summary's.
    report = pydicom.dcmread(sr_path)
    assert report.CurrentRequestedProcedureEvidenceSequence  # references the SEG and the source
    groups = measurement_groups(report)
    lesions = {g["tracking_id"]: g for g in groups if str(g.get("tracking_id", "")).startswith("CMB ")}
    assert set(lesions) == {f"CMB {r['id']}" for r in rows}
    by_uid = {s.TrackingUID: s.SegmentLabel for s in seg.SegmentSequence}
    for row in rows:
        group = lesions[f"CMB {row['id']}"]
        assert by_uid[group["tracking_uid"]] == f"CMB {row['id']}"  # the same lesion in both objects
        assert abs(group[DIAMETER] - float(row["diameter_mm"])) < 1e-3
        assert abs(group[VOLUME] - float(row["volume_mm3"])) < 1e-3
        assert abs(group["CMB-PMICROBLEED"] - float(row["p_microbleed"])) < 1e-3
        assert group["111012"] == f"CMB-{row['certainty'].upper()}" and group["CMB-SIZECLASS"] == f"CMB-{row['size_class'].upper()}"
        # Its MARS location, as the lesion CSV has it (this phantom is no head: unknown, and no side).
        assert group["CMB-MARSREGION"] == export_codes.MARS_REGION_VALUES[row["mars_region"]].value
        assert group["CMB-MARSSTRUCT"] == export_codes.MARS_STRUCTURE_VALUES[row["mars_structure"]].value
        assert group.get(LATERALITY) == {"left": "7771000", "right": "24028007"}.get(row["side"])
    counts = next(g for g in groups if g.get("tracking_id") == "Microbleed counts")
    for key in ("n_lobar", "n_deep", "n_infratentorial", "n_region_unknown"):
        assert counts[export_codes.REGION_COUNTS[key].value] == summary["regions"][key]
    assert counts[N_LESIONS] == summary["n_lesions"] == len(rows)
    assert (counts["CMB-NSMALL"], counts["CMB-NLARGE"]) == (summary["n_small"], summary["n_large"])
    assert counts["CMB-NDEFINITE"] == len(rows) and counts["CMB-NPOSSIBLE"] == 0


def test_every_atlas_location_has_an_sr_code():
    from CMBDetectLib.anatomy.atlas import load_atlas

    for where in load_atlas().table.values():
        assert where.mars_region in export_codes.MARS_REGION_VALUES and where.mars_structure in export_codes.MARS_STRUCTURE_VALUES
    every = [*export_codes.MARS_REGION_VALUES.values(), *export_codes.MARS_STRUCTURE_VALUES.values(), *export_codes.REGION_COUNTS.values()]
    assert all(len(c.value) <= 16 for c in every) and len({c.value for c in every}) == len(every)  # SH, and no code twice


def test_no_lesion_means_a_report_with_zero_counts_and_no_seg(tmp_path, two_series, models):
    import pydicom

    detector, _ = models
    out, dicom_dir = tmp_path / "out", tmp_path / "dcm"
    assert detect_main([str(two_series), "-o", str(out), "--dicom-out", str(dicom_dir), "--series", MIP_UID,
                        "--model", detector, "--single-stage", "-q"]) == 0  # fmt: skip
    assert sorted(p.name for p in dicom_dir.iterdir()) == ["sub-01_sr.dcm"]
    assert dciodvfy_errors(dicom_dir / "sub-01_sr.dcm") == []
    (counts,) = measurement_groups(pydicom.dcmread(dicom_dir / "sub-01_sr.dcm"))
    assert counts[N_LESIONS] == counts["CMB-NSMALL"] == counts["CMB-NLARGE"] == 0
    assert "CMB-NDEFINITE" not in counts  # single stage: no certainty to count


def test_a_rerun_that_adds_dicom_out_writes_the_objects(tmp_path, one_series, models):
    detector, _ = models
    out = tmp_path / "out"
    common = [str(one_series), "-o", str(out), "--model", detector, "--single-stage", "-q"]
    assert detect_main(common) == 0 and batch_rows(out)["sub-02"]["status"] == "done"
    assert detect_main([*common, "--dicom-out", str(tmp_path / "a")]) == 0
    assert batch_rows(out)["sub-02"]["status"] == "done"  # not skipped: the DICOM objects were missing
    files = json.loads((out / "sub-02_summary.json").read_text())["files"]
    assert (tmp_path / "a" / "sub-02_seg.dcm").is_file() and (tmp_path / "a" / "sub-02_sr.dcm").is_file()
    assert Path(files["dicom_sr"]).resolve() == (tmp_path / "a" / "sub-02_sr.dcm").resolve()
    assert detect_main([*common, "--dicom-out", str(tmp_path / "a")]) == 0 and batch_rows(out)["sub-02"]["status"] == "skipped"
    assert detect_main(common) == 0 and batch_rows(out)["sub-02"]["status"] == "skipped"  # asking for less is done
    # Another folder is another request; a DICOM folder inside the output folder is listed relative to it.
    assert detect_main([*common, "--dicom-out", str(out / "dicom")]) == 0 and batch_rows(out)["sub-02"]["status"] == "done"
    assert json.loads((out / "sub-02_summary.json").read_text())["files"]["dicom_sr"] == "dicom/sub-02_sr.dcm"
    # A redo clears the objects the earlier run listed, wherever they were.
    assert not (tmp_path / "a" / "sub-02_sr.dcm").exists()


def test_dicom_out_skips_cases_that_are_not_dicom_with_a_warning(tmp_path, one_series, models, capsys):
    detector, _ = models
    nifti = tmp_path / "in" / "vol.nii.gz"
    nifti.parent.mkdir()
    sitk.WriteImage(sitk.ReadImage([str(p) for p in sorted(one_series.iterdir())]), str(nifti))
    assert detect_main([str(nifti), "-o", str(tmp_path / "out"), "--dicom-out", str(tmp_path / "dcm"),
                        "--model", detector, "--single-stage", "-q"]) == 0  # fmt: skip
    assert "vol" in capsys.readouterr().err and list((tmp_path / "dcm").iterdir()) == []
    assert detect_main([str(nifti), "-o", str(tmp_path / "out"), "--dicom-out", str(tmp_path / "dcm"),
                        "--model", detector, "--single-stage", "-q"]) == 0  # fmt: skip
    assert batch_rows(tmp_path / "out")["vol"]["status"] == "skipped"
