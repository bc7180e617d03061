"""The synthetic SWI engine end to end: cases, labels, metadata, files and the command line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import ndimage

from CMBDetectLib.cli import main
from CMBDetectLib.io import read_volume
from CMBDetectLib.detection.lesions import equivalent_diameter_mm, size_class
from CMBDetectLib.synth import generate_case
from CMBDetectLib.synth.veins import rasterise, sample_veins
from CMBDetectLib.synth.warp import mni_to_voxel

SMALL = {"matrix": (96, 96), "n_slices": 24, "oblique": False}
STRUCT26 = np.ones((3, 3, 3), bool)


@pytest.fixture(scope="module")
def case():
    return generate_case(7, 3, keep_maps=True, matrix=(128, 128), n_slices=32, slice_thickness_mm=2.0,
                         slab_centre_mni_z=5.0, n_microbleeds=8, oblique=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    args = ["synth", "--n", "2", "--controls", "1", "--seed", "11", "--matrix", "96x96", "--slices", "24", "--quiet",
            "--space", "p_oblique=0"]
    assert main(args + ["--out", str(out / "a")]) == 0
    assert main(args + ["--out", str(out / "b")]) == 0
    return out


def test_same_seed_gives_the_same_bytes(dataset):
    a, b = dataset / "a", dataset / "b"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 * 3 + 1  # image, label, mimic map, meta per case + cases.csv
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_same_arguments_give_the_same_case_in_memory():
    one = generate_case(4, 1, **SMALL)
    two = generate_case(4, 1, **SMALL)
    assert np.array_equal(one.image.array, two.image.array)
    assert np.array_equal(one.labels, two.labels)
    assert one.meta == two.meta


def test_a_different_seed_or_index_gives_a_different_case():
    base = generate_case(4, 1, **SMALL)
    for other in (generate_case(5, 1, **SMALL), generate_case(4, 2, **SMALL)):
        assert other.image.array.shape == base.image.array.shape
        assert not np.array_equal(other.image.array, base.image.array)
        assert other.meta["lesions"] != base.meta["lesions"]


def test_layout_csv_and_files_are_readable(dataset):
    out = dataset / "a"
    with (out / "cases.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    required = {"case", "image", "label", "meta", "control", "field_strength_t", "te_ms", "slice_thickness_mm", "n_lesions"}
    assert required <= set(rows[0])
    assert [r["case"] for r in rows] == ["synth-s11-000", "synth-s11-001", "synth-s11-ctl-000"]
    for row in rows:
        image = read_volume(out / row["image"])
        labels = read_volume(out / row["label"])
        meta = json.loads((out / row["meta"]).read_text())
        assert image.array.dtype == np.float32 and image.shape == (24, 96, 96)
        assert image.geometry.matches(labels.geometry)
        assert image.geometry.spacing[2] == pytest.approx(meta["slice_thickness_mm"])
        assert np.allclose(image.geometry.spacing, meta["spacing_mm"], atol=1e-4)
        assert int(row["control"]) == int(meta["control"])
        assert int(row["n_lesions"]) == len(meta["lesions"]) == len(np.unique(labels.array)) - 1
        assert float(row["field_strength_t"]) == meta["field_strength_t"]
        for key in ("field_strength_t", "te_ms", "matrix", "spacing_mm", "snr", "vendor", "vendor_curve", "seed",
                    "generator_version", "lesions", "mimics"):
            assert key in meta
        assert image.array.min() >= 0.0


def test_labels_and_json_agree_voxel_for_voxel(case, dataset):
    cases = [(case.labels, case.image.geometry.spacing, case.meta)]
    out = dataset / "a"
    for name in ("synth-s11-000", "synth-s11-001"):
        labels = read_volume(out / "labels" / f"{name}.nii.gz")
        cases.append((labels.array.astype(np.uint16), labels.geometry.spacing,
                      json.loads((out / "meta" / f"{name}.json").read_text())))
    for labels, spacing, meta in cases:
        ids = set(np.unique(labels)) - {0}
        assert ids == {lesion["id"] for lesion in meta["lesions"]}
        assert ids == set(range(1, len(ids) + 1))
        counts = np.bincount(labels.ravel(), minlength=len(ids) + 1)
        for lesion in meta["lesions"]:
            n = int(counts[lesion["id"]])
            assert n == lesion["n_voxels"]
            d = float(equivalent_diameter_mm(n, spacing))
            assert d == pytest.approx(lesion["apparent_diameter_mm"], abs=1e-3)
            # One 26-connected blob per id, and no two bleeds touching.
            blob = labels == lesion["id"]
            _, parts = ndimage.label(blob, structure=STRUCT26)
            assert parts == 1
            rim = ndimage.binary_dilation(blob, STRUCT26) & ~blob
            assert not np.any(labels[rim] > 0)


def test_sizes_fall_within_their_classes(case):
    assert case.meta["n_lesions"] == 8
    for lesion in case.meta["lesions"]:
        d = lesion["apparent_diameter_mm"]
        assert 2.0 <= d <= 10.0
        assert lesion["size_class"] == size_class(d)
        assert lesion["size_class"] == ("small" if d < 5.0 else "large")
        assert 0.5 <= lesion["true_diameter_mm"] <= d  # blooming: the outline exceeds the source
        assert lesion["region"] in ("lobar", "deep", "infratentorial")
        assert lesion["shape"] in ("sphere", "ellipsoid", "lobulated")
        assert (lesion["lobes"] > 0) == (lesion["shape"] == "lobulated")
        assert lesion["placement"] in ("tissue", "vein", "cortex")
        assert lesion["susceptibility_ppm"] > 0


def test_bleeds_are_dark_against_their_surroundings(case):
    image = case.image.array
    for lesion in case.meta["lesions"]:
        i, j, k = (int(round(v)) for v in lesion["centre_ijk"])
        mask = case.labels == lesion["id"]
        ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask)
        assert image[mask].mean() < 0.75 * np.median(image[ring])
        assert case.labels[k, j, i] == lesion["id"] or mask[max(k - 1, 0):k + 2, j - 1:j + 2, i - 1:i + 2].any()


def test_controls_are_free_of_lesions():
    control = generate_case(4, 1, control=True, n_microbleeds=5, **SMALL)
    assert control.name == "synth-s4-ctl-001"
    assert not control.labels.any()
    assert control.meta["lesions"] == [] and control.meta["n_lesions"] == 0
    assert control.meta["control"] is True
    # Mimics are still there: veins at least.
    assert control.meta["mimics"]["veins"]["pial"]["count"] > 0


def test_image_looks_like_swi(case):
    image = case.image.array
    wm = case.meta["vendor_curve"]["wm_level"]
    assert 250 <= wm <= 650
    assert image.min() >= 0.0
    # Background air: dark noise in the corners.
    corners = np.concatenate([image[:, :8, :8].ravel(), image[:, -8:, -8:].ravel()])
    assert corners.mean() < 0.15 * wm
    # Brain-like voxels: the histogram peaks at the white-matter level.
    tissue = image[(image > 0.4 * wm) & (image < 2.0 * wm)]
    hist, edges = np.histogram(tissue, bins=60)
    peak = 0.5 * (edges[np.argmax(hist)] + edges[np.argmax(hist) + 1])
    assert peak == pytest.approx(wm, rel=0.2)
    # Veins are dark: voxels at least half filled with venous blood, against the tissue peak.
    veins = case.maps["vein_fraction"] >= 0.5
    assert veins.sum() > 20
    assert np.median(image[veins]) < 0.7 * peak


def test_overrides_are_honoured():
    c = generate_case(9, 0, field_strength_t=1.5, te_ms=35.0, matrix=(80, 64), n_slices=20,
                      slice_thickness_mm=2.5, snr=25.0, n_microbleeds=3, vendor="GE", oblique=False)
    m = c.meta
    assert c.image.shape == c.labels.shape == (20, 80, 64)
    assert c.labels.dtype == np.uint16 and c.image.array.dtype == np.float32
    assert m["field_strength_t"] == 1.5 and m["te_ms"] == 35.0 and m["snr"] == 25.0
    assert m["vendor"] == "GE" and m["acquisition"]["scanner_model"] in ("Signa HDxt", "DISCOVERY MR750", "SIGNA Explorer")
    assert c.image.geometry.spacing[2] == 2.5 and m["n_lesions"] == 3
    assert c.image.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _rows(out) -> list[dict]:
    with (out / "cases.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_matrix_and_slices_are_honoured_on_oblique_grids(tmp_path):
    """--matrix and --slices give the written image's size also when the case is resampled onto
    an oblique grid (p_oblique=1: every case); cases.csv and the metadata say what was written."""
    out = tmp_path / "obl"
    assert main(["synth", "--n", "2", "--controls", "0", "--seed", "5", "--matrix", "64x48", "--slices", "8",
                 "--space", "p_oblique=1", "--quiet", "--out", str(out)]) == 0
    for row in _rows(out):
        image, labels = read_volume(out / row["image"]), read_volume(out / row["label"])
        assert image.shape == labels.shape == (8, 64, 48), row["case"]
        assert not np.allclose(np.reshape(image.geometry.direction, (3, 3)), np.eye(3), atol=1e-3)  # still oblique
        assert (row["matrix"], row["n_slices"]) == ("64x48", "8")
        meta = json.loads((out / row["meta"]).read_text())
        assert meta["shape_kji"] == [8, 64, 48] and meta["matrix"] == [64, 48] and "oblique" in meta
        assert int(labels.array.max()) == meta["n_lesions"] == int(row["n_lesions"])


def test_cases_csv_reports_the_grid_of_the_written_image(tmp_path):
    """A drawn matrix resampled onto an oblique grid: cases.csv gives the image's own size."""
    out = tmp_path / "drawn"
    assert main(["synth", "--n", "1", "--controls", "0", "--seed", "5", "--slices", "8", "--space", "p_oblique=1",
                 "--quiet", "--out", str(out)]) == 0
    (row,) = _rows(out)
    k, j, i = read_volume(out / row["image"]).shape
    assert (row["matrix"], row["n_slices"]) == (f"{j}x{i}", str(k)) and k == 8
    meta = json.loads((out / row["meta"]).read_text())
    assert meta["matrix"] == [j, i] and meta["acquisition"]["matrix"] != meta["matrix"]  # as acquired, as written


def test_default_protocols_cover_table_1_and_the_wider_space():
    from CMBDetectLib.synth.acquisition import MATRICES, sample_acquisition
    from CMBDetectLib.synth.space import CONTRAST_CURVES, DEFAULT_SPACE as S

    rng = np.random.default_rng(0)
    drawn = [sample_acquisition(rng, {}) for _ in range(600)]
    matrices = {a.matrix for a in drawn}
    assert matrices <= {(m[0], m[1]) for m in MATRICES}
    assert (432, 432) in matrices and (256, 192) in matrices
    # Table 1's 1.5 T share, less the 7 T scans drawn from every model
    share_15 = np.mean([a.field_strength_t == 1.5 for a in drawn])
    assert share_15 == pytest.approx(208 / 1615 * (1 - S.p_7t), abs=0.04)
    assert np.mean([a.field_strength_t == 7.0 for a in drawn]) == pytest.approx(S.p_7t, abs=0.03)
    te = {1.5: S.te_ms_15t, 3.0: S.te_ms_3t, 7.0: S.te_ms_7t}
    thick = {1.5: S.thickness_mm_15t, 3.0: S.thickness_mm_3t, 7.0: S.thickness_mm_7t}
    for a in drawn:
        assert te[a.field_strength_t][0] <= a.te_ms <= te[a.field_strength_t][1]
        assert thick[a.field_strength_t][0] - 0.05 <= a.slice_thickness_mm <= thick[a.field_strength_t][1] + 0.05
    assert {a.vendor for a in drawn} == {"Siemens", "Philips", "GE"}
    assert {a.contrast_curve for a in drawn} == set(CONTRAST_CURVES)
    assert {a.noise_type for a in drawn} == set(S.noise_types)
    assert all(1.5 <= (a.n_slices * a.slice_thickness_mm) / 10 <= 25 for a in drawn)
    assert len({round(a.slab_centre_mni_z) for a in drawn}) > 20  # partial coverage moves the slab
    assert np.mean([a.motion is not None for a in drawn]) == pytest.approx(S.p_motion, abs=0.06)
    assert np.mean([a.oblique is not None for a in drawn]) == pytest.approx(S.p_oblique, abs=0.06)
    assert np.mean([a.kspace_fraction == (1.0, 1.0) for a in drawn]) == pytest.approx(S.p_full_kspace, abs=0.06)
    assert all(a.window_alpha == 0.0 for a in drawn if a.kspace_fraction == (1.0, 1.0))  # no taper on full k-space


def test_veins_are_continuous_across_slices():
    from CMBDetectLib.synth.anatomy import load_template
    from CMBDetectLib.synth.warp import sample_warp

    rng = np.random.default_rng(3)
    template = load_template()
    veins = sample_veins(template, rng)
    warp = sample_warp(np.random.default_rng(4), np.zeros(3))
    spacing = np.array([0.9, 0.9, 2.0])
    shape = (60, 220, 200)
    origin = np.array([-100 * 0.9, -110 * 0.9, -40.0])
    checked = 0
    for vein in veins:
        if vein.kind != "pial":
            continue
        kji = mni_to_voxel(warp, origin, spacing, vein.points_mni)
        k = kji[:, 0]
        if k.min() < 1 or k.max() > shape[0] - 2 or k.max() - k.min() < 4:
            continue  # wholly inside the slab and crossing at least four slices
        fraction = rasterise([vein], warp, origin, spacing, shape).fraction
        blob = fraction > 0
        _, parts = ndimage.label(blob, structure=STRUCT26)
        slices = np.flatnonzero(blob.any(axis=(1, 2)))
        assert parts == 1
        assert slices.min() <= int(round(k.min())) and slices.max() >= int(round(k.max()))
        assert np.all(np.diff(slices) == 1)  # no slice skipped
        checked += 1
        if checked == 5:
            break
    assert checked == 5


def test_calcifications_and_bleeds_show_opposite_phase_in_cases():
    # Mean high-pass phase just beyond each source along B0, over a few cases that cover the
    # pineal and choroid plexus: negative for bleeds, positive for calcifications.
    bleeds, calcs = [], []
    for seed in (2, 3):
        c = generate_case(seed, 0, keep_maps=True, matrix=(128, 128), n_slices=32, slab_centre_mni_z=5.0, oblique=False)
        phase, dz = c.maps["phase"], c.meta["slice_thickness_mm"]

        def pole(ijk, radius):
            i, j, k = (int(round(v)) for v in ijk)
            off = int(np.ceil((radius + 0.5 * dz) / dz))
            return np.mean([phase[kk, j, i] for kk in (k - off, k + off) if 0 <= kk < phase.shape[0]])

        bleeds += [pole(x["centre_ijk"], x["true_diameter_mm"] / 2) for x in c.meta["lesions"]]
        calcs += [pole(x["centre_ijk"], x["diameter_mm"] / 2) for x in c.meta["mimics"]["calcifications"]]
    assert len(calcs) >= 2 and len(bleeds) >= 5
    assert np.mean(bleeds) < -0.1
    assert np.mean(calcs) > 0.1


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="seed"):
        generate_case(-1, 0)
    with pytest.raises(ValueError, match="unknown override"):
        generate_case(0, 0, fieldstrength=3.0)
    with pytest.raises(ValueError, match="field_strength_t"):
        generate_case(0, 0, field_strength_t=2.0)
    with pytest.raises(ValueError, match="matrix"):
        generate_case(0, 0, matrix=(10, 10))
    with pytest.raises(ValueError, match="n_microbleeds"):
        generate_case(0, 0, n_microbleeds=-2)


def test_command_line_errors(tmp_path, capsys):
    assert main(["synth", "--n", "1"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["synth", "--n", "0", "--controls", "0", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--n", "1", "--out", str(tmp_path), "--matrix", "big"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["synth", "--n", "-3", "--out", str(tmp_path)])


def test_nrrd_output_extras_and_default_controls(tmp_path):
    out = tmp_path / "nrrd"
    montage = tmp_path / "montage.png"
    stats = tmp_path / "stats.csv"
    code = main(["synth", "--n", "1", "--seed", "5", "--out", str(out), "--format", "nrrd", "--matrix", "96x96",
                 "--slices", "24", "--quiet", "--with-phase", "--montage", str(montage), "--stats", str(stats)])
    assert code == 0
    with (out / "cases.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1  # --n 1: one control per five cases rounds to none
    image = read_volume(out / rows[0]["image"])
    assert rows[0]["image"].endswith(".nrrd") and rows[0]["label"].endswith(".nrrd")
    assert read_volume(out / "phase" / "synth-s5-000.nrrd").shape == image.shape
    assert montage.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from CMBDetectLib.synth.stats import read_rows

    stat_rows, vein_rows = read_rows(stats)
    meta = json.loads((out / rows[0]["meta"]).read_text())
    assert len(stat_rows) == meta["n_lesions"] > 0
    on_tissue = [r for r in stat_rows if r["background_relative"] >= 0.5]
    assert on_tissue and all(0.0 < r["contrast"] < 1.0 for r in on_tissue)
    assert len(vein_rows) == 1 and 0.3 < vein_rows[0]["contrast"] < 1.0
