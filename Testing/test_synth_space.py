"""The widened randomisation space (generator 2.0) and its domain split: seed purity, every draw
recorded, the domains' held-out parameters never overlapping, and each factor doing what it says."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from CMBDetectLib.cli import main
from CMBDetectLib.detection.lesions import equivalent_diameter_mm
from CMBDetectLib.synth import MIMIC_CODES, generate_case
from CMBDetectLib.synth.acquisition import apply_curve, kspace_effects, sample_acquisition
from CMBDetectLib.synth.space import CONTRAST_CURVES, DEFAULT_SPACE, in_domain, space_for

TINY = {"matrix": (64, 64), "n_slices": 8, "fov_mm": 120.0}  # 1.9 mm pixels: small, yet bleeds fit
STRUCT26 = np.ones((3, 3, 3), bool)
EVERYTHING_ON = {"p_motion": 1.0, "p_oblique": 1.0, "p_full_kspace": 0.0, "noise_types": ("noncentral_chi",),
                 "p_bleed_on_vein": 0.5, "p_calcification_lobulated": 1.0}
# 1.25 mm pixels (the head's sides cut), 2 mm slices through the basal ganglia
OBLIQUE = {"matrix": (112, 112), "fov_mm": 140.0, "n_slices": 16, "slice_thickness_mm": 2.0, "slab_centre_mni_z": 5.0,
           "n_microbleeds": 8, "keep_maps": True, "space": EVERYTHING_ON}


def _same(a, b) -> None:
    assert np.array_equal(a.image.array, b.image.array)
    assert a.image.geometry == b.image.geometry
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.mimics, b.mimics)
    assert json.dumps(a.meta, sort_keys=True, default=str) == json.dumps(b.meta, sort_keys=True, default=str)


@pytest.fixture(scope="module")
def oblique_case():
    return generate_case(21, 2, **OBLIQUE)


def test_two_generations_are_bit_identical(oblique_case):
    again = generate_case(21, 2, **OBLIQUE)
    _same(oblique_case, again)
    assert np.array_equal(oblique_case.maps["phase"], again.maps["phase"])
    # and with the default space, where each factor is drawn
    _same(generate_case(3, 7, n_microbleeds=2, **TINY), generate_case(3, 7, n_microbleeds=2, **TINY))


def test_every_drawn_parameter_is_recorded(oblique_case):
    m = oblique_case.meta
    assert m["generator_version"] == "cmbdetect-synth 2.0"
    assert m["vendor_curve"]["curve"] in CONTRAST_CURVES and m["vendor_curve"]["params"]
    assert m["noise"] == {"type": "noncentral_chi", "coils": m["noise"]["coils"]} and m["noise"]["coils"] >= 2
    acq = m["acquisition"]
    for key in ("bias_amplitude", "kspace_fraction", "window_alpha", "motion", "oblique", "b0_te_t_ms", "snr",
                "slab_centre_mni_z", "fov_mm", "noise_sd_factor_kspace"):
        assert key in acq, key
    assert acq["motion"]["amplitude_rad"] > 0 and acq["motion"]["axis"] in ("i", "j")
    assert max(acq["kspace_fraction"]) < 1.0
    assert m["oblique"]["angle_deg"] >= DEFAULT_SPACE.oblique_deg[0]
    anatomy = m["randomisation"]["anatomy"]
    for key in ("vein_density", "vein_calibre", "vein_tortuosity", "iron_relative", "calcification_size_scale",
                "calcification_rate_scale"):
        assert key in anatomy, key
    assert m["randomisation"]["domain"] == "all"
    assert m["randomisation"]["space"]["p_oblique"] == 1.0
    assert len(m["randomisation"]["bleed_placement"]) == m["n_lesions"] + m["lesions_lost_in_resampling"]
    for lesion in m["lesions"]:
        assert {"shape", "lobes", "placement"} <= set(lesion)
        assert len(lesion["lobes_mm"]) == lesion["lobes"] and all(len(x) == 4 for x in lesion["lobes_mm"])
    for calc in m["mimics"]["calcifications"]:
        assert calc["lobes"] >= 2 and len(calc["lobes_mm"]) == calc["lobes"]  # p_calcification_lobulated = 1


def test_oblique_grid_keeps_labels_valid_and_in_place(oblique_case):
    c = oblique_case
    g = c.image.geometry
    direction = np.asarray(g.direction).reshape(3, 3)
    assert not np.allclose(direction, np.eye(3), atol=1e-3)
    assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-6)
    assert c.labels.shape == c.mimics.shape == c.image.shape == c.maps["phase"].shape
    ids = set(np.unique(c.labels)) - {0}
    assert ids == {x["id"] for x in c.meta["lesions"]} == set(range(1, len(ids) + 1))
    assert len(ids) >= 5
    counts = np.bincount(c.labels.ravel())
    for lesion in c.meta["lesions"]:
        blob = c.labels == lesion["id"]
        assert counts[lesion["id"]] == lesion["n_voxels"]
        assert ndimage.label(blob, structure=STRUCT26)[1] == 1
        rim = ndimage.binary_dilation(blob, STRUCT26) & ~blob
        assert not c.labels[rim].any()
        assert float(equivalent_diameter_mm(lesion["n_voxels"], g.spacing)) == pytest.approx(
            lesion["apparent_diameter_mm"], abs=1e-3)
        # Geometry: the bleed's physical centre lies at its outline (within a voxel's reach).
        voxels_lps = g.index_to_lps(np.argwhere(blob)[:, ::-1])
        gap = np.linalg.norm(voxels_lps - np.asarray(lesion["centre_lps"]), axis=1).min()
        assert gap <= 1.0 * max(g.spacing), (lesion["id"], gap)
        assert np.allclose(g.index_to_lps(lesion["centre_ijk"]), lesion["centre_lps"], atol=0.01)
    # The bleeds are dark against their surroundings on the resampled grid (most of them: a
    # small one may be washed out by the k-space window and the resampling).
    ratios = []
    for lesion in c.meta["lesions"]:
        blob = c.labels == lesion["id"]
        ring = ndimage.binary_dilation(blob, iterations=3) & ~ndimage.binary_dilation(blob)
        ratios.append(c.image.array[blob].mean() / np.median(c.image.array[ring]))
    assert np.median(ratios) < 0.85
    assert not c.mimics[c.labels > 0].any()


def test_domains_never_overlap_in_the_held_out_parameters():
    train, shifted = space_for("train"), space_for("shifted")
    rng = np.random.default_rng(5)
    a = [sample_acquisition(rng, {}, train) for _ in range(400)]
    b = [sample_acquisition(rng, {}, shifted) for _ in range(400)]
    held = DEFAULT_SPACE.held_out_curve
    assert all(x.contrast_curve != held and x.b0_te <= DEFAULT_SPACE.band_split for x in a)
    assert all(x.contrast_curve == held and x.b0_te > DEFAULT_SPACE.band_split for x in b)
    # Each domain still varies: train sees every other curve and all three field strengths,
    # shifted sees 3 T with long echoes and 7 T.
    assert {x.contrast_curve for x in a} == set(CONTRAST_CURVES) - {held}
    assert {x.field_strength_t for x in a} == {1.5, 3.0, 7.0}
    assert {x.field_strength_t for x in b} == {3.0, 7.0}
    assert max(x.b0_te for x in a) < min(x.b0_te for x in b)
    # whole cases, through their metadata
    for domain in ("train", "shifted"):
        for index in range(1):
            meta = generate_case(8, index, domain=domain, n_microbleeds=1, **TINY).meta
            assert in_domain(meta, domain) and not in_domain(meta, "shifted" if domain == "train" else "train")
            assert meta["randomisation"]["domain"] == domain


def test_the_held_out_part_can_be_chosen():
    s = space_for("shifted", {"held_out_curve": "log", "band_split": 60.0})
    assert s.contrast_curves == ("log",) and s.b0_te_band[0] == 60.5
    t = space_for("train", {"held_out_curve": "log", "band_split": 60.0})
    assert "log" not in t.contrast_curves and t.b0_te_band[1] == 59.5
    rng = np.random.default_rng(1)
    assert all(sample_acquisition(rng, {}, t).b0_te <= 60.0 for _ in range(100))


def test_space_errors_are_clear():
    with pytest.raises(ValueError, match="domain"):
        space_for("test")
    with pytest.raises(ValueError, match="unknown space override"):
        space_for("all", {"p_ghosts": 1.0})
    with pytest.raises(ValueError, match="bias_amplitude"):
        space_for("all", {"bias_amplitude": (0.3, 0.1)})
    with pytest.raises(ValueError, match="probability"):
        space_for("all", {"p_motion": 2.0})
    with pytest.raises(ValueError, match="contrast_curves"):
        space_for("all", {"contrast_curves": ("vendor-x",)})
    with pytest.raises(ValueError, match="empty B0 x TE band"):
        space_for("shifted", {"b0_te_band": (0.0, 50.0)})
    with pytest.raises(ValueError, match="space"):
        generate_case(0, 0, space={"nope": 1}, **TINY)


def test_contrast_curves_keep_white_matter_and_order():
    rng = np.random.default_rng(0)
    x = np.linspace(0.0, 3.0, 301, dtype=np.float32)
    for name in CONTRAST_CURVES:
        for _ in range(5):
            from CMBDetectLib.synth.acquisition import sample_curve

            curve, params = sample_curve(rng, dataclasses.replace(DEFAULT_SPACE, contrast_curves=(name,)))
            y = apply_curve(x.copy(), curve, params)
            assert y[100] == pytest.approx(1.0, abs=1e-4), (name, params)  # x = 1
            assert np.all(np.diff(y) >= -1e-6) and y.min() >= 0.0
            # and they really are different curves
    ys = {name: apply_curve(x.copy(), name, p) for name, p in
          (("gamma", {"gamma": 1.2}), ("log", {"a": 3.0}), ("sigmoid", {"k": 4.0, "centre": 0.8}),
           ("knee", {"knee": 0.8, "upper_slope": 0.4}), ("offset", {"offset": 0.2}))}
    names = list(ys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(ys[a] - ys[b]).max() > 0.05, (a, b)


def test_noise_types_differ_in_the_background():
    # Same case, only the noise model overridden (it moves no other draw).
    cases = {t: generate_case(6, 1, noise_type=t, snr=15.0, oblique=False, n_microbleeds=1, **TINY)
             for t in DEFAULT_SPACE.noise_types}
    for c in cases.values():
        assert c.meta["acquisition"]["noise_sd_factor_kspace"] == cases["rician"].meta["acquisition"]["noise_sd_factor_kspace"]
    assert np.array_equal(cases["rician"].labels, cases["gaussian"].labels)
    corner = (slice(None), slice(0, 4), slice(0, 4))  # air outside the head
    level = {t: float(np.mean(c.image.array[corner])) for t, c in cases.items()}
    # Gaussian magnitude noise averages to about zero (clipped at 0 by the curve); Rician has a
    # floor; the sum of squares over several coils a higher one.
    assert level["gaussian"] < level["rician"] < level["noncentral_chi"]


def _acq(**changes):
    base = sample_acquisition(np.random.default_rng(0), {"matrix": (64, 64), "n_slices": 4})
    return dataclasses.replace(base, **{"kspace_fraction": (1.0, 1.0), "window_alpha": 0.0, "motion": None, **changes})


def test_kspace_truncation_rings_and_a_window_tames_it():
    square = np.zeros((1, 128, 128), np.complex64)
    square[0, 30:81, 30:81] = 1.0
    sharp, tapered = square.copy(), square.copy()
    factor = kspace_effects(sharp, _acq(matrix=(128, 128), kspace_fraction=(0.45, 0.45), window_alpha=0.0))
    assert factor == pytest.approx(0.45, abs=0.02)  # noise power kept: the acquired share
    kspace_effects(tapered, _acq(matrix=(128, 128), kspace_fraction=(0.45, 0.45), window_alpha=1.0))
    # Gibbs ringing: overshoot inside the edge and undershoot outside; a Hann taper removes it.
    assert sharp.real.max() > 1.05 and sharp.real.min() < -0.05
    assert tapered.real.max() < 1.02 and tapered.real.min() > -0.02
    # lower resolution: the edge is spread over more than one voxel
    assert 0.1 < abs(sharp[0, 55, 30]) < 0.9 or 0.1 < abs(sharp[0, 55, 29]) < 0.9
    untouched = square.copy()
    assert kspace_effects(untouched, _acq()) == 1.0 and np.array_equal(untouched, square)


def test_motion_leaves_ghosts_along_the_phase_encode_axis():
    square = np.zeros((1, 64, 64), np.complex64)
    square[0, 24:40, 24:40] = 1.0
    ghosted = square.copy()
    kspace_effects(ghosted, _acq(motion={"axis": "j", "amplitude_rad": 0.6, "period_lines": 4, "phase_rad": 0.0}))
    # Ghosts: copies shifted by 64 / 4 = 16 rows along j, none along i.
    assert np.abs(ghosted[0, 8:24, 24:40]).mean() > 0.05
    assert np.abs(ghosted[0, 24:40, 8:24]).mean() < 0.01


def test_bleeds_touch_veins_and_the_cortex_when_asked():
    c = generate_case(12, 0, keep_maps=True, matrix=(128, 128), n_slices=24, slab_centre_mni_z=20.0, n_microbleeds=8,
                      oblique=False, space={"p_bleed_on_vein": 1.0})
    placed = c.meta["randomisation"]["bleed_placement"]
    assert placed.count("vein") >= len(placed) // 2  # half the tries go to the drawn place
    fraction = c.maps["vein_fraction"]
    touching = 0
    for lesion, how in zip(c.meta["lesions"], placed):
        blob = ndimage.binary_dilation(c.labels == lesion["id"], STRUCT26, iterations=2)
        touching += how == "vein" and bool((fraction[blob] > 0.02).any())
    assert touching == placed.count("vein")
    assert not c.mimics[c.labels > 0].any()  # the label wins over the vein
    cortex = generate_case(12, 1, matrix=(96, 96), n_slices=20, slab_centre_mni_z=30.0, n_microbleeds=5,
                           oblique=False, space={"p_bleed_on_cortex": 1.0, "p_bleed_on_vein": 0.0})
    assert "cortex" in cortex.meta["randomisation"]["bleed_placement"]
    assert all(x["region"] == "lobar" for x, how in zip(cortex.meta["lesions"], cortex.meta["randomisation"]["bleed_placement"])
               if how == "cortex")


def test_iron_and_veins_vary_between_cases(oblique_case):
    from CMBDetectLib.synth.case import sample_anatomy_variation

    drawn = [sample_anatomy_variation(np.random.default_rng([2, i, 0, 9]), DEFAULT_SPACE) for i in range(20)]
    iron = [d.iron["globus_pallidus"] for d in drawn]
    calibre = [d.vein_calibre for d in drawn]
    assert len(set(iron)) == 20 and len(set(calibre)) == 20
    lo = DEFAULT_SPACE.iron_scale[0] * DEFAULT_SPACE.iron_nucleus[0]
    hi = DEFAULT_SPACE.iron_scale[1] * DEFAULT_SPACE.iron_nucleus[1]
    assert all(lo <= v <= hi for v in iron) and max(iron) - min(iron) > 0.4
    assert all(DEFAULT_SPACE.vein_calibre[0] <= v <= DEFAULT_SPACE.vein_calibre[1] for v in calibre)
    # A case lists the iron it used.
    m = oblique_case.meta
    listed = {n["name"]: n["iron_relative"] for n in m["mimics"]["iron_nuclei"]}
    assert listed == m["randomisation"]["anatomy"]["iron_relative"]


def test_command_line_domain_and_space(tmp_path, capsys):
    out = tmp_path / "shifted"
    assert main(["synth", "--n", "1", "--controls", "0", "--seed", "4", "--matrix", "64x64", "--slices", "8",
                 "--microbleeds", "1",
                 "--domain", "shifted", "--space", "p_oblique=0", "--space", "bias_amplitude=0:0.1",
                 "--out", str(out), "--quiet"]) == 0
    meta = json.loads(next((out / "meta").glob("*.json")).read_text())
    assert in_domain(meta, "shifted")
    assert meta["overrides"]["space"] == {"p_oblique": 0.0, "bias_amplitude": [0.0, 0.1]}
    assert meta["acquisition"]["bias_amplitude"] <= 0.1 and "oblique" not in meta
    assert main(["synth", "--n", "1", "--out", str(tmp_path / "x"), "--space", "p_ghost=1", "--quiet"]) == 2
    assert "unknown space override" in capsys.readouterr().err
    assert set(MIMIC_CODES) == {"vein", "calcification", "nucleus", "air_edge"}
