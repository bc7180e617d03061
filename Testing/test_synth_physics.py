"""Physics of the synthetic SWI engine: dipole field, blooming, phase signs, SWI mask, label rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from CMBDetectLib.detection.lesions import equivalent_diameter_mm, size_class
from CMBDetectLib.synth.microbleeds import SMALL_FRACTION, outline, sample_target
from CMBDetectLib.synth.susceptibility import (
    Source,
    field_ppm,
    phase_mask,
    phase_per_ppm,
    simulate_source,
    visibility,
)

POWER = 4


def apparent_diameter(source: Source, spacing_kji, b0: float, te: float) -> float:
    """Equivalent diameter (mm) of the labelled outline of `source` centred in a voxel."""
    patch = simulate_source(source, np.array([20.0, 30.0, 30.0]), spacing_kji, b0, te)
    result = outline(visibility(patch.factor, POWER), spacing_kji)
    assert result is not None, "the source should be visible"
    mask, _ = result
    return float(equivalent_diameter_mm(int(mask.sum()), spacing_kji[::-1]))


def sphere(diameter_mm: float, chi: float, interior: float = 0.02) -> Source:
    r = diameter_mm / 2.0
    return Source((r, r, r), np.eye(3), chi, interior_signal=interior)


def test_sphere_field_matches_the_analytic_dipole():
    # A sphere's field outside is chi/3 (a/r)^3 (3 cos^2 - 1): +2chi/3 (a/r)^3 on the B0 axis,
    # -chi/3 (a/r)^3 in the equatorial plane, and zero inside.
    n, h, a, chi = 96, 0.25, 2.0, 1.0
    x = (np.arange(n) - n / 2) * h
    z, y, xx = np.meshgrid(x, x, x, indexing="ij")
    inside = (np.sqrt(z**2 + y**2 + xx**2) <= a).astype(np.float32) * chi
    field = field_ppm(inside, (h, h, h))
    c = n // 2
    r = 3.5  # mm from the centre
    step = int(round(r / h))
    expected_pole = 2.0 * chi / 3.0 * (a / r) ** 3
    expected_equator = -chi / 3.0 * (a / r) ** 3
    assert field[c + step, c, c] == pytest.approx(expected_pole, rel=0.12)
    assert field[c - step, c, c] == pytest.approx(expected_pole, rel=0.12)
    assert field[c, c + step, c] == pytest.approx(expected_equator, rel=0.12)
    assert field[c, c, c - step] == pytest.approx(expected_equator, rel=0.12)
    assert abs(field[c, c, c]) < 0.05 * chi


def test_blooming_grows_with_field_strength():
    s = sphere(2.0, 0.8)
    spacing = (2.0, 0.5, 0.5)
    assert apparent_diameter(s, spacing, 3.0, 20.0) > apparent_diameter(s, spacing, 1.5, 20.0) + 0.3


def test_blooming_grows_with_echo_time():
    s = sphere(2.0, 0.8)
    spacing = (2.0, 0.5, 0.5)
    assert apparent_diameter(s, spacing, 3.0, 40.0) > apparent_diameter(s, spacing, 3.0, 20.0) + 0.3
    assert apparent_diameter(s, spacing, 1.5, 40.0) > apparent_diameter(s, spacing, 1.5, 25.0) + 0.2


def test_blooming_grows_with_voxel_size():
    s = sphere(2.0, 0.8)
    assert apparent_diameter(s, (3.0, 1.0, 1.0), 3.0, 20.0) > apparent_diameter(s, (1.0, 0.5, 0.5), 3.0, 20.0)


def test_apparent_size_exceeds_the_source_for_a_haemosiderin_bleed():
    s = sphere(2.5, 1.0)
    assert apparent_diameter(s, (1.5, 0.5, 0.5), 3.0, 20.0) > 1.3 * s.equivalent_diameter_mm


def test_calcification_phase_has_the_opposite_sign_of_a_microbleed():
    spacing = (1.5, 0.5, 0.5)
    centre = np.array([20.0, 30.0, 30.0])
    bleed = simulate_source(sphere(3.0, +0.6), centre, spacing, 3.0, 20.0, keep_hires_phase=True)
    calc = simulate_source(sphere(3.0, -0.6, interior=0.1), centre, spacing, 3.0, 20.0, keep_hires_phase=True)
    # Same geometry, opposite susceptibility: the field (and the phase) flips everywhere.
    np.testing.assert_allclose(bleed.hires_phase, -calc.hires_phase, atol=1e-4)
    # On the acquisition grid, in the voxel just beyond the source along B0 (slice axis):
    k = 20 + 2 - bleed.lo[0]
    j, i = 30 - bleed.lo[1], 30 - bleed.lo[2]
    assert np.angle(bleed.factor[k, j, i]) < -0.1  # paramagnetic: negative phase at the poles
    assert np.angle(calc.factor[k, j, i]) > 0.1  # diamagnetic: positive
    # SWI's mask darkens the bleed's poles, not the calcification's.
    assert phase_mask(np.angle(bleed.factor[k, j, i]), POWER) < 0.9
    assert phase_mask(np.angle(calc.factor[k, j, i]), POWER) == 1.0


def test_phase_mask_only_suppresses_negative_phase():
    phase = np.array([-np.pi, -np.pi / 2, 0.0, 1.0, np.pi], np.float32)
    np.testing.assert_allclose(phase_mask(phase, 1), [0.0, 0.5, 1.0, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(phase_mask(phase, 4), [0.0, 0.0625, 1.0, 1.0, 1.0], atol=1e-6)


def test_phase_per_ppm_is_gamma_b0_te():
    # 42.58 MHz/T * 3 T * 20 ms * 1 ppm * 2 pi = 16.05 rad
    assert phase_per_ppm(3.0, 20.0) == pytest.approx(16.05, rel=1e-3)
    assert phase_per_ppm(1.5, 40.0) == pytest.approx(phase_per_ppm(3.0, 20.0))


@settings(max_examples=25, deadline=None)
@given(
    diameter=st.floats(1.0, 5.0),
    chi=st.floats(0.4, 1.6),
    thickness=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    pixel=st.sampled_from([0.45, 0.9]),
    b0=st.sampled_from([1.5, 3.0]),
)
def test_outline_is_connected_sized_and_classed(diameter, chi, thickness, pixel, b0):
    spacing = (thickness, pixel, pixel)
    patch = simulate_source(sphere(diameter, chi), np.array([10.3, 20.0, 20.0]), spacing, b0, 25.0)
    result = outline(visibility(patch.factor, POWER), spacing)
    if result is None:
        return  # too faint at this voxel size: the generator redraws such bleeds
    mask, level = result
    from scipy import ndimage

    _, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    d = float(equivalent_diameter_mm(int(mask.sum()), (pixel, pixel, thickness)))
    assert n == 1
    assert 2.0 <= d <= 10.0
    assert 0.2 <= level <= 0.85
    assert size_class(d) in ("small", "large")


def test_target_size_mix_follows_table_2():
    rng = np.random.default_rng(0)
    draws = [sample_target(rng) for _ in range(4000)]
    small = [d for c, d in draws if c == "small"]
    large = [d for c, d in draws if c == "large"]
    assert len(small) / len(draws) == pytest.approx(SMALL_FRACTION, abs=0.015)
    assert SMALL_FRACTION == pytest.approx(0.892, abs=0.001)
    assert all(2.0 <= d < 5.0 for d in small)
    assert all(5.0 <= d <= 10.0 for d in large)
