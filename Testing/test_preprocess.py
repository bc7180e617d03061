"""The paper's preprocessing and its inverse."""

from __future__ import annotations

import numpy as np
import pytest

from CMBDetectLib.detection import preprocess as pp
from CMBDetectLib.errors import CaseError


def tissue_volume(shape=(6, 120, 150), wm=500.0, gm=380.0, seed=0) -> np.ndarray:
    """Air, then GM and (more) WM with noise, and a few hot outliers."""
    rng = np.random.default_rng(seed)
    k, r, c = shape
    a = rng.normal(10, 3, shape)
    jj, ii = np.mgrid[0:r, 0:c]
    dist = ((jj - r / 2) / (0.45 * r)) ** 2 + ((ii - c / 2) / (0.45 * c)) ** 2
    a[:, dist < 1] = rng.normal(gm, 15, (k, int((dist < 1).sum())))
    a[:, dist < 0.6] = rng.normal(wm, 15, (k, int((dist < 0.6).sum())))
    a[0, 5, 5] = 40 * wm  # a hot spike the histogram tail must cut off
    return np.abs(a).astype(np.float32)


def test_white_matter_peak_is_found():
    for wm in (300.0, 500.0, 2500.0):
        peak = pp.white_matter_peak(tissue_volume(wm=wm, gm=0.76 * wm))
        assert abs(peak - wm) / wm < 0.03


def test_window_cuts_sparse_tails_and_output_spans_unit_range():
    a = tissue_volume()
    out, peak, (lo, hi) = pp.normalise_intensity(a)
    assert out.min() == 0.0 and out.max() == 1.0
    assert hi < 40.0  # the lone spike (40x the WM peak) lies outside the window
    assert out[0, 5, 5] == 1.0  # and is clipped to the top
    # white matter sits in the upper part of the window, air at the bottom
    assert out[:, 60, 75].mean() > 0.6 and out[:, 0, 0].mean() < 0.1


def test_normalisation_ignores_global_scale():
    a = tissue_volume()
    np.testing.assert_allclose(pp.normalise_intensity(a)[0], pp.normalise_intensity(a * 7.3)[0], atol=2e-3)


@pytest.mark.parametrize("rows,cols,mode,expected", [
    (300, 240, "crop", (30, 0, 240)),
    (240, 300, "crop", (0, 30, 240)),
    (256, 256, "crop", (0, 0, 256)),
    (300, 240, "pad", (0, -30, 300)),
])  # fmt: skip
def test_square_box(rows, cols, mode, expected):
    assert pp.square_box(rows, cols, mode) == expected


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("shape", [(5, 300, 240), (5, 224, 256), (5, 512, 512), (5, 200, 200)])
def test_restore_maps_network_plane_back_to_native_pixels(shape, mode):
    """A spot put in at native (r, c) comes back from the 384 plane at (r, c)."""
    a = tissue_volume(shape)
    r, c = shape[1] // 2 + 17, shape[2] // 2 - 23
    a[2, r - 1 : r + 2, c - 1 : c + 2] = 0.0
    stack, info = pp.preprocess(a, square_mode=mode)
    assert stack.shape == (shape[0], pp.PLANE_SIZE, pp.PLANE_SIZE) and stack.dtype == np.float32
    dark = np.zeros_like(a)
    dark[2, r - 1 : r + 2, c - 1 : c + 2] = 1.0
    marked = pp.to_plane(dark, info)
    back = pp.restore(marked, info)
    assert back.shape == shape
    peak = np.unravel_index(np.argmax(back), back.shape)
    assert peak[0] == 2 and abs(peak[1] - r) <= 1 and abs(peak[2] - c) <= 1
    # the darkest spot of the network's input is where the native dark spot was
    spot = np.array(np.unravel_index(np.argmax(marked[2]), marked[2].shape))
    y, x = spot
    around = stack[2, y - 10 : y + 11, x - 10 : x + 11]
    assert stack[2, y, x] < 0.5 * np.median(around)


def test_restore_of_smooth_map_is_close_to_identity():
    shape = (3, 200, 200)
    a = tissue_volume(shape)
    _, info = pp.preprocess(a)
    yy, xx = np.mgrid[0:200, 0:200]
    smooth = (0.5 + 0.4 * np.sin(yy / 25.0) * np.cos(xx / 31.0))[None].repeat(3, 0).astype(np.float32)
    back = pp.restore(pp.resize_plane(smooth, pp.PLANE_SIZE, antialias=False), info)
    np.testing.assert_allclose(back[:, 2:-2, 2:-2], smooth[:, 2:-2, 2:-2], atol=2e-3)


def test_crop_discards_outside_and_restore_gives_zero_there():
    a = tissue_volume((3, 300, 240))
    _, info = pp.preprocess(a, square_mode="crop")
    back = pp.restore(np.ones((3, 384, 384), np.float32), info)
    assert back[:, :30].max() == 0 and back[:, 270:].max() == 0 and back[:, 30:270].min() == 1


def test_slices_stay_in_scan_order():
    a = tissue_volume((5, 100, 100))
    for k in range(5):
        a[k, 50, 50] = 0.0 if k == 3 else a[k, 50, 50]
    stack, _ = pp.preprocess(a)
    centre = stack[:, 192, 192]
    assert np.argmin(centre) == 3


@pytest.mark.parametrize("array,problem", [
    (np.ones((4, 5), np.float32), "2D"),
    (np.ones((2, 3, 4, 5), np.float32), "4D"),
    (np.ones((0, 32, 32), np.float32), "empty"),
    (np.full((4, 32, 32), 7.0, np.float32), "constant"),
    (np.ones((4, 8, 8), np.float32), "too small"),
])  # fmt: skip
def test_bad_volumes_name_case_and_problem(array, problem):
    with pytest.raises(CaseError, match=f"^case7: .*{problem}"):
        pp.preprocess(array, case="case7")


def test_nan_refused():
    a = tissue_volume((3, 40, 40))
    a[1, 1, 1] = np.inf
    with pytest.raises(CaseError, match="1 NaN or infinite"):
        pp.preprocess(a, case="x")


@pytest.mark.parametrize("shape, size, antialias", [((11, 200, 200), 384, True), ((10, 520, 520), 384, True), ((9, 384, 384), 150, False)])
def test_resize_in_slabs_equals_resizing_the_whole_stack(shape, size, antialias):
    from skimage.transform import resize

    a = np.random.default_rng(0).random(shape, dtype=np.float32)
    whole = resize(a, (shape[0], size, size), order=1, mode="edge", anti_aliasing=antialias and shape[1] > size, preserve_range=True)
    np.testing.assert_array_equal(pp.resize_plane(a, size, antialias), whole.astype(np.float32))


@pytest.mark.parametrize("shape, mode", [((5, 768, 624), "crop"), ((5, 200, 150), "pad"), ((5, 500, 90), "pad"), ((5, 300, 300), "crop")])
def test_restore_equals_resizing_the_whole_plane(shape, mode):
    """The sparse, box-only back-projection against the plain whole-plane resize it replaced."""
    rng = np.random.default_rng(1)
    prob = np.zeros((shape[0], pp.PLANE_SIZE, pp.PLANE_SIZE), np.float32)
    prob[1:4, 50:300, 70:330] = rng.random((3, 250, 260), dtype=np.float32)
    prob[2, :10, 370:] = 1.0  # touching the plane's edge
    info = pp.PreprocessInfo(shape, pp.square_box(shape[1], shape[2], mode), 1.0, (0.0, 1.0))
    r0, c0, side = info.square
    square = pp.resize_plane(prob, side, antialias=False)
    expected = np.zeros(shape, np.float32)
    rs, cs, re, ce = max(r0, 0), max(c0, 0), min(r0 + side, shape[1]), min(c0 + side, shape[2])
    expected[:, rs:re, cs:ce] = square[:, rs - r0 : re - r0, cs - c0 : ce - c0]
    got = pp.restore(prob, info)
    assert np.abs(got - np.clip(expected, 0, 1)).max() < 1e-6
    assert not got[0].any() and not got[4].any()
