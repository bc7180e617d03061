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


# --- Work only where the head is (head.py) -------------------------------------------------

from CMBDetectLib.detection.head import HALO_PX, Box, head_boxes, work_fraction  # noqa: E402
from CMBDetectLib.detection.pipeline import DetectionParams, detect_volume  # noqa: E402
from CMBDetectLib.io import Geometry, Volume  # noqa: E402
from handmade import oblique_geometry  # noqa: E402


def head_volume(shape, radii=(0.42, 0.40), centre=(0.5, 0.5), empty=(), seed=0):
    """SWI-like slices: noisy air, a bright elliptical head (radii, centre as fractions of rows and
    columns, so it may run out of the image), darker veins and two dark spots; `empty` slices are air."""
    rng = np.random.default_rng(seed)
    k, rows, cols = shape
    jj, ii = np.mgrid[0:rows, 0:cols]
    head = ((jj - centre[0] * rows) / (radii[0] * rows)) ** 2 + ((ii - centre[1] * cols) / (radii[1] * cols)) ** 2 < 1
    array = np.where(head, 400.0, 6.0)[None].repeat(k, axis=0) + rng.normal(0, 8, shape)
    array[:, rows // 2 - 1 : rows // 2 + 1, cols // 4 : cols // 2] *= 0.5  # a vein
    array[k // 2, rows // 2 + 6 : rows // 2 + 9, cols // 2 + 5 : cols // 2 + 8] = 12.0
    array[k // 2, rows // 3 : rows // 3 + 4, cols // 2 : cols // 2 + 4] = 12.0
    head3d = np.repeat(head[None], k, axis=0)
    for z in empty:
        array[z] = np.abs(rng.normal(0, 8, (rows, cols)))
        head3d[z] = False
    return np.abs(array).astype(np.float32), head3d


def test_head_boxes_are_aligned_cover_the_head_and_skip_air():
    stack = np.zeros((6, 384, 384), np.float32)
    stack[2:5, 100:250, 60:300] = 0.8  # head tissue on slices 2-4
    stack[1:5, 5, 380] = 0.9  # a single speckle of noise in the air
    stack += np.random.default_rng(0).random(stack.shape, dtype=np.float32) * 0.05
    boxes = head_boxes(stack, alignment=4)
    assert boxes[0] is None  # two slices from any head tissue: skipped
    assert boxes[1] == boxes[2]  # next to a head slice: run with its neighbour's box
    for b in boxes[1:5]:
        assert b is not None
        assert all(v % 4 == 0 for v in (b.r0, b.r1, b.c0, b.c1))
        assert b.r0 <= 100 - HALO_PX and b.r1 >= 250 + HALO_PX and b.c0 <= 60 - HALO_PX and b.c1 >= 300 + HALO_PX
        assert b.r0 > 100 - HALO_PX - 8 and b.c1 < 300 + HALO_PX + 8  # the speckle did not stretch it
    assert boxes[5] is not None  # next to slice 4
    assert 0 < work_fraction(boxes, stack.shape) < 0.5


def test_boxes_without_head_tissue_compute_nothing():
    stack = np.random.default_rng(2).random((3, 64, 64), dtype=np.float32)
    out = predict_stack(small_model(), stack, torch.device("cpu"), boxes=[None, Box(8, 32, 4, 60), None])
    assert not out[0].any() and not out[2].any()
    assert not out[1, :8].any() and not out[1, :, 60:].any() and out[1, 8:32, 4:60].all()


@pytest.mark.parametrize(
    "case",
    [
        # oblique, anisotropic grid; rectangular in-plane matrix (cropped to its square)
        dict(shape=(3, 160, 200), geometry=oblique_geometry((0.45, 0.6, 2.0))),
        # anisotropic, off-centre head, padded FOV larger than the head
        dict(shape=(3, 300, 260), geometry=Geometry((0.9, 0.7, 3.0), (0.0, 0.0, 0.0)), radii=(0.3, 0.28), centre=(0.45, 0.55)),
        # partial coverage: the head runs out of the image, and the top slices hold no head
        dict(shape=(4, 180, 180), geometry=oblique_geometry((0.5, 0.5, 1.5)), radii=(0.62, 0.45), empty=(0, 1)),
    ],
    ids=["oblique", "anisotropic", "partial-coverage"],
)
def test_head_only_pass_equals_the_dense_pass_inside_the_head(case):
    """The shipped model over the head's boxes against the dense pass, on the native grid."""
    array, head = head_volume(case["shape"], case.get("radii", (0.42, 0.40)), case.get("centre", (0.5, 0.5)), case.get("empty", ()))
    volume = Volume(array, case["geometry"])
    dense = detect_volume(volume, DetectionParams(device="cpu", head_only=False))
    cropped = detect_volume(volume, DetectionParams(device="cpu", head_only=True))
    assert head.any()
    assert np.abs(cropped.probability[head] - dense.probability[head]).max() < 1e-4
    np.testing.assert_array_equal(cropped.labels, dense.labels)
    assert [(l.n_voxels, l.centroid_ijk) for l in cropped.lesions] == [(l.n_voxels, l.centroid_ijk) for l in dense.lesions]
    for z in case.get("empty", ())[:-1]:  # air slices beyond the one-slice margin are not computed
        assert not cropped.probability[z].any()
    assert cropped.probability.dtype == np.float32 and cropped.probability.shape == array.shape


def test_head_only_pass_finds_the_same_lesions(tmp_path):
    """A network that marks dark spots: lesions exist, and both passes find exactly the same ones."""
    from handmade import save_dark_spot_model

    model = str(save_dark_spot_model(tmp_path / "dark.safetensors"))
    array, head = head_volume((4, 150, 170))
    volume = Volume(array, oblique_geometry((0.45, 0.6, 2.0)))
    dense = detect_volume(volume, DetectionParams(device="cpu", head_only=False, model=model))
    cropped = detect_volume(volume, DetectionParams(device="cpu", head_only=True, model=model))
    assert len(dense.lesions) >= 1
    np.testing.assert_array_equal(cropped.labels, dense.labels)
    assert [(l.n_voxels, l.centroid_ijk, l.max_probability) for l in cropped.lesions] == [
        (l.n_voxels, l.centroid_ijk, l.max_probability) for l in dense.lesions
    ]


def test_no_head_found_anywhere_means_the_dense_pass():
    stack = np.zeros((3, 384, 384), np.float32)
    stack[:, ::37, ::41] = 1.0  # only isolated bright pixels: nothing the size of a head
    assert all(b == Box(0, 384, 0, 384) for b in head_boxes(stack, alignment=4))
