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


def reference_extract(probability, geometry, threshold=0.4, min_mm=2.0, max_mm=10.0):
    """The whole-volume path this module used before its find_objects rewrite: the yardstick."""
    from scipy import ndimage

    from CMBDetectLib.detection.lesions import structure

    components, n = ndimage.label(probability >= threshold, structure=structure())
    if n == 0:
        return np.zeros(probability.shape, np.uint16), []
    index = np.arange(1, n + 1)
    counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
    diameters = equivalent_diameter_mm(counts, geometry.spacing)
    kept = index[(diameters >= min_mm) & (diameters <= max_mm)]
    lut = np.zeros(n + 1, np.uint16)
    lut[kept] = np.arange(1, kept.size + 1, dtype=np.uint16)
    labels = lut[components]
    if kept.size == 0:
        return labels, []
    new_index = np.arange(1, kept.size + 1)
    centroids = np.atleast_2d(np.array(ndimage.center_of_mass(labels > 0, labels, new_index)))[:, ::-1]
    means = ndimage.mean(probability, labels, new_index)
    maxima = ndimage.maximum(probability, labels, new_index)
    rows = [(int(counts[o - 1]), float(diameters[o - 1]), tuple(centroids[r]), means[r], maxima[r]) for r, o in enumerate(kept)]
    return labels, rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesions_identical_to_the_whole_volume_path(seed):
    """Blobs of every size, touching the borders, on an oblique anisotropic grid: same labels, same figures."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (24, 70, 64)
    noise = ndimage.gaussian_filter(rng.random(shape), (0.8, 1.5, 1.5))
    prob = ((noise - noise.min()) / np.ptp(noise)).astype(np.float32)
    prob[0, :5, :5] = 0.9  # a component on the volume's corner
    geometry = oblique_geometry((0.5, 0.7, 1.8))
    threshold = float(np.quantile(prob, 0.9))
    labels, lesions = extract_lesions(prob, geometry, threshold)
    ref_labels, ref = reference_extract(prob, geometry, threshold)
    assert len(ref) > 3  # the case has lesions to compare
    np.testing.assert_array_equal(labels, ref_labels)
    assert [l.n_voxels for l in lesions] == [r[0] for r in ref]
    for lesion, (n, d, centroid, mean, maximum) in zip(lesions, ref):
        assert lesion.diameter_mm == pytest.approx(d, abs=1e-12)
        np.testing.assert_allclose(lesion.centroid_ijk, centroid, atol=1e-9)
        assert lesion.mean_probability == pytest.approx(mean, abs=1e-6)
        assert lesion.max_probability == maximum
