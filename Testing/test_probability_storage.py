"""The stored probability map: uint16 with a NIfTI scale, read back as floats on the input's grid,
and `cmbdetect evaluate` scores it as it scores the map in memory."""

from __future__ import annotations

import numpy as np
import pytest

from CMBDetectLib.detection.outputs import PROBABILITY_LEVELS, write_case_outputs, write_probability
from CMBDetectLib.detection.pipeline import DetectionParams, detect_volume
from CMBDetectLib.evaluation import metrics as M
from CMBDetectLib.evaluation.evaluate import CasePair, evaluate_arrays, score_pair
from CMBDetectLib.io import Volume, read_volume, write_volume
from handmade import oblique_geometry, phantom, save_dark_spot_model


def test_probability_map_reads_back_as_floats_on_the_same_grid(tmp_path):
    geometry = oblique_geometry((0.45, 0.6, 2.0))
    rng = np.random.default_rng(0)
    probability = np.zeros((7, 40, 50), np.float32)
    probability[1:6, 5:35, 10:45] = rng.random((5, 30, 35), dtype=np.float32) ** 4
    probability[3, 20, 20] = 1.0
    path = tmp_path / "x_prob.nii.gz"
    write_probability(path, probability, geometry)
    back = read_volume(path)
    assert back.array.dtype == np.float32 and back.array.shape == probability.shape
    assert np.abs(back.array - probability).max() <= 0.5 / PROBABILITY_LEVELS + 1e-7
    assert back.array[3, 20, 20] == pytest.approx(1.0) and not back.array[0].any()
    np.testing.assert_allclose(back.geometry.spacing, geometry.spacing, atol=1e-6)
    np.testing.assert_allclose(back.geometry.origin, geometry.origin, atol=1e-5)
    np.testing.assert_allclose(back.geometry.direction, geometry.direction, atol=1e-6)
    # the same grid as a float map written the old way
    write_volume(probability, geometry, tmp_path / "float.nii.gz")
    ref = read_volume(tmp_path / "float.nii.gz").geometry
    assert (back.geometry.spacing, back.geometry.origin) == (ref.spacing, ref.origin)


def test_evaluate_scores_the_stored_map_as_the_map_in_memory(tmp_path):
    model = str(save_dark_spot_model(tmp_path / "dark.safetensors"))
    array, geometry, spheres = phantom((5, 100, 120), oblique_geometry((0.45, 0.6, 2.0)))
    result = detect_volume(Volume(array, geometry), DetectionParams(model=model, device="cpu"))
    assert result.lesions
    paths = write_case_outputs(result, tmp_path / "pred", "case")
    truth = (result.labels > 0).astype(np.uint16)
    truth[2, 40:43, 60:63] = 2  # a lesion the detector missed, so the scores are not a perfect match
    write_volume(truth, geometry, tmp_path / "case.nii.gz")
    pair = CasePair("case", truth=tmp_path / "case.nii.gz", prediction=paths["labels"], probability=paths["probability"])
    from_files, histogram = score_pair(pair)
    in_memory = evaluate_arrays("case", truth, result.labels, geometry, result.probability)
    np.testing.assert_allclose(from_files.table.pred_mean_probability, in_memory.table.pred_mean_probability, atol=1e-5)
    roc_files = M.roc_from_histograms(histogram.positive, histogram.negative)
    exact = M.probability_histograms(result.probability, truth)
    roc_memory = M.roc_from_histograms(exact.positive, exact.negative)
    assert roc_memory.auc is not None and 0.5 < roc_memory.auc < 1.0
    assert roc_files.auc == pytest.approx(roc_memory.auc, abs=1e-4)
