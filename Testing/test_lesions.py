"""Lesion extraction: components, sizes in mm on anisotropic grids, classes, centroids."""

from __future__ import annotations

import numpy as np
import pytest

from CMBDetectLib.io import Geometry
from CMBDetectLib.detection.lesions import equivalent_diameter_mm, extract_lesions, label_components, size_class
from handmade import oblique_geometry


def ball(shape, centre_kji, diameter_mm, spacing):
    k, j, i = np.indices(shape)
    sx, sy, sz = spacing
    ck, cj, ci = centre_kji
    return ((k - ck) * sz) ** 2 + ((j - cj) * sy) ** 2 + ((i - ci) * sx) ** 2 <= (diameter_mm / 2) ** 2


def test_equivalent_diameter_of_known_volumes():
    # 4/3 pi r^3 with r = 3 mm is 113.1 mm3: 113.1 voxels of 1 mm3, or 14.14 of 2 x 2 x 2 mm
    assert equivalent_diameter_mm(113.097, (1, 1, 1)) == pytest.approx(6.0, rel=1e-4)
    assert equivalent_diameter_mm(113.097 / 8, (2, 2, 2)) == pytest.approx(6.0, rel=1e-4)
    assert equivalent_diameter_mm(113.097 / 0.5, (0.5, 0.5, 2.0)) == pytest.approx(6.0, rel=1e-4)


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (0.45, 0.6, 2.0), (1.0, 1.0, 3.0)])
@pytest.mark.parametrize("diameter", [3.0, 6.0, 9.0])
def test_sizes_are_measured_in_mm_on_anisotropic_grids(spacing, diameter):
    shape = (20, 60, 60)
    prob = ball(shape, (10, 30, 30), diameter, spacing).astype(np.float32)
    g = Geometry(spacing, (0.0, 0.0, 0.0))
    _, lesions = extract_lesions(prob, g, min_diameter_mm=0, max_diameter_mm=100)
    assert len(lesions) == 1
    # voxelising a 3 mm ball in 3 mm slices is coarse; finer grids are close
    tolerance = 0.35 if diameter / spacing[2] < 2 else 0.12
    assert lesions[0].diameter_mm == pytest.approx(diameter, rel=tolerance)
    assert lesions[0].volume_mm3 == pytest.approx(lesions[0].n_voxels * np.prod(spacing))


def test_size_filter_and_classes():
    spacing = (0.5, 0.5, 0.5)
    shape = (40, 70, 70)
    prob = np.zeros(shape, np.float32)
    prob[ball(shape, (10, 15, 15), 1.2, spacing)] = 0.9  # too small
    prob[ball(shape, (10, 50, 50), 3.0, spacing)] = 0.9  # small
    prob[ball(shape, (25, 20, 45), 7.0, spacing)] = 0.9  # large
    prob[28:38, 45:69, 2:26] = 0.9  # a 12 mm block: too large
    labels, lesions = extract_lesions(prob, Geometry(spacing, (0, 0, 0)))
    assert [l.size_class for l in lesions] == ["small", "large"]
    assert labels.dtype == np.uint16 and set(np.unique(labels)) == {0, 1, 2}
    assert all(2 <= l.diameter_mm <= 10 for l in lesions)
    assert size_class(4.99) == "small" and size_class(5.0) == "large"


def test_threshold_is_inclusive_and_probabilities_reported():
    prob = np.zeros((10, 30, 30), np.float32)
    prob[4:7, 10:16, 10:16] = 0.4
    prob[5, 12, 12] = 0.95
    _, lesions = extract_lesions(prob, Geometry((1, 1, 1), (0, 0, 0)), threshold=0.4)
    assert len(lesions) == 1
    assert lesions[0].max_probability == pytest.approx(0.95)
    assert lesions[0].mean_probability == pytest.approx((107 * 0.4 + 0.95) / 108, rel=1e-5)
    # above 0.4 only the single 0.95 voxel is left: 1.24 mm, under the 2 mm minimum
    _, none = extract_lesions(prob, Geometry((1, 1, 1), (0, 0, 0)), threshold=0.41)
    assert none == []


def test_diagonal_neighbours_join_in_26_connectivity():
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True
    assert label_components(mask, 26)[1] == 1
    assert label_components(mask, 6)[1] == 2


def test_centroids_in_voxel_and_patient_space():
    g = oblique_geometry()
    shape = (12, 80, 90)
    prob = ball(shape, (6, 40, 30), 5.0, g.spacing).astype(np.float32)
    _, lesions = extract_lesions(prob, g)
    (lesion,) = lesions
    np.testing.assert_allclose(lesion.centroid_ijk, (30, 40, 6), atol=1e-6)
    lps = g.index_to_lps(np.array([30, 40, 6]))
    np.testing.assert_allclose(lesion.centroid_lps, lps, atol=1e-6)
    np.testing.assert_allclose(lesion.centroid_ras, lps * [-1, -1, 1], atol=1e-6)


def test_bad_parameters():
    g = Geometry((1, 1, 1), (0, 0, 0))
    with pytest.raises(ValueError, match="threshold"):
        extract_lesions(np.zeros((3, 3, 3)), g, threshold=1.0)
    with pytest.raises(ValueError, match="range"):
        extract_lesions(np.zeros((3, 3, 3)), g, min_diameter_mm=5, max_diameter_mm=2)
    with pytest.raises(ValueError, match="3D"):
        extract_lesions(np.zeros((3, 3)), g)
