"""Mimic maps: the synthetic engine records which mimic every voxel belongs to (veins,
calcifications, iron-rich nuclei, air-tissue edges), for the candidate stage's training labels."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from CMBDetectLib.cli import main
from CMBDetectLib.io import read_volume
from CMBDetectLib.synth import MIMIC_CODES, generate_case
from CMBDetectLib.synth.anatomy import NUCLEI, NUCLEUS_BITS, ellipsoid_members, mimic_anatomy, mni_to_index
from CMBDetectLib.synth.mimics import VEIN_FRACTION_MIN, mimic_map

VEIN, CALC, NUCLEUS, AIR = (MIMIC_CODES[k] for k in ("vein", "calcification", "nucleus", "air_edge"))


@pytest.fixture(scope="module")
def deep():
    # A slab through the basal ganglia, pineal and choroid plexus, with many bleeds.
    return generate_case(7, 3, keep_maps=True, matrix=(128, 128), n_slices=32, slice_thickness_mm=2.0,
                         slab_centre_mni_z=5.0, n_microbleeds=12)


@pytest.fixture(scope="module")
def skull_base():
    # A slab through the sinuses, mastoids and temporal poles.
    return generate_case(7, 4, keep_maps=True, matrix=(96, 96), n_slices=20, slice_thickness_mm=2.0,
                         slab_centre_mni_z=-30.0, n_microbleeds=0)


def test_codes_are_defined_once_and_distinct():
    assert MIMIC_CODES == {"vein": 1, "calcification": 2, "nucleus": 3, "air_edge": 4}


def test_map_is_uint8_on_the_image_grid(deep):
    assert deep.mimics is not None and deep.mimics.dtype == np.uint8
    assert deep.mimics.shape == deep.image.shape
    assert set(np.unique(deep.mimics)) <= {0, *MIMIC_CODES.values()}
    counts = deep.meta["mimics"]["map_voxels"]
    assert counts == {k: int((deep.mimics == v).sum()) for k, v in MIMIC_CODES.items()}


def test_veins_are_marked_where_blood_darkens_the_image(deep):
    fraction = deep.maps["vein_fraction"]
    blood = fraction >= VEIN_FRACTION_MIN
    assert blood.sum() > 50
    # Every such voxel is a vein, unless a calcification or a bleed's label takes it.
    codes = deep.mimics[blood & (deep.labels == 0)]
    assert np.isin(codes, (VEIN, CALC)).all()
    assert np.mean(codes == VEIN) > 0.95
    # and nothing with little or no blood is called a vein
    assert not (deep.mimics[fraction < VEIN_FRACTION_MIN] == VEIN).any()
    # The vein voxels are darker than the tissue they run through.
    image = deep.image.array
    wm = deep.meta["vendor_curve"]["wm_level"]
    tissue = (deep.mimics == 0) & (image > 0.5 * wm) & (image < 1.5 * wm)
    assert np.median(image[deep.mimics == VEIN]) < 0.85 * np.median(image[tissue])


def test_calcifications_are_marked_at_their_body(deep):
    calcs = deep.meta["mimics"]["calcifications"]
    assert calcs, "this slab should hold a calcification (pineal or choroid plexus)"
    for calc in calcs:
        i, j, k = (int(round(v)) for v in calc["centre_ijk"])
        if not (0 <= k < deep.mimics.shape[0]):
            continue
        assert deep.mimics[k, j, i] == CALC, calc["site"]
    assert (deep.mimics == CALC).sum() >= len(calcs)


def test_iron_rich_nuclei_are_marked_and_the_thalamus_is_not(deep):
    # In template space: each nucleus's centre carries its index.
    index = mimic_anatomy() & NUCLEUS_BITS
    names = [n.name for n in NUCLEI]
    for nucleus in NUCLEI:
        for centre, _ in ellipsoid_members(nucleus):
            k, j, i = np.rint(mni_to_index(np.array(centre))).astype(int)
            assert index[k, j, i] == names.index(nucleus.name) + 1, nucleus.name
    # On the image grid: iron-rich nuclei are code 3, the thalamus (iron 0.2) is not.
    thalamus = names.index("thalamus") + 1
    grid = np.array([[[1, thalamus, 2, 0]]], np.uint8)
    none = np.zeros(grid.shape, bool)
    out = mimic_map(np.zeros(grid.shape, np.float32), grid, none, ~none, none, [], np.zeros(grid.shape, np.uint16),
                    (2.0, 1.0, 1.0), 4)
    assert out.tolist() == [[[NUCLEUS, 0, NUCLEUS, 0]]]
    # In a case, the code covers a good volume of deep grey matter that is darker than white
    # matter (its iron).
    nucleus = deep.mimics == NUCLEUS
    assert nucleus.sum() > 200
    assert np.median(deep.image.array[nucleus]) < deep.meta["vendor_curve"]["wm_level"]


def test_air_edges_are_marked_at_the_skull_base_and_not_high_up(skull_base):
    air = skull_base.mimics == AIR
    assert air.sum() > 100
    assert not skull_base.labels.any()
    # None in a slab high above every cavity.
    high = generate_case(7, 5, matrix=(64, 64), n_slices=10, slice_thickness_mm=3.0, slab_centre_mni_z=50.0,
                         n_microbleeds=0)
    assert (high.mimics == VEIN).any() and not (high.mimics == AIR).any()
    # The marked band is dark on average: the cavities and the dephasing beside them.
    image = skull_base.image.array
    wm = skull_base.meta["vendor_curve"]["wm_level"]
    assert np.median(image[air]) < 0.8 * wm


def test_microbleed_labels_never_carry_a_mimic_code(deep, skull_base):
    assert deep.meta["n_lesions"] >= 8
    for case in (deep, skull_base):
        assert not (case.mimics[case.labels > 0]).any()


def test_label_wins_where_a_bleed_touches_a_vein():
    # The rule itself, on a small grid: a vein runs through a bleed's label.
    shape = (6, 10, 10)
    fraction = np.zeros(shape, np.float32)
    fraction[:, 5, :] = 0.8
    labels = np.zeros(shape, np.uint16)
    labels[2:4, 4:7, 4:7] = 1
    none = np.zeros(shape, bool)
    out = mimic_map(fraction, np.zeros(shape, np.uint8), none, ~none, none, [], labels, (2.0, 1.0, 1.0), 4)
    assert (out[labels > 0] == 0).all()
    assert (out[(fraction > 0) & (labels == 0)] == VEIN).all()
    assert (out[(fraction == 0)] == 0).all()


def test_the_command_writes_mimic_maps_with_the_index(tmp_path):
    out = tmp_path / "set"
    assert main(["synth", "--n", "1", "--controls", "1", "--seed", "3", "--matrix", "80x80", "--slices", "20",
                 "--out", str(out), "--quiet", "--with-phase"]) == 0
    with (out / "cases.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        assert row["mimics"] == f"mimics/{row['case']}.nii.gz"
        mimics = read_volume(out / row["mimics"])
        image = read_volume(out / row["image"])
        labels = read_volume(out / row["label"])
        assert sitk.ReadImage(str(out / row["mimics"])).GetPixelID() == sitk.sitkUInt8
        assert mimics.geometry.matches(image.geometry) and mimics.shape == image.shape
        assert (mimics.array == VEIN).any()
        assert not mimics.array[labels.array > 0].any()
        assert read_volume(out / "phase" / f"{row['case']}.nii.gz").shape == image.shape
