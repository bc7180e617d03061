"""Simple bleeds planted into training patches (training/planted.py) and their use in augment()."""

from __future__ import annotations

import numpy as np

from CMBDetectLib.training.candidates import augment
from CMBDetectLib.training.planted import DEPTH, DIAMETER_MM, lesion_profile, plant

SIZE, SPACING = 20, 0.75


def test_planted_lesions_sit_at_the_centre_span_the_size_range_and_leave_the_rest_alone():
    rng = np.random.default_rng(0)
    centre = (SIZE - 1) / 2.0
    diameters = []
    for _ in range(60):
        loss = lesion_profile(SIZE, SPACING, rng)
        assert loss.shape == (SIZE,) * 3 and loss.min() >= 0.0 and abs(loss.max() - 1.0) < 1e-5
        peak = np.array(np.unravel_index(int(np.argmax(loss)), loss.shape))
        assert np.all(np.abs(peak - centre) <= 1.5)  # the candidate's centre is the bleed's
        # Local: at most a Gaussian's tail reaches the patch's faces (7 mm out), nothing its corners.
        assert max(loss[0].max(), loss[-1].max(), loss[:, 0].max(), loss[:, :, -1].max()) < 0.25
        assert loss[np.ix_([0, -1], [0, -1], [0, -1])].max() < 0.05
        diameters.append((6.0 * (loss >= 0.5).sum() * SPACING**3 / np.pi) ** (1 / 3))
    diameters = np.array(diameters)
    # Half-loss outlines of 2-8 mm bleeds, widened by blur along S: small and large ones both.
    assert diameters.min() < 3.0 and diameters.max() > 6.0 and diameters.max() < 1.6 * DIAMETER_MM[1]


def test_plant_darkens_the_centre_by_the_drawn_depth_and_is_a_pure_function_of_the_seed():
    tissue = np.full((SIZE,) * 3, 1.0, np.float32)
    a = plant(tissue, SPACING, np.random.default_rng(7))
    b = plant(tissue, SPACING, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert DEPTH[0] - 1e-5 <= 1.0 - a.min() <= DEPTH[1] + 1e-5
    assert a[0, 0, 0] > 0.99 and (a <= tissue).all()


def test_augment_plants_only_the_marked_samples_and_withholds_their_phase():
    rng = np.random.default_rng(1)
    batch = np.zeros((4, 3, SIZE, SIZE, SIZE), np.float32)
    batch[:, 0] = 1.0
    batch[:, 1] = 0.5  # phase
    batch[:, 2] = 1.0  # phase present
    planted = np.array([True, False, True, False])
    out = augment(batch, np.ones(4, bool), rng, phase_dropout=0.0, black_level_p=0.0, cartoon_p=0.0, planted=planted)
    centre = SIZE // 2
    dark = out[:, 0, centre - 1 : centre + 1, centre - 1 : centre + 1, centre - 1 : centre + 1].mean(axis=(1, 2, 3))
    flat = out[:, 0].std(axis=(1, 2, 3)) < 1e-6  # gain and gamma alone keep a uniform patch uniform
    assert list(flat) == [False, True, False, True] and dark[0] < 0.9 * out[0, 0, 0, 0, 0]
    assert (out[planted, 1:] == 0).all()  # a planted bleed has no phase of its own
    assert (out[~planted, 2] == 1).all() and np.allclose(out[~planted, 1], 0.5)
