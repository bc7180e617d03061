"""`cmbdetect detect` end to end: real files in, real files out, on the input's grid."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from CMBDetectLib.commands.detect import main as detect_main
from CMBDetectLib.io import Geometry, read_volume, write_volume
from CMBDetectLib.detection.outputs import output_paths
from handmade import phantom, save_dark_spot_model


@pytest.fixture(scope="module")
def dark_spot_model(tmp_path_factory) -> str:
    return str(save_dark_spot_model(tmp_path_factory.mktemp("model") / "dark-spot.safetensors"))


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory, dark_spot_model):
    """An oblique, anisotropic phantom with a 4 mm and a 7 mm bleed, detected once."""
    root = tmp_path_factory.mktemp("oblique")
    array, geometry, spheres = phantom()
    write_volume(array, geometry, root / "in" / "obl.nii.gz")
    code = detect_main([str(root / "in"), "-o", str(root / "out"), "--model", dark_spot_model, "-q"])
    return root, geometry, spheres, code


def test_outputs_lie_on_the_input_grid(oblique_case):
    root, geometry, spheres, code = oblique_case
    assert code == 0
    paths = output_paths(root / "out", "obl")
    assert all(p.is_file() for p in paths.values())
    for key in ("labels", "probability"):
        v = read_volume(paths[key])
        assert v.shape == (12, 200, 240)
        assert v.geometry.matches(geometry)
    header = nrrd.read_header(str(paths["segmentation"]))
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space origin"], geometry.origin, atol=1e-6)
    np.testing.assert_allclose(np.asarray(header["space directions"]).T, geometry.ijk_to_lps()[:3, :3], atol=1e-6)


def test_lesion_csv_gives_sizes_in_mm_and_positions(oblique_case):
    root, geometry, spheres, _ = oblique_case
    rows = list(csv.DictReader(open(output_paths(root / "out", "obl")["lesions_csv"])))
    assert len(rows) == 2
    by_class = {r["size_class"]: r for r in rows}
    # the 4 mm and 7 mm spheres, sized in mm on a 0.45 x 0.6 x 2 mm grid (thick slices shave a little)
    assert 3.0 < float(by_class["small"]["diameter_mm"]) < 4.6
    assert 5.5 < float(by_class["large"]["diameter_mm"]) < 7.6
    centres = {round(d): c for c, d in spheres}
    for row in rows:
        (ck, cj, ci) = centres[4] if row["size_class"] == "small" else centres[7]
        ijk = [float(row[f"centroid_{a}"]) for a in "ijk"]
        np.testing.assert_allclose(ijk, (ci, cj, ck), atol=1.0)
        ras = [float(row[f"centroid_{a}"]) for a in "ras"]
        np.testing.assert_allclose(ras, geometry.index_to_ras(np.array(ijk)), atol=1e-2)
    summary = json.loads(output_paths(root / "out", "obl")["summary"].read_text())
    assert (summary["n_lesions"], summary["n_small"], summary["n_large"]) == (2, 1, 1)
    assert summary["model_id"] == "test-dark-spot"


def test_seg_nrrd_loads_in_slicer_core_with_same_geometry(oblique_case):
    slicer = pytest.importorskip("slicer")
    root, geometry, _, _ = oblique_case
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(output_paths(root / "out", "obl")["segmentation"]))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    names = {segmentation.GetNthSegment(i).GetName() for i in range(2)}
    assert names == {"CMB 1", "CMB 2"}
    labelmap = segmentation.GetNthSegment(0).GetRepresentation("Binary labelmap")
    import vtk

    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    image_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(image_to_ras, geometry.ijk_to_ras(), atol=1e-6)


def test_untrained_default_model_runs_and_says_so(tmp_path, capsys):
    from CMBDetectLib.models import load_model

    registry_default_untrained = not load_model().trained
    array, geometry, _ = phantom(shape=(4, 120, 140))
    write_volume(array, geometry, tmp_path / "a.nrrd")
    assert detect_main([str(tmp_path / "a.nrrd"), "-o", str(tmp_path / "out"), "-q"]) == 0
    err = capsys.readouterr().err
    assert ("UNTRAINED" in err) == registry_default_untrained
    assert read_volume(tmp_path / "out" / "a_prob.nii.gz").geometry.matches(geometry)


def test_bad_cases_are_reported_and_the_batch_goes_on(tmp_path, dark_spot_model, capsys):
    cases = tmp_path / "in"
    g = Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0))
    good, _, _ = phantom(shape=(6, 120, 140), geometry=g)
    write_volume(good, g, cases / "good.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(good[0]), str(cases / "flat.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(good)] * 2), str(cases / "fourd.nii.gz"))
    nan = good.copy()
    nan[2, 50, 50] = np.nan
    write_volume(nan, g, cases / "nan.nrrd")
    write_volume(np.full_like(good, 3.0), g, cases / "constant.nii.gz")
    write_volume(np.zeros_like(good), g, cases / "blank.nii.gz")  # an empty (all-zero) volume
    (cases / "junk.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    code = detect_main([str(cases), str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "out"), "--model", dark_spot_model, "-q"])
    assert code == 1
    out = tmp_path / "out"
    assert all(p.is_file() for p in output_paths(out, "good").values())
    for bad in ("flat", "fourd", "nan", "constant", "blank", "junk", "missing"):
        assert not any(out.glob(f"{bad}*")), f"{bad} left files behind"
    assert not any(p.name.startswith(".") for p in out.iterdir()), "staging folders left behind"
    table = {r["case"]: r for r in csv.DictReader(open(out / "cmbdetect_batch.csv"))}
    assert table["good"]["ok"] == "True"
    expected = {
        "flat": "image is 2D", "fourd": "image is 4D", "nan": "NaN", "constant": "constant", "blank": "constant",
        "junk": "cannot read", "missing": "file not found",
    }  # fmt: skip
    for case, problem in expected.items():
        assert table[case]["ok"] == "False" and table[case]["error"].startswith(f"{case}: ") and problem in table[case]["error"]
    err = capsys.readouterr().err
    assert "failed: flat: image is 2D" in err


def test_a_case_that_fails_while_writing_leaves_nothing(tmp_path, dark_spot_model):
    g = Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0))
    array, _, _ = phantom(shape=(6, 120, 140), geometry=g)
    write_volume(array, g, tmp_path / "c.nii.gz")
    out = tmp_path / "out"
    (out / "c_summary.json").mkdir(parents=True)  # the last file cannot be put in place
    assert detect_main([str(tmp_path / "c.nii.gz"), "-o", str(out), "--model", dark_spot_model, "-q"]) == 1
    left = sorted(p.name for p in out.iterdir())
    assert left == ["c_summary.json", "cmbdetect_batch.csv"]  # only what was there, and the batch table


def test_case_list_csv_with_relative_paths(tmp_path, dark_spot_model):
    g = Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0))
    array, _, _ = phantom(shape=(5, 100, 100), geometry=g)
    write_volume(array, g, tmp_path / "data" / "x1.nii.gz")
    (tmp_path / "cases.csv").write_text("case,image\nsubject-1,data/x1.nii.gz\n")
    assert detect_main([str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out"), "--model", dark_spot_model, "-q"]) == 0
    assert (tmp_path / "out" / "subject-1.seg.nrrd").is_file()


def test_bad_options_are_refused(tmp_path):
    assert detect_main(["x.nii.gz", "-o", str(tmp_path), "--threshold", "1.5"]) == 2
    assert detect_main(["x.nii.gz", "-o", str(tmp_path), "--min-size", "5", "--max-size", "2"]) == 2
    assert detect_main(["x.nii.gz", "-o", str(tmp_path), "--model", "no-such-model"]) == 2


def _colour_pixels(png: Path, rgb: tuple[float, float, float]) -> int:
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[..., :3]
    return int((np.abs(pixels - np.asarray(rgb)).max(axis=-1) < 0.08).sum())


def test_preview_outlines_each_detection_in_its_class_colour(tmp_path, dark_spot_model):
    from CMBDetectLib.detection.lesions import CLASS_COLORS

    array, geometry, _ = phantom()
    write_volume(array, geometry, tmp_path / "in" / "obl.nii.gz")
    write_volume(phantom(spheres_mm=[])[0], geometry, tmp_path / "in" / "clean.nii.gz")
    assert detect_main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", dark_spot_model, "--preview", "-q"]) == 0
    paths = output_paths(tmp_path / "out", "obl", preview=True)
    assert json.loads(paths["summary"].read_text())["files"]["preview"] == "obl_preview.png"
    for colour in CLASS_COLORS.values():  # one small and one large bleed, each outlined
        assert _colour_pixels(paths["preview"], colour) > 20
    clean = output_paths(tmp_path / "out", "clean", preview=True)["preview"]
    assert clean.is_file(), "a case without detections still gets its picture"
    assert all(_colour_pixels(clean, c) == 0 for c in CLASS_COLORS.values())


def test_no_preview_unless_asked(oblique_case):
    root, _, _, _ = oblique_case
    assert not (root / "out" / "obl_preview.png").exists()


# --- refused as a whole, before any case runs (issue 18, items 7 and 13) ----------------------


def _two_cases(folder: Path) -> None:
    g = Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0))
    for seed, case in enumerate(("a", "b")):
        array, _, _ = phantom(shape=(4, 100, 100), geometry=g, seed=seed)
        write_volume(array, g, folder / f"{case}.nii.gz")


def test_one_phase_file_for_several_cases_is_refused(tmp_path, dark_spot_model, capsys):
    _two_cases(tmp_path / "in")
    g = Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0))
    write_volume(np.zeros((4, 100, 100), np.float32), g, tmp_path / "phase.nii.gz")
    out = tmp_path / "out"
    code = detect_main([str(tmp_path / "in"), "-o", str(out), "--model", dark_spot_model, "--phase", str(tmp_path / "phase.nii.gz"), "-q"])
    captured = capsys.readouterr()
    assert code == 2
    error = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "phase.nii.gz" in error[0] and "2 cases" in error[0] and "folder" in error[0]
    assert captured.out == "" and not out.exists()  # no case ran, nothing was written
    # One case, one phase file: as before.
    one = [str(tmp_path / "in" / "a.nii.gz"), "-o", str(out), "--model", dark_spot_model, "--phase", str(tmp_path / "phase.nii.gz"), "-q"]
    assert detect_main(one) == 0 and output_paths(out, "a")["summary"].is_file()


def test_an_uncreatable_output_folder_is_refused_before_any_case(tmp_path, dark_spot_model, capsys):
    _two_cases(tmp_path / "in")
    (tmp_path / "file").write_text("a regular file")
    for out in (tmp_path / "file" / "out", tmp_path / "file"):  # under a file; a file itself
        code = detect_main([str(tmp_path / "in"), "-o", str(out), "--model", dark_spot_model, "-q"])
        captured = capsys.readouterr()
        assert code == 2, captured.err
        error = [line for line in captured.err.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and str(out) in error[0] and "Traceback" not in captured.err
        assert captured.out == ""  # no case ran
    assert (tmp_path / "file").read_text() == "a regular file"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into a read-only folder: chmod cannot stop it")
def test_a_read_only_output_folder_is_refused_before_any_case(tmp_path, dark_spot_model, capsys):
    _two_cases(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        code = detect_main([str(tmp_path / "in"), "-o", str(out), "--model", dark_spot_model, "-q"])
    finally:
        out.chmod(0o755)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and "error: " in captured.err and str(out) in captured.err
    assert list(out.iterdir()) == []
