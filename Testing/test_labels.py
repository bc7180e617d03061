"""Ground-truth labels read onto their image's grid: label maps, .seg.nrrd, sub-boxes, mismatches."""

from __future__ import annotations

import numpy as np
import pytest

from CMBDetectLib.errors import CaseError
from CMBDetectLib.io import Geometry, Volume, write_volume
from CMBDetectLib.labels import read_label
from CMBDetectLib.detection.lesions import extract_lesions
from CMBDetectLib.detection.outputs import write_segmentation_nrrd
from handmade import oblique_geometry


def image(shape=(8, 40, 50)) -> Volume:
    return Volume(np.zeros(shape, np.float32), oblique_geometry())


def test_label_map_on_the_same_grid(tmp_path):
    v = image()
    labels = np.zeros(v.shape, np.uint16)
    labels[3, 10:14, 20:25] = 2
    write_volume(labels, v.geometry, tmp_path / "l.nii.gz")
    np.testing.assert_array_equal(read_label(tmp_path / "l.nii.gz", "c", v), labels)


def test_seg_nrrd_written_by_detect_reads_back_as_labels(tmp_path):
    v = image()
    prob = np.zeros(v.shape, np.float32)
    prob[2:5, 10:20, 10:20] = 0.9
    prob[5:8, 25:35, 30:40] = 0.9
    labels, lesions = extract_lesions(prob, v.geometry, min_diameter_mm=0, max_diameter_mm=100)
    write_segmentation_nrrd(tmp_path / "c.seg.nrrd", labels, lesions, v.geometry)
    np.testing.assert_array_equal(read_label(tmp_path / "c.seg.nrrd", "c", v), labels)


def test_sub_box_label_is_pasted_exactly(tmp_path):
    v = image()
    full = np.zeros(v.shape, np.uint16)
    full[2:5, 10:16, 20:30] = 1
    # the same lesion stored on a box starting at voxel (i, j, k) = (20, 10, 2), as Slicer crops segmentations
    box = full[2:5, 10:16, 20:30]
    origin = v.geometry.index_to_lps(np.array([20, 10, 2]))
    write_volume(box, Geometry(v.geometry.spacing, tuple(origin), v.geometry.direction), tmp_path / "box.nrrd")
    np.testing.assert_array_equal(read_label(tmp_path / "box.nrrd", "c", v), full)


def test_label_on_another_grid_is_refused(tmp_path):
    v = image()
    g = v.geometry
    write_volume(np.zeros(v.shape, np.uint16), Geometry((0.5, 0.5, 0.5), g.origin, g.direction), tmp_path / "a.nii.gz")
    with pytest.raises(CaseError, match="^c: label a.nii.gz is on another grid"):
        read_label(tmp_path / "a.nii.gz", "c", v)
    shifted = tuple(np.add(g.origin, (0.1, 0.0, 0.0)))
    write_volume(np.zeros(v.shape, np.uint16), Geometry(g.spacing, shifted, g.direction), tmp_path / "b.nii.gz")
    with pytest.raises(CaseError, match="another grid"):
        read_label(tmp_path / "b.nii.gz", "c", v)
    with pytest.raises(CaseError, match="label file not found"):
        read_label(tmp_path / "none.nii.gz", "c", v)
