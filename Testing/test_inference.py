"""2.5D inference: neighbours, determinism, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from CMBDetectLib.detection.inference import Cancelled, neighbour_indices, predict_stack, prepare_for_inference, select_device
from CMBDetectLib.detection.network import NetworkConfig, ResUNet


def test_neighbours_replicate_at_the_edges():
    np.testing.assert_array_equal(neighbour_indices(4), [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
    np.testing.assert_array_equal(neighbour_indices(1), [[0, 0, 0]])


def small_model(seed=3) -> ResUNet:
    torch.manual_seed(seed)
    net = ResUNet(NetworkConfig(base_channels=4))
    with torch.no_grad():  # non-trivial BN statistics, as a trained model has
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return prepare_for_inference(net, torch.device("cpu"))


def test_inference_is_deterministic_and_batch_independent():
    stack = np.random.default_rng(0).random((7, 96, 96), dtype=np.float32)
    model, cpu = small_model(), torch.device("cpu")
    a = predict_stack(model, stack, cpu, batch_size=1)
    b = predict_stack(model, stack, cpu, batch_size=1)
    c = predict_stack(model, stack, cpu, batch_size=3)
    assert a.tobytes() == b.tobytes()
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert a.shape == stack.shape and 0 <= a.min() and a.max() <= 1


def test_each_slice_sees_its_own_neighbours():
    """Slice i's output equals the network applied to stack[[i-1, i, i+1]]."""
    stack = np.random.default_rng(1).random((5, 64, 64), dtype=np.float32)
    model, cpu = small_model(), torch.device("cpu")
    out = predict_stack(model, stack, cpu, batch_size=2)
    with torch.inference_mode():
        for i, idx in enumerate(([0, 0, 1], [1, 2, 3], [3, 4, 4])):
            k = [0, 2, 4][i]
            x = torch.from_numpy(stack[idx][None]).contiguous(memory_format=torch.channels_last)
            np.testing.assert_allclose(out[k], torch.sigmoid(model(x))[0, 0].numpy(), atol=1e-5)


def test_progress_and_cancel():
    stack = np.zeros((4, 32, 32), np.float32)
    seen = []
    predict_stack(small_model(), stack, torch.device("cpu"), 1, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(Cancelled):
        predict_stack(small_model(), stack, torch.device("cpu"), 1, cancel=lambda: True)


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA was requested"):
            select_device("cuda")
    with pytest.raises(ValueError):
        select_device("tpu")
