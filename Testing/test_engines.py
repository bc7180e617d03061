"""Inference engines: ONNX Runtime gives eager's probabilities and lesions; selection and fallback."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from CMBDetectLib.detection.engines import (
    ENGINES,
    OnnxRuntimeEngine,
    TorchEngine,
    alignment_of,
    cpu_threads,
    make_engine,
    mixed_precision_dtype,
    resolve_engine_name,
)
from CMBDetectLib.detection.inference import default_batch_size, predict_stack
from CMBDetectLib.detection.network import NetworkConfig, ResUNet
from CMBDetectLib.detection.pipeline import DetectionParams, detect_volume
from CMBDetectLib.io import Volume
from CMBDetectLib.models import load_model
from handmade import oblique_geometry, phantom, save_dark_spot_model

pytest.importorskip("onnxruntime")
CPU = torch.device("cpu")


def random_model(seed: int = 5, width: int = 4) -> ResUNet:
    torch.manual_seed(seed)
    net = ResUNet(NetworkConfig(base_channels=width))
    with torch.no_grad():  # non-trivial batch-norm statistics, as a trained model has
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def engines():
    """One export for the module: each costs seconds on a busy 2-core machine."""
    net = random_model()
    return TorchEngine(net, CPU), make_engine(net, CPU, "auto")


@pytest.mark.parametrize("shape", [(1, 3, 96, 96), (2, 3, 64, 128), (3, 3, 200, 36)])
def test_onnxruntime_matches_eager_at_any_crop_size(engines, shape):
    """Dynamic batch, height and width: every crop the head box can ask for."""
    eager_engine, ort_engine = engines
    assert isinstance(ort_engine, OnnxRuntimeEngine)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    eager = eager_engine(x)
    ort = ort_engine(x)
    assert ort.shape == eager.shape == (shape[0], shape[2], shape[3])
    assert np.abs(ort - eager).max() < 1e-4
    assert 0.01 < eager.mean() < 0.99  # the probabilities are not all saturated: the comparison means something


def test_shipped_model_on_onnxruntime_matches_eager():
    net = load_model(None).network
    stack = np.random.default_rng(1).random((2, 384, 384), dtype=np.float32)
    eager = predict_stack(TorchEngine(net, CPU), stack, CPU)
    ort = predict_stack(OnnxRuntimeEngine(net), stack, CPU)
    assert np.abs(ort - eager).max() < 1e-4


def test_engines_give_identical_lesions_on_an_oblique_phantom(tmp_path):
    model = str(save_dark_spot_model(tmp_path / "dark.safetensors"))
    array, geometry, spheres = phantom((4, 110, 130), oblique_geometry((0.45, 0.6, 2.0)))
    volume = Volume(array, geometry)
    results = {e: detect_volume(volume, DetectionParams(model=model, engine=e, device="cpu")) for e in ("torch", "onnxruntime")}
    assert results["torch"].engine == "torch" and results["onnxruntime"].engine == "onnxruntime"
    a, b = results["torch"], results["onnxruntime"]
    assert np.abs(a.probability - b.probability).max() < 1e-4
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(a.lesions) >= 1  # the phantom's dark spheres are found: there is something to compare
    assert [(l.n_voxels, l.centroid_ijk) for l in a.lesions] == [(l.n_voxels, l.centroid_ijk) for l in b.lesions]


def test_auto_picks_onnxruntime_on_cpu_and_torch_on_cuda(engines):
    assert engines[1].name == "onnxruntime"
    assert resolve_engine_name("auto", CPU) == "onnxruntime"
    assert resolve_engine_name("auto", torch.device("cuda")) == "torch"
    assert make_engine(random_model(), CPU, "torch").name == "torch"


def test_auto_falls_back_to_torch_when_onnxruntime_is_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what Python does for a package that is not installed
    with caplog.at_level(logging.WARNING):
        engine = make_engine(random_model(), CPU, "auto")
    assert engine.name == "torch"
    assert "onnxruntime is not installed" in caplog.text
    with pytest.raises(RuntimeError, match="pip install onnxruntime"):  # asked for by name: an error, no fallback
        make_engine(random_model(), CPU, "onnxruntime")


def test_bad_engine_requests_are_refused_clearly():
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine_name("tensorrt", CPU)
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_engine_name("onnxruntime", torch.device("cuda"))
    assert set(ENGINES) == {"auto", "torch", "onnxruntime"}


def test_device_settings_for_cpu_and_gpu():
    """What can be checked without a GPU: fp32 and batch 1 on CPU, mixed precision and batches on CUDA."""
    assert mixed_precision_dtype(CPU) is None
    engine = TorchEngine(random_model(), CPU)
    assert engine.autocast_dtype is None and engine.memory_format == torch.channels_last
    assert default_batch_size(CPU) == 1 and default_batch_size(torch.device("cuda")) == 8
    assert alignment_of(random_model()) == 4  # 3 levels: two 2x poolings
    assert cpu_threads() >= 1
    if torch.cuda.is_available():
        gpu = TorchEngine(random_model(), torch.device("cuda"))
        assert gpu.autocast_dtype in (torch.bfloat16, torch.float16)
        x = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
        assert np.abs(gpu(x) - TorchEngine(random_model(), CPU)(x)).max() < 2e-2  # half precision


def test_onnxruntime_takes_the_process_share_of_the_cores():
    """A cohort worker gets cores / N torch threads (workers.share_threads); its ONNX Runtime
    session must take the same share, not every core of the machine."""
    from CMBDetectLib.detection.engines import OnnxRuntimeEngine

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        session = OnnxRuntimeEngine(random_model()).session
        assert session.get_session_options().intra_op_num_threads == 1
        torch.set_num_threads(2)
        assert OnnxRuntimeEngine(random_model()).session.get_session_options().intra_op_num_threads == 2
    finally:
        torch.set_num_threads(before)
