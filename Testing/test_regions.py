"""MARS locations (anatomy/): a synthetic head registered to the shipped template, its bleeds'
regions against the generator's own truth, QC on registrations that cannot succeed, an oblique
twin, and `detect --no-regions`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from CMBDetectLib.anatomy.atlas import UNKNOWN, load_atlas
from CMBDetectLib.anatomy.locate import location_counts, locate_lesions
from CMBDetectLib.anatomy.register import register_to_template
from CMBDetectLib.commands.detect import main as detect_main
from CMBDetectLib.io import Volume, geometry_of, to_sitk, write_volume
from handmade import save_dark_spot_model

pytest.importorskip("nilearn")  # the generator's template


@pytest.fixture(scope="module")
def case():
    from CMBDetectLib.synth.case import generate_case

    # Whole-head coverage, axial, 16 bleeds: seed chosen so that the truth has every category
    # on both sides (checked below, not assumed).
    return generate_case(3, 1, matrix=(144, 144), n_microbleeds=16,
                         space={"p_oblique": 0.0, "coverage_mm": (150.0, 160.0), "p_motion": 0.0})  # fmt: skip


def truth(case) -> tuple[np.ndarray, list[dict]]:
    lesions = case.meta["lesions"]
    return np.array([l["centre_lps"] for l in lesions]), lesions


@pytest.fixture(scope="module")
def located(case):
    points, _ = truth(case)
    return locate_lesions(case.image, points)


def test_synth_records_the_mars_truth(case):
    _, lesions = truth(case)
    assert all({"mars_region", "mars_structure", "side"} <= set(l) for l in lesions)
    seen = {(l["mars_region"], l["side"]) for l in lesions}
    for region in ("lobar", "deep", "infratentorial"):
        assert {s for r, s in seen if r == region} & {"left", "right"}, f"no {region} bleed in the test case: pick another seed"
    assert {s for _, s in seen} >= {"left", "right"}


def test_bleeds_in_known_regions_are_located(case, located):
    _, lesions = truth(case)
    assert located.ok, located.registration.qc()
    got = [l.mars_region for l in located.locations]
    agree = sum(g == l["mars_region"] for g, l in zip(got, lesions))
    sides = sum(g.side == l["side"] for g, l in zip(located.locations, lesions))
    assert agree >= 0.8 * len(lesions), list(zip(got, [l["mars_region"] for l in lesions]))
    assert sides >= 0.8 * len(lesions)
    counts = location_counts(located.locations)
    assert counts["n_lobar"] + counts["n_deep"] + counts["n_infratentorial"] + counts["n_region_unknown"] == len(lesions)
    assert counts["n_left"] + counts["n_right"] + counts["n_midline"] + counts["n_region_unknown"] == len(lesions)
    expected = "mixed" if counts["n_lobar"] and counts["n_deep"] else None
    assert expected is None or counts["pattern"] == expected


def test_a_case_registers_the_same_whatever_ran_before(case, located):
    """Two runs of one case must write the same files, in a batch worker that registered other
    cases first too (the sampling seed, the start and the metric's sums must not drift)."""
    first = located.registration  # the module's first registration of this case
    other = Volume(case.image.array[::2, ::2, ::2] * 0.7, case.image.geometry)  # another image, another size
    register_to_template(other)
    again = register_to_template(case.image)
    assert first.transform.GetParameters() == again.transform.GetParameters()
    assert first.qc() == again.qc()


def _rotated_header(volume: Volume) -> Volume:
    """The same voxels, their header turned 90 degrees about left-right: the head now lies on
    its face in patient space, which the moments initialiser does not undo."""
    image = to_sitk(volume.array, volume.geometry)
    turn = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    image.SetDirection(tuple((turn @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    return Volume(volume.array, geometry_of(image))


def test_a_header_with_the_head_on_its_face_still_registers(case, located):
    """The moments start cannot see a turned header; the search over turned starts can."""
    points, _ = truth(case)
    turned = _rotated_header(case.image)
    origin = np.array(case.image.geometry.origin, float)
    turn = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    result = locate_lesions(turned, (turn @ (points - origin).T).T + origin)
    assert result.ok, result.registration.qc()
    same = sum(a == b for a, b in zip(result.locations, located.locations))
    assert same >= 0.9 * len(points), [(a.mars_structure, b.mars_structure) for a, b in zip(result.locations, located.locations)]


def test_a_registration_that_cannot_succeed_is_flagged_and_unknown(case):
    points, _ = truth(case)
    rng = np.random.default_rng(0)
    noise = Volume(rng.random(case.image.array.shape).astype(np.float32) * 100, case.image.geometry)
    far = sitk.Euler3DTransform()
    far.SetRotation(np.pi / 2, 0.0, 0.0)
    far.SetTranslation((0.0, 80.0, 80.0))
    for volume, initial in ((noise, None), (case.image, far)):
        result = locate_lesions(volume, points, register_to_template(volume, initial=initial))
        assert not result.ok and result.registration.reason
        assert {l.mars_region for l in result.locations} == {UNKNOWN}
        assert location_counts(result.locations)["pattern"] == UNKNOWN


def test_an_oblique_anisotropic_twin_gets_the_same_regions(case, located):
    points, _ = truth(case)
    image = to_sitk(case.image.array, case.image.geometry)
    rotation = sitk.Euler3DTransform((0.0, 0.0, 0.0), np.radians(14.0), np.radians(-8.0), np.radians(10.0))
    direction = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)
    spacing = (1.1, 1.1, 2.6)
    size = [int(n * s / t) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    origin = centre - direction @ (np.array(size) - 1) / 2 * np.array(spacing)
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing), grid.SetDirection(tuple(direction.ravel())), grid.SetOrigin(tuple(origin))
    oblique = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    twin = locate_lesions(Volume(sitk.GetArrayFromImage(oblique), geometry_of(oblique)), points)
    assert twin.ok, twin.registration.qc()
    same = sum(a.mars_region == b.mars_region and a.side == b.side for a, b in zip(twin.locations, located.locations))
    assert same >= 0.85 * len(points), [(a.mars_region, b.mars_region) for a, b in zip(twin.locations, located.locations)]


def test_detect_writes_locations_and_no_regions_skips_them(case, tmp_path):
    model = str(save_dark_spot_model(tmp_path / "dark.safetensors"))
    write_volume(case.image.array, case.image.geometry, tmp_path / "in" / "head.nii.gz")
    runs = {}
    for name, extra in (("on", []), ("off", ["--no-regions"])):
        out = tmp_path / name
        assert detect_main([str(tmp_path / "in"), "-o", str(out), "--model", model, "--single-stage", "-q", *extra]) == 0
        summary = json.loads((out / "head_summary.json").read_text())
        rows = list(csv.DictReader(open(out / "head_lesions.csv")))
        table = list(csv.DictReader(open(out / "cmbdetect_batch.csv")))[0]
        runs[name] = (out, summary, rows, table)
    out, summary, rows, table = runs["on"]
    assert (out / "head_registration.png").is_file() and summary["files"]["registration"] == "head_registration.png"
    assert summary["regions"]["registration"]["passed"] is True
    assert rows and all(r["mars_region"] in ("lobar", "deep", "infratentorial", UNKNOWN) and r["side"] for r in rows)
    assert int(table["n_lobar"]) + int(table["n_deep"]) + int(table["n_infratentorial"]) + int(table["n_region_unknown"]) == len(rows)
    assert table["registration_qc"] == "passed"
    out, summary, rows, table = runs["off"]
    assert not (out / "head_registration.png").exists() and summary["regions"] is None
    assert rows and all(r["mars_region"] == r["mars_structure"] == r["side"] == "" for r in rows)
    assert table["registration_qc"] == "" and table["n_lobar"] == ""
    assert runs["on"][1]["params_fingerprint"] != summary["params_fingerprint"]  # resume tells them apart


def test_the_shipped_atlas_is_small_and_complete():
    atlas = load_atlas()
    folder = Path(__file__).resolve().parent.parent / "CMBDetect" / "Resources" / "Atlas"
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000
    assert (folder / "LICENSE.txt").read_text().count("Louis Collins") == 1
    regions = {l.mars_region for l in atlas.table.values()}
    assert regions == {"lobar", "deep", "infratentorial"}
    assert atlas.head.GetSize() == atlas.labels.GetSize()


def test_a_slab_too_thin_to_register_is_flagged_with_a_stable_reason():
    """A few slices (a test phantom, a localiser) are not registered; the reason is the same text
    every run (ITK's messages carry object addresses)."""
    from CMBDetectLib.io import Geometry

    volume = Volume(np.random.default_rng(1).random((3, 100, 120)).astype(np.float32), Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0)))
    results = [register_to_template(volume) for _ in range(2)]
    assert not results[0].ok and "covers only 6 mm" in results[0].reason
    assert results[0].qc() == results[1].qc()
