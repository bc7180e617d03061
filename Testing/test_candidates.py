"""The candidate stage (stage 2): labels from the engine's mimic maps, patches in patient
space, outputs and plumbing, and --single-stage = the paper's (0.2.0) pipeline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from CMBDetectLib.commands.detect import main as detect_main
from CMBDetectLib.detection.candidates import (
    load_candidate_classifier,
    StageSettings,
    patch_index_coordinates,
    run_candidate_stage,
    sample_patches,
)
from CMBDetectLib.detection.classifier import ClassifierConfig
from CMBDetectLib.detection.records import CLASSES
from CMBDetectLib.detection.records import LESION_COLUMNS, REJECTED_COLUMNS, output_paths
from CMBDetectLib.io import Geometry, read_volume, write_volume
from CMBDetectLib.training.candidates import candidate_classes, collect
from handmade import constant_classifier, oblique_geometry, phantom, save_dark_spot_model

DATA = Path(__file__).resolve().parent / "data"


# ------------------------------------------------------------------ training labels


def test_candidate_classes_come_from_label_and_mimic_maps():
    shape = (6, 20, 20)
    cands = np.zeros(shape, np.uint16)
    truth = np.zeros(shape, np.uint16)
    mimics = np.zeros(shape, np.uint8)
    cands[1:3, 2:5, 2:5] = 1  # touches a labelled bleed (one voxel) and sits mostly on a vein
    truth[2, 4, 4] = 7
    mimics[1:3, 2:5, 2:5] = 1
    cands[1:4, 10:13, 10:13] = 2  # mostly calcification, some vein
    mimics[1:4, 10:13, 10:13] = 2
    mimics[1, 10, 10:13] = 1
    cands[4, 15:18, 2:5] = 3  # nucleus
    mimics[4, 15:18, 2:5] = 3
    cands[4, 15:18, 10:13] = 4  # air-tissue edge, part of it on no mimic
    mimics[4, 15, 10:13] = 4
    cands[0, 17:19, 17:19] = 5  # on nothing: other
    got = candidate_classes(cands, 5, truth, mimics)
    assert [CLASSES[c] for c in got] == ["microbleed", "calcification", "nucleus", "air_edge", "other"]


def test_collect_labels_candidates_from_a_synth_style_folder(tmp_path):
    """images/ labels/ mimics/ + stage-1 probabilities -> labelled, cached patches."""
    geometry = oblique_geometry()
    array, _, spheres = phantom(geometry=geometry, spheres_mm=[((6, 60, 60), 4.0), ((6, 140, 170), 4.0), ((6, 60, 170), 4.0)])
    labels = np.zeros(array.shape, np.uint16)
    mimics = np.zeros(array.shape, np.uint8)
    dark = array < 50
    inside = np.zeros(array.shape, bool)
    inside[:, 30:90, 30:90] = True
    labels[dark & inside] = 1  # the first sphere is a labelled bleed
    inside[:] = False
    inside[:, 110:170, 140:200] = True
    mimics[dark & inside] = 2  # the second a calcification; the third is on no mimic
    probability = np.where(dark, 0.9, 0.0).astype(np.float32)
    probability[:, :, :12] = 0.0  # the air at the border is dark too: keep it out of the range
    probability[array < 20] = np.where(array[array < 20] < 12.0, probability[array < 20], 0.0)
    for folder, data in (("images", array), ("labels", labels), ("mimics", mimics)):
        write_volume(data, geometry, tmp_path / "data" / folder / "case1.nii.gz")
    write_volume(probability, geometry, tmp_path / "prob" / "case1_prob.nii.gz")
    config = ClassifierConfig(patch_size=8, patch_spacing_mm=1.0)
    settings = StageSettings(candidate_threshold=0.5)
    got = collect([tmp_path / "data"], tmp_path / "run", settings, config, [tmp_path / "prob"])
    from_unet = sorted(CLASSES[c] for c in got.labels[got.sources == "unet"])
    assert from_unet == ["calcification", "microbleed", "other"]
    # The dark-spot proposer finds the same three dark spheres, labelled the same way.
    assert sorted(CLASSES[c] for c in got.labels[got.sources == "dark_spot"]) == from_unet
    assert got.patches.shape == (6, 3, 8, 8, 8) and not got.has_phase.any()
    assert (tmp_path / "run" / "patches" / "case1.npz").is_file()  # cached: a rerun starts from it
    again = collect([tmp_path / "data"], tmp_path / "run", settings, config, [tmp_path / "prob"])
    np.testing.assert_array_equal(again.labels, got.labels)


def test_train_candidates_command_writes_a_classifier_detect_can_load(tmp_path):
    """`cmbdetect train-candidates` end to end on two tiny synth-style cases (a labelled bleed,
    a calcification, a dark spot on no mimic each): weights + card with the recipe, loadable."""
    from CMBDetectLib.cli import main as cmbdetect
    from CMBDetectLib.detection.candidates import load_classifier_file

    geometry = oblique_geometry()
    for n, seed in enumerate((1, 2)):
        array, _, _ = phantom(geometry=geometry, spheres_mm=[((6, 60, 60), 4.0), ((6, 140, 170), 4.0), ((6, 60, 170), 4.0)], seed=seed)
        dark = array < 50
        labels, mimics = np.zeros(array.shape, np.uint16), np.zeros(array.shape, np.uint8)
        labels[:, 30:90, 30:90] = dark[:, 30:90, 30:90]
        mimics[:, 110:170, 140:200] = 2 * dark[:, 110:170, 140:200]
        for folder, data in (("images", array), ("labels", labels), ("mimics", mimics)):
            write_volume(data, geometry, tmp_path / "data" / folder / f"case{n}.nii.gz")
    out = tmp_path / "run"
    code = cmbdetect(["train-candidates", "--data", str(tmp_path / "data"), "--out", str(out), "--epochs", "2",
                      "--samples-per-epoch", "32", "--patch-size", "8", "--width", "4", "--model-id", "tiny", "-q"])
    assert code == 0
    loaded = load_classifier_file(out / "best.safetensors")
    card = loaded.card
    assert card["id"] == "tiny" and card["network"]["patch_size"] == 8 and card["network"]["width"] == 4
    t = card["training"]
    assert t["epochs_run"] == 2 and t["microbleed_share"] == 0.3 and t["cartoon_p"] == 0.3
    assert t["candidates_by_class"]["microbleed"] >= 2 and t["candidates_by_class"]["calcification"] >= 2
    assert t["train_cases"] == 1 and t["val_cases"] == 1  # split by case
    assert (out / "training_log.csv").read_text().count("\n") == 3  # header + 2 epochs


def test_collect_refuses_a_case_without_mimic_map(tmp_path):
    array, geometry, _ = phantom(shape=(4, 40, 40), spheres_mm=[])
    write_volume(array, geometry, tmp_path / "images" / "c.nii.gz")
    write_volume(np.zeros(array.shape, np.uint16), geometry, tmp_path / "labels" / "c.nii.gz")
    with pytest.raises(Exception, match="c: no mimic map"):
        collect([tmp_path], tmp_path / "run", StageSettings(), ClassifierConfig())


def test_epoch_sampling_gives_microbleeds_their_share():
    from CMBDetectLib.training.candidates import _balanced_indices

    labels = np.array([0] * 10 + [1] * 500 + [2] * 5 + [5] * 300)
    rng = np.random.default_rng(0)
    even = labels[_balanced_indices(labels, 6000, rng)]
    assert abs((even == 0).mean() - 1 / 4) < 0.03 and abs((even == 2).mean() - 1 / 4) < 0.03
    tilted = labels[_balanced_indices(labels, 6000, rng, microbleed_share=0.4)]
    assert abs((tilted == 0).mean() - 0.4) < 0.03 and abs((tilted == 1).mean() - 0.2) < 0.03


def test_cartoon_augmentation_keeps_the_shape_and_drops_the_texture():
    """A cartoon patch has two flat levels (plus a little noise): the dark structure keeps its
    outline, while its grey edge profile and the tissue texture are gone."""
    from CMBDetectLib.training.candidates import augment

    s = 12
    kk, jj, ii = np.mgrid[0:s, 0:s, 0:s] - (s - 1) / 2
    r = np.sqrt(kk**2 + jj**2 + ii**2)
    mag = np.clip(r / 4.0, 0, 1) * 1.0  # a dark ball with a soft edge in tissue at 1
    batch = np.zeros((1, 3, s, s, s), np.float16)
    batch[0, 0] = mag + np.random.default_rng(1).normal(0, 0.05, mag.shape)
    rng = np.random.default_rng(0)
    for _ in range(5):
        out = augment(batch, np.array([False]), rng, phase_dropout=0.0, black_level_p=0.0, cartoon_p=1.0)[0, 0]
        inner, outer = out[r < 1.0], out[r > 4.5]
        assert inner.max() < 0.45 and outer.min() > 0.45  # two levels, the ball where it was
        assert inner.std() < 0.1 and outer.std() < 0.1  # flat, whatever texture there was


# ------------------------------------------------------------------ patches in patient space


def test_patch_axes_follow_patient_space_on_an_oblique_anisotropic_grid():
    geometry = oblique_geometry(spacing=(0.45, 0.6, 2.0))
    config = ClassifierConfig(patch_size=5, patch_spacing_mm=1.0)
    centre = geometry.index_to_lps(np.array([40.0, 30.0, 5.0]))
    coords = patch_index_coordinates(geometry, centre, config)  # (3, S, S, S) k, j, i
    # The patch's centre maps back to the voxel it was centred on ...
    np.testing.assert_allclose(coords[:, 2, 2, 2], [5.0, 30.0, 40.0], atol=1e-9)
    # ... and one patch step along its last axis is 1 mm along patient L, whatever the grid.
    step_ijk = coords[::-1, 2, 2, 3] - coords[::-1, 2, 2, 2]
    np.testing.assert_allclose(geometry.ijk_to_lps()[:3, :3] @ step_ijk, [1.0, 0.0, 0.0], atol=1e-9)
    step_ijk = coords[::-1, 3, 2, 2] - coords[::-1, 2, 2, 2]  # first axis: patient S
    np.testing.assert_allclose(geometry.ijk_to_lps()[:3, :3] @ step_ijk, [0.0, 0.0, 1.0], atol=1e-9)


def test_sampled_patch_sees_a_sphere_round_on_an_anisotropic_grid():
    geometry = oblique_geometry(spacing=(0.5, 0.5, 1.5))
    array, _, spheres = phantom(shape=(16, 120, 120), geometry=geometry, spheres_mm=[((8, 60, 60), 6.0)])
    magnitude = array / 420.0
    centre = geometry.index_to_lps(np.array([60.0, 60.0, 8.0]))
    patch = sample_patches(magnitude, None, geometry, centre[None], ClassifierConfig(patch_size=17, patch_spacing_mm=0.5))
    mag = patch[0, 0]
    assert mag[8, 8, 8] < 0.1 and patch[0, 2].max() == 0.0  # dark centre; no phase flag
    # 2 mm from the centre the sphere (3 mm radius) is dark along every patient axis alike,
    # 4 mm out it is tissue along every axis: the patch is isotropic though the grid is not.
    for axis in range(3):
        near = [8, 8, 8]
        far = [8, 8, 8]
        near[axis] += 4
        far[axis] += 8
        assert mag[tuple(near)] < 0.3 and mag[tuple(far)] > 0.8


# ------------------------------------------------------------------ outputs and plumbing


@pytest.fixture(scope="module")
def dark_spot_model(tmp_path_factory) -> str:
    return str(save_dark_spot_model(tmp_path_factory.mktemp("model") / "dark-spot.safetensors"))


def test_rejected_candidates_are_written_with_their_reason(tmp_path, dark_spot_model):
    array, geometry, spheres = phantom()
    write_volume(array, geometry, tmp_path / "in" / "obl.nii.gz")
    keep_none = constant_classifier(tmp_path / "veins.safetensors", keep_at=0.9, favourite="vein")
    code = detect_main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", dark_spot_model,
                        "--candidate-model", str(keep_none), "--preview", "-q"])  # fmt: skip
    assert code == 0
    paths = output_paths(tmp_path / "out", "obl", preview=True, rejected=True)
    assert all(p.is_file() for p in paths.values())
    assert list(csv.DictReader(open(paths["lesions_csv"]))) == []
    rejected = list(csv.DictReader(open(paths["rejected_csv"])))
    assert len(rejected) == len(spheres) and {r["reason"] for r in rejected} == {"vein"}
    assert list(rejected[0]) == REJECTED_COLUMNS
    summary = json.loads(paths["summary"].read_text())
    assert summary["stages"] == 2 and summary["candidate_stage"]["n_rejected"] == 2
    # The probability map is P(microbleed): the classifier's value inside each candidate.
    prob = read_volume(paths["probability"]).array
    p_vein = float(rejected[0]["p_microbleed"])
    spheres_voxels = array == 10.0  # handmade.phantom paints the spheres at exactly 10
    assert np.mean(np.abs(prob[spheres_voxels] - p_vein) < 1e-4) > 0.9  # all but a few partial-volume edge voxels
    assert prob[~spheres_voxels].max() < 0.15  # elsewhere below the candidate threshold


def test_kept_lesions_carry_p_microbleed_and_certainty(tmp_path, dark_spot_model):
    array, geometry, spheres = phantom()
    write_volume(array, geometry, tmp_path / "in" / "obl.nii.gz")
    keep_all = constant_classifier(tmp_path / "bleeds.safetensors", keep_at=0.5, favourite="microbleed")
    assert detect_main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", dark_spot_model,
                        "--candidate-model", str(keep_all), "-q"]) == 0  # fmt: skip
    paths = output_paths(tmp_path / "out", "obl", rejected=True)
    rows = list(csv.DictReader(open(paths["lesions_csv"])))
    assert len(rows) == 2 and list(rows[0]) == LESION_COLUMNS
    # Softmax of the hand-set bias; with no phase, P(microbleed) includes P(calcification).
    p = float((np.exp(3.0) + 1) / (np.exp(3.0) + 5))
    assert all(abs(float(r["p_microbleed"]) - p) < 1e-3 and r["certainty"] == "definite" for r in rows)
    assert list(csv.DictReader(open(paths["rejected_csv"]))) == []
    header = open(tmp_path / "out" / "obl.seg.nrrd", "rb").read(4000).decode("latin-1")
    assert "CMBDetect.Certainty:definite" in header and "CMBDetect.PMicrobleed:" in header


def test_without_phase_a_calcification_like_candidate_is_kept_as_possible(tmp_path, dark_spot_model):
    """Magnitude cannot tell calcium from iron: with no phase, a candidate the classifier calls a
    calcification is kept as a possible microbleed; given a phase image, it is rejected as one."""
    array, geometry, _ = phantom()
    write_volume(array, geometry, tmp_path / "in" / "obl.nii.gz")
    write_volume(np.zeros_like(array), geometry, tmp_path / "phase" / "obl.nii.gz")
    calc = constant_classifier(tmp_path / "calc.safetensors", keep_at=0.5, favourite="calcification")
    common = ["--model", dark_spot_model, "--candidate-model", str(calc), "-q"]
    assert detect_main([str(tmp_path / "in"), "-o", str(tmp_path / "no-phase"), *common]) == 0
    # --phase-sign keep: a constant classifier gives auto no evidence for either sign.
    assert detect_main([str(tmp_path / "in"), "-o", str(tmp_path / "phase"), "--phase", str(tmp_path / "phase"), "--phase-sign", "keep", *common]) == 0
    p_calc = float(np.exp(3.0) / (np.exp(3.0) + 5))
    kept = list(csv.DictReader(open(tmp_path / "no-phase" / "obl_lesions.csv")))
    assert len(kept) == 2
    assert all(r["certainty"] == "possible" and abs(float(r["p_microbleed"]) - p_calc - 1 / (np.exp(3.0) + 5)) < 1e-3 for r in kept)
    assert list(csv.DictReader(open(tmp_path / "no-phase" / "obl_rejected.csv"))) == []
    rejected = list(csv.DictReader(open(tmp_path / "phase" / "obl_rejected.csv")))
    assert [r["reason"] for r in rejected] == ["calcification", "calcification"]
    assert list(csv.DictReader(open(tmp_path / "phase" / "obl_lesions.csv"))) == []


def test_phase_on_another_grid_is_refused_naming_the_case(tmp_path, dark_spot_model):
    array, geometry, _ = phantom()
    write_volume(array, geometry, tmp_path / "in" / "obl.nii.gz")
    write_volume(np.zeros((12, 100, 100), np.float32), geometry, tmp_path / "phase" / "obl.nii.gz")
    clf = constant_classifier(tmp_path / "c.safetensors", keep_at=0.5)
    code = detect_main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", dark_spot_model,
                        "--candidate-model", str(clf), "--phase", str(tmp_path / "phase"), "-q"])  # fmt: skip
    assert code != 0
    assert not (tmp_path / "out" / "obl_summary.json").exists()  # nothing partial
    batch = list(csv.DictReader(open(tmp_path / "out" / "cmbdetect_batch.csv")))
    assert "obl" in batch[0]["error"] and "phase" in batch[0]["error"]


def test_phase_in_scanner_units_is_refused_naming_the_case(tmp_path, dark_spot_model):
    array, geometry, _ = phantom()
    write_volume(array, geometry, tmp_path / "in" / "obl.nii.gz")
    rng = np.random.default_rng(0)
    write_volume(rng.uniform(-4096, 4096, array.shape).astype(np.float32), geometry, tmp_path / "phase" / "obl.nii.gz")
    clf = constant_classifier(tmp_path / "c.safetensors", keep_at=0.5)
    code = detect_main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", dark_spot_model,
                        "--candidate-model", str(clf), "--phase", str(tmp_path / "phase"), "-q"])  # fmt: skip
    assert code != 0
    assert not (tmp_path / "out" / "obl_summary.json").exists()  # nothing partial
    error = list(csv.DictReader(open(tmp_path / "out" / "cmbdetect_batch.csv")))[0]["error"]
    assert "obl" in error and "radians" in error and "4096" in error


def test_phase_in_scanner_units_is_refused_before_the_network_runs(tmp_path, dark_spot_model):
    """detect_volume (which the command line, the cohort workers and the Slicer worker all call)
    checks the phase first: the error comes back before the first progress message, so the
    U-Net never ran on a case the candidate stage would refuse."""
    from CMBDetectLib.detection.pipeline import DetectionParams, detect_volume
    from CMBDetectLib.errors import CaseError
    from CMBDetectLib.io import Volume

    array, geometry, _ = phantom(shape=(6, 80, 90))
    phase = np.random.default_rng(0).uniform(-4096, 4096, array.shape).astype(np.float32)
    clf = constant_classifier(tmp_path / "c.safetensors", keep_at=0.5)
    params = DetectionParams(model=dark_spot_model, candidate_model=str(clf), device="cpu")
    messages: list[str] = []
    with pytest.raises(CaseError, match=r"radians") as caught:
        detect_volume(Volume(array, geometry), params, progress=lambda f, m: messages.append(m), case="obl", phase=phase)
    assert caught.value.case == "obl" and "4096" in str(caught.value)
    assert messages == [], f"the pipeline ran before refusing the phase: {messages[:3]}"


def test_classifier_registry_entry_is_checked(tmp_path):
    import shutil

    from CMBDetectLib import models

    registry = models.read_registry()
    detector = next(e for e in registry["models"] if e["id"] == registry["default"])
    spec = json.loads((models.models_dir() / detector["file"]).with_suffix(".json").read_text())["candidate_classifier"]
    loaded = load_candidate_classifier(spec)
    assert loaded.card["kind"] == "candidate-classifier" and loaded.card["trained"]
    for f in models.models_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    entry = next(e for e in registry["models"] if e["id"] == spec)
    data = bytearray((tmp_path / entry["file"]).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or changed"):
        load_candidate_classifier(spec, tmp_path)


# ------------------------------------------------------------------ the shipped classifier


def _segment_distance_mm(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((points - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[..., None] * ab), axis=-1)


def vein_and_bleed_phantom() -> tuple[np.ndarray, Geometry, tuple[float, ...], tuple[float, ...]]:
    """The oblique, anisotropic phantom with a 4 mm spherical bleed and, 15 mm away, a vein:
    a 1.6 mm tube running 14 mm through seven 2 mm slices. Returns the array, the geometry and
    the two objects' centres (i, j, k)."""
    geometry = oblique_geometry()
    bleed_kji = (6, 100, 90)
    array, _, _ = phantom(geometry=geometry, spheres_mm=[(bleed_kji, 4.0)], seed=3)
    kk, jj, ii = np.mgrid[0 : array.shape[0], 0 : array.shape[1], 0 : array.shape[2]]
    lps = geometry.index_to_lps(np.stack([ii, jj, kk], axis=-1).astype(float))
    start = geometry.index_to_lps(np.array([150.0, 100.0, 2.5]))
    end = start + geometry.direction_matrix @ np.array([3.0, 2.0, 13.0])  # mostly across slices
    tube = _segment_distance_mm(lps, start, end) <= 0.8
    array[tube] = 12.0
    vein_ijk = tuple(np.linalg.solve(geometry.ijk_to_lps()[:3, :3], (start + end) / 2 - geometry.origin))
    return array, geometry, bleed_kji[::-1], vein_ijk




def _nearest(items, ijk, geometry) -> object:
    target = geometry.index_to_lps(np.asarray(ijk, float))
    return min(items, key=lambda c: np.linalg.norm(np.asarray(c.centroid_lps) - target), default=None)


@pytest.fixture(scope="module")
def shipped_classifier():
    import handmade

    return handmade.shipped_classifier()


# Issue 11's acceptance point, with no phase image. The sphere is kept because, without phase,
# the stage folds calcification into microbleed (candidates.without_phase): the classifier
# alone calls a plain black sphere a calcification, which magnitude cannot show.
def test_shipped_classifier_rejects_a_vein_as_vein_and_keeps_the_bleed_beside_it(shipped_classifier):
    array, geometry, bleed_ijk, vein_ijk = vein_and_bleed_phantom()
    # Stage 1 is the hand-wired dark-spot network (every dark voxel is a candidate), so the
    # decision rests on the shipped classifier alone.
    from handmade import dark_spot_probability

    probability = dark_spot_probability(array)
    stage = run_candidate_stage(array, probability, geometry, shipped_classifier)
    assert stage.n_candidates == 2
    bleed = _nearest(stage.lesions + stage.rejected, bleed_ijk, geometry)
    vein = _nearest(stage.lesions + stage.rejected, vein_ijk, geometry)
    assert bleed is not vein
    assert bleed.kept, f"the bleed was rejected as {bleed.reason} (P {bleed.p_microbleed:.2f})"
    assert not vein.kept and vein.reason == "vein", f"the vein: kept={vein.kept}, reason {vein.reason!r}, P {vein.p_microbleed:.2f}"


def dipole_phase(shape, geometry: Geometry, centre_kji, radius_mm: float, chi_ppm: float, b0_t: float = 1.5, te_ms: float = 20.0) -> np.ndarray:
    """Phase (rad) of a magnetised sphere, B0 along the grid's k axis (as cmbdetect synth has
    it), in the engine's sign convention (phase = -gamma B0 TE x field offset)."""
    from CMBDetectLib.synth.susceptibility import phase_per_ppm

    kk, jj, ii = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    lps = geometry.index_to_lps(np.stack([ii, jj, kk], axis=-1).astype(float))
    r_vec = lps - geometry.index_to_lps(np.asarray(centre_kji[::-1], float))
    r = np.linalg.norm(r_vec, axis=-1)
    b0 = geometry.direction_matrix[:, 2]
    cos2 = np.divide((r_vec @ b0) ** 2, r**2, out=np.zeros_like(r), where=r > 0)
    field = np.where(r > radius_mm, chi_ppm / 3.0 * (radius_mm / np.maximum(r, 1e-6)) ** 3 * (3 * cos2 - 1), 0.0)
    return (-phase_per_ppm(b0_t, te_ms) * field).astype(np.float32)


def test_with_phase_a_diamagnetic_calcification_is_rejected_as_calcification(shipped_classifier):
    geometry = oblique_geometry()
    calc_kji, bleed_kji = (6, 60, 80), (6, 130, 160)
    array, _, _ = phantom(geometry=geometry, spheres_mm=[(calc_kji, 4.0), (bleed_kji, 4.0)], seed=5)
    phase = dipole_phase(array.shape, geometry, calc_kji, 2.0, -0.4) + dipole_phase(array.shape, geometry, bleed_kji, 2.0, +0.4)
    from handmade import dark_spot_probability

    probability = dark_spot_probability(array)
    # keep: the phase is in the engine's sign, and two candidates are too few for auto to decide.
    stage = run_candidate_stage(array, probability, geometry, shipped_classifier, phase=phase, phase_sign="keep")
    calc = _nearest(stage.lesions + stage.rejected, calc_kji[::-1], geometry)
    bleed = _nearest(stage.lesions + stage.rejected, bleed_kji[::-1], geometry)
    assert not calc.kept and calc.reason == "calcification", f"calcification: kept={calc.kept}, reason {calc.reason!r}, P {calc.p_microbleed:.2f}"
    assert bleed.kept, f"the paramagnetic bleed was rejected as {bleed.reason} (P {bleed.p_microbleed:.2f})"


# ------------------------------------------------------------------ --single-stage is 0.2.0


def test_single_stage_reproduces_the_0_2_0_lesion_csv(tmp_path):
    """Testing/data/single_stage_golden_0.2.0.csv was written by the pipeline of commit a76d2ee
    (model 0.2.0, before the candidate stage existed) on Testing/data/single_stage_case.nii.gz
    (cmbdetect synth seed 7, 160x160x14). --single-stage with model 0.2.0 (kept in the registry
    as cmbdetect-synth-c16-v0.2.0) must give the same bytes in every column that existed then:
    the two-stage code path changed nothing of the paper's pipeline."""
    golden = list(csv.reader(open(DATA / "single_stage_golden_0.2.0.csv")))
    assert len(golden) > 2  # the case has lesions to compare
    code = detect_main([str(DATA / "single_stage_case.nii.gz"), "-o", str(tmp_path / "out"), "--single-stage", "--model", "cmbdetect-synth-c16-v0.2.0", "-q", "--no-regions"])
    assert code == 0
    rows = list(csv.reader(open(tmp_path / "out" / "single_stage_case_lesions.csv")))
    old = len(golden[0])
    assert rows[0][:old] == golden[0] and rows[0][old:] == ["p_microbleed", "certainty", "mars_region", "mars_structure", "side"]
    assert [r[:old] for r in rows] == golden
    assert all(r[old:] == [""] * 5 for r in rows[1:])  # one stage, and --no-regions
    assert not (tmp_path / "out" / "single_stage_case_rejected.csv").exists()
