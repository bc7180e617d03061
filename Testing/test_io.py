"""Volume IO keeps geometry exactly, and bad files give errors that name the case."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from CMBDetectLib.errors import CaseError
from CMBDetectLib.io import Geometry, case_name, check_size, read_volume, write_volume
from handmade import oblique_geometry, write_dicom_series


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_oblique_anisotropic_geometry(tmp_path, suffix):
    g = oblique_geometry()
    a = np.random.default_rng(1).random((5, 7, 9), dtype=np.float32)
    write_volume(a, g, tmp_path / f"case{suffix}")
    v = read_volume(tmp_path / f"case{suffix}")
    np.testing.assert_array_equal(v.array, a)
    np.testing.assert_allclose(v.geometry.spacing, g.spacing, atol=1e-6)
    np.testing.assert_allclose(v.geometry.origin, g.origin, atol=1e-5)
    np.testing.assert_allclose(v.geometry.direction, g.direction, atol=1e-6)


def test_ijk_to_ras_matches_sitk_physical_points():
    g = oblique_geometry()
    image = sitk.Image(4, 5, 6, sitk.sitkFloat32)
    image.SetSpacing(g.spacing), image.SetOrigin(g.origin), image.SetDirection(g.direction)
    for ijk in [(0, 0, 0), (3, 1, 5), (2, 4, 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(g.index_to_lps(np.array(ijk)), lps, atol=1e-9)
        np.testing.assert_allclose(g.index_to_ras(np.array(ijk)), lps * [-1, -1, 1], atol=1e-9)
        np.testing.assert_allclose((g.ijk_to_ras() @ [*ijk, 1])[:3], lps * [-1, -1, 1], atol=1e-9)


def test_dicom_series_folder(tmp_path):
    g = oblique_geometry(spacing=(0.5, 0.5, 1.5))
    a = (np.random.default_rng(2).random((6, 20, 24)) * 1000).astype(np.int16)
    folder = tmp_path / "dicom"
    write_dicom_series(folder, a, g, "1.2.826.0.1.3680043.2.1125.1.1", study_uid="1.2.826.0.1.3680043.2.1125.1")
    v = read_volume(folder)
    assert v.shape == a.shape
    np.testing.assert_array_equal(v.array, a.astype(np.float32))
    np.testing.assert_allclose(v.geometry.spacing, g.spacing, atol=1e-4)
    np.testing.assert_allclose(v.geometry.origin, g.origin, atol=1e-4)
    np.testing.assert_allclose(v.geometry.direction, g.direction, atol=1e-5)


def test_missing_file_names_the_case(tmp_path):
    with pytest.raises(CaseError, match=r"^gone: file not found"):
        read_volume(tmp_path / "gone.nii.gz")


def test_unreadable_file(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(b"this is not an image")
    with pytest.raises(CaseError, match=r"^junk: cannot read"):
        read_volume(tmp_path / "junk.nii.gz")


def test_2d_image_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 30), np.float32)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(CaseError, match=r"flat: image is 2D"):
        read_volume(tmp_path / "flat.nrrd")


def test_single_slice_3d_image_is_refused(tmp_path):
    write_volume(np.ones((1, 20, 30), np.float32), Geometry((1, 1, 1), (0, 0, 0)), tmp_path / "one.nii.gz")
    with pytest.raises(CaseError, match=r"one: image is 2D"):
        read_volume(tmp_path / "one.nii.gz")


def test_4d_image_is_refused(tmp_path):
    image = sitk.JoinSeries([sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32))] * 2)
    sitk.WriteImage(image, str(tmp_path / "series.nii.gz"))
    with pytest.raises(CaseError, match=r"series: image is 4D"):
        read_volume(tmp_path / "series.nii.gz")


def test_vector_image_is_refused(tmp_path):
    image = sitk.GetImageFromArray(np.ones((3, 4, 5, 3), np.float32), isVector=True)
    sitk.WriteImage(image, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(CaseError, match=r"rgb: image has 3 components"):
        read_volume(tmp_path / "rgb.nrrd")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_nan_voxels_are_refused(tmp_path, suffix):
    a = np.ones((4, 20, 20), np.float32)
    a[1, 2, 3] = np.nan
    write_volume(a, Geometry((1, 1, 1), (0, 0, 0)), tmp_path / f"nan{suffix}")
    with pytest.raises(CaseError, match=r"nan: volume has 1 NaN"):
        read_volume(tmp_path / f"nan{suffix}")


def test_volume_beyond_memory_is_refused_before_reading(tmp_path):
    # A detached header that declares a huge volume: refused from its header, data never read.
    (tmp_path / "huge.nhdr").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 4096 4096 4096\nencoding: raw\nendian: little\n"
        "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
        "space origin: (0,0,0)\ndata file: huge.raw\n"
    )
    (tmp_path / "huge.raw").write_bytes(b"")  # the reader opens it for the header, never reads it
    with pytest.raises(CaseError, match=r"huge: volume of 4096x4096x4096 voxels needs about .* GiB"):
        read_volume(tmp_path / "huge.nhdr")
    with pytest.raises(CaseError, match="more than the 1.0 GiB"):
        check_size((1024, 1024, 100), "big", available=2**30)


def test_case_name_strips_volume_suffixes(tmp_path):
    assert case_name(tmp_path / "sub-01_swi.nii.gz") == "sub-01_swi"
    assert case_name(tmp_path / "a.seg.nrrd") == "a.seg"
    assert case_name(tmp_path / "dicomdir") == "dicomdir"


def test_hidden_files_are_never_volumes(tmp_path):
    """A folder being written by `cmbdetect synth` holds ".tmp-..." files (atomic writes) until
    each is renamed; detect, evaluate and training must not take them for cases."""
    from CMBDetectLib.io import is_volume_file

    assert is_volume_file(tmp_path / "case.nii.gz")
    assert not is_volume_file(tmp_path / ".tmp-abc123-case.nii.gz")
    assert not is_volume_file(tmp_path / "._case.nrrd")
