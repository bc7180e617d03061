"""Add-missed by one click: the grown region is the dark blob, and never leaves the 10 mm sphere."""

from __future__ import annotations

import numpy as np
import pytest

from scipy.spatial.transform import Rotation

from CMBDetectLib.io import Geometry
from CMBReviewLib.regiongrow import grow_from_click, sphere_mask

# oblique and anisotropic, as Testing/handmade.py's grid (without importing torch for it)
GEOMETRY = Geometry((0.45, 0.6, 2.0), (31.5, -12.25, 7.0), tuple(Rotation.from_euler("xyz", (12.0, -8.0, 27.0), degrees=True).as_matrix().ravel()))
SHAPE = (14, 80, 90)


def physical_distance_mm(kji_a, kji_b) -> np.ndarray:
    m = GEOMETRY.ijk_to_lps()[:3, :3]
    d = (np.asarray(kji_a, float) - np.asarray(kji_b, float))[..., ::-1]  # to i, j, k
    return np.linalg.norm(d @ m.T, axis=-1)


def tissue(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(400, 15, SHAPE).astype(np.float32)


def test_grows_the_dark_sphere_it_was_clicked_on():
    image = tissue()
    centre = (7, 40, 45)
    truth = sphere_mask(SHAPE, GEOMETRY, centre, 2.5)  # a 5 mm microbleed
    image[truth] = 120.0
    click = (7, 41, 44)  # a little off centre, as a real click
    grown = grow_from_click(image, GEOMETRY, click)
    dice = 2 * np.sum(grown & truth) / (grown.sum() + truth.sum())
    assert dice > 0.95
    assert grown[click]


def test_never_leaves_the_10_mm_sphere_even_on_a_long_vein():
    image = tissue(1)
    image[:, 40, :] = 100.0  # a dark vein running across the whole slab
    image[:, 41, :] = 100.0
    click = (7, 40, 45)
    grown = grow_from_click(image, GEOMETRY, click)
    kji = np.argwhere(grown)
    assert len(kji) > 10
    assert physical_distance_mm(kji, click).max() <= 5.0 + 1e-6
    # ...and the bound is in millimetres: the vein reaches further in voxels along i than along k
    assert np.ptp(kji[:, 2]) > np.ptp(kji[:, 0])


def test_a_click_on_plain_tissue_or_outside_is_refused():
    image = tissue(2)
    image[7, 40, 45] = 800.0  # bright: nothing dark to grow
    with pytest.raises(ValueError, match="not on a dark spot"):
        grow_from_click(image, GEOMETRY, (7, 40, 45))
    with pytest.raises(ValueError, match="outside the image"):
        grow_from_click(image, GEOMETRY, (20, 40, 45))


def test_sphere_mask_is_measured_in_mm():
    mask = sphere_mask(SHAPE, GEOMETRY, (7, 40, 45), 5.0)
    kji = np.argwhere(mask)
    assert physical_distance_mm(kji, (7, 40, 45)).max() <= 5.0 + 1e-9
    outside = np.argwhere(~mask)
    assert physical_distance_mm(outside, (7, 40, 45)).min() > 5.0
