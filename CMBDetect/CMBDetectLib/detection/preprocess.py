"""The paper's SWI preprocessing, and its inverse for the probability map.

Fan et al. 2022: "scaling the global (3D) image intensities ... normalization and alignment
based on the histogram peaks to the white matter ... All images were cropped into squares
according to the shortest side, and ... resized to 384x384 pixels. According to the
histogram, we deleted fewer points (less than 1e-4), and the window width was determined
and then max-min normalized."

Slices are the array's first axis (k), kept in scan order; every step is in-plane. Training
and inference both call `preprocess`, and the model card records the constants below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage, sparse
from skimage.filters import threshold_otsu
from skimage.transform import resize

from ..errors import CaseError

PLANE_SIZE = 384  # in-plane size the network sees
TAIL_FRACTION = 1e-4  # histogram bins holding fewer than this fraction of voxels are cut off the window ends
WINDOW_BINS = 1024  # bins of the histogram that sets the window
WM_PEAK_TARGET = 1.0  # the white-matter histogram peak is scaled to this value
PEAK_BINS = 256  # bins of the foreground histogram searched for the white-matter peak
PEAK_SMOOTHING_BINS = 2.0  # Gaussian smoothing (in bins) so noise does not make a false peak
FOREGROUND_SAMPLE_STRIDE = 3  # Otsu on every 3rd voxel per axis: same threshold, 27x less work
SQUARE_MODE = "crop"  # the paper crops to the shortest side; "pad" keeps the whole field of view


def constants() -> dict[str, object]:
    """The preprocessing constants, for the model card."""
    return {
        "plane_size": PLANE_SIZE,
        "tail_fraction": TAIL_FRACTION,
        "window_bins": WINDOW_BINS,
        "wm_peak_target": WM_PEAK_TARGET,
        "peak_bins": PEAK_BINS,
        "peak_smoothing_bins": PEAK_SMOOTHING_BINS,
        "square_mode": SQUARE_MODE,
        "slice_axis": "k (array axis 0), scan order",
    }


@dataclass(frozen=True)
class PreprocessInfo:
    """What `restore` needs to map network outputs back onto the native grid."""

    native_shape: tuple[int, int, int]  # (slices, rows, columns)
    square: tuple[int, int, int]  # (row0, col0, side): the square in native pixels; may reach outside when padding
    wm_peak: float  # native intensity of the white-matter peak
    window: tuple[float, float]  # (low, high) in WM-scaled units, mapped to 0 and 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def check_volume(array: np.ndarray, case: str) -> None:
    """Refuse what preprocessing cannot make sense of, naming the case and the problem."""
    if array.ndim != 3:
        raise CaseError(case, f"image is {array.ndim}D (shape {array.shape}); a 3D volume is needed")
    if array.size == 0 or min(array.shape) == 0:
        raise CaseError(case, f"volume is empty (shape {array.shape})")
    if min(array.shape[1:]) < 16:
        raise CaseError(case, f"slices of {array.shape[1]}x{array.shape[2]} pixels are too small to be SWI slices")
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise CaseError(case, f"volume has {bad} NaN or infinite voxels")
    lo, hi = float(array.min()), float(array.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise CaseError(case, f"volume is constant (every voxel is {lo:g}): nothing to detect")


def white_matter_peak(array: np.ndarray) -> float:
    """Intensity of the white-matter peak: the mode of the head's (above-Otsu) histogram.

    On SWI magnitude, white matter is the largest tissue class above the air background,
    so the highest bin of the smoothed foreground histogram is its peak.
    """
    s = FOREGROUND_SAMPLE_STRIDE
    sample = array[::s, ::s, ::s].ravel()
    if np.ptp(sample) == 0:
        sample = array.ravel()
    threshold = threshold_otsu(sample)
    head = sample[sample > threshold]
    if head.size < PEAK_BINS:
        head = array.ravel()[array.ravel() > threshold]
    lo, hi = np.percentile(head, [0.5, 99.5])
    if hi <= lo:
        return float(np.median(head))
    counts, edges = np.histogram(head, bins=PEAK_BINS, range=(lo, hi))
    smooth = ndimage.gaussian_filter1d(counts.astype(float), PEAK_SMOOTHING_BINS)
    peak = int(np.argmax(smooth))
    value = 0.5 * (edges[peak] + edges[peak + 1])
    return float(value) if value > 0 else float(hi)


def intensity_window(scaled: np.ndarray) -> tuple[float, float]:
    """The window left when histogram bins holding < TAIL_FRACTION of voxels are cut from both ends."""
    lo, hi = float(scaled.min()), float(scaled.max())
    counts, edges = np.histogram(scaled, bins=WINDOW_BINS, range=(lo, hi))
    kept = np.flatnonzero(counts >= TAIL_FRACTION * scaled.size)
    if kept.size == 0:
        return lo, hi
    return float(edges[kept[0]]), float(edges[kept[-1] + 1])


def normalise_intensity(array: np.ndarray) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Scale to the white-matter peak, window by the histogram tails, min-max to [0, 1].

    The min-max step cancels the global scale for the network's input; the scaling is kept
    because the window is found on the scaled histogram, and the peak is a useful record of
    the acquisition's intensity level.
    """
    peak = white_matter_peak(array)
    scaled = array * np.float32(WM_PEAK_TARGET / peak)
    low, high = intensity_window(scaled)
    if high <= low:
        high = low + 1e-6
    out = np.clip(scaled, low, high, out=scaled)  # in place: one volume-sized copy, not two
    out -= np.float32(low)
    out *= np.float32(1.0 / (high - low))
    return out.astype(np.float32, copy=False), peak, (low, high)


def square_box(rows: int, cols: int, mode: str = SQUARE_MODE) -> tuple[int, int, int]:
    """(row0, col0, side) of the centred square: the shortest side when cropping, the longest when padding."""
    if mode == "crop":
        side = min(rows, cols)
    elif mode == "pad":
        side = max(rows, cols)
    else:
        raise ValueError(f"square mode must be 'crop' or 'pad', not {mode!r}")
    return (rows - side) // 2, (cols - side) // 2, side


def _take_square(stack: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    r0, c0, side = box
    k, rows, cols = stack.shape
    if r0 >= 0 and c0 >= 0:
        return stack[:, r0 : r0 + side, c0 : c0 + side]
    # Padding: the square reaches outside the image; fill with the image's minimum (air).
    out = np.full((k, side, side), stack.min(), dtype=stack.dtype)
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + side, rows), min(c0 + side, cols)
    out[:, rs - r0 : re - r0, cs - c0 : ce - c0] = stack[:, rs:re, cs:ce]
    return out


RESIZE_SLAB = 8  # slices resized at a time: skimage works in float64, so whole volumes would cost 2-3x their size


def resize_plane(stack: np.ndarray, size: int, antialias: bool) -> np.ndarray:
    """Bilinear in-plane resize of a (k, s, s) stack to (k, size, size), pixel centres aligned.

    In slabs of slices: the resize never mixes slices (scale 1 and no smoothing along k), so
    this equals resizing the whole stack at once, with float64 temporaries a slab in size.
    """
    if stack.shape[1:] == (size, size):
        return stack.astype(np.float32, copy=False)
    out = np.empty((stack.shape[0], size, size), dtype=np.float32)
    for k in range(0, stack.shape[0], RESIZE_SLAB):
        slab = stack[k : k + RESIZE_SLAB]
        out[k : k + RESIZE_SLAB] = resize(
            slab,
            (slab.shape[0], size, size),
            order=1,
            mode="edge",
            anti_aliasing=antialias and stack.shape[1] > size,
            preserve_range=True,
        )
    return out


def preprocess(array: np.ndarray, case: str = "volume", square_mode: str = SQUARE_MODE) -> tuple[np.ndarray, PreprocessInfo]:
    """Native SWI volume (k, rows, cols) to the network's (k, 384, 384) stack in [0, 1]."""
    check_volume(array, case)
    normalised, peak, window = normalise_intensity(np.asarray(array, dtype=np.float32))
    box = square_box(array.shape[1], array.shape[2], square_mode)
    stack = resize_plane(_take_square(normalised, box), PLANE_SIZE, antialias=True)
    return stack, PreprocessInfo(tuple(array.shape), box, peak, window)  # type: ignore[arg-type]


def to_plane(mask: np.ndarray, info: PreprocessInfo) -> np.ndarray:
    """A native-grid label or mask to the network's plane (training targets): > 0.5 after bilinear resize."""
    square = _take_square((np.asarray(mask) > 0).astype(np.float32), info.square)
    return (resize_plane(square, PLANE_SIZE, antialias=False) > 0.5).astype(np.float32)


def linear_weights(n_in: int, n_out: int) -> sparse.csr_matrix:
    """(n_out, n_in) matrix of the bilinear resize along one axis, as `resize_plane` does it.

    Pixel centres aligned: output j samples input (j + 0.5) * n_in / n_out - 0.5, clamped to the
    edge pixels (skimage's order=1, mode="edge", without anti-aliasing).
    """
    x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1.0)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = x - i0
    rows = np.repeat(np.arange(n_out), 2)
    cols = np.stack([i0, i1], axis=1).ravel()
    vals = np.stack([1.0 - w, w], axis=1).ravel()
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_out, n_in))


def _hit_range(weights: sparse.csr_matrix, lo: int, hi: int) -> tuple[sparse.csr_matrix, int, int]:
    """The rows of `weights` that read inputs lo..hi-1, as a contiguous range o0..o1."""
    sub = weights[:, lo:hi].tocsr()
    hit = np.flatnonzero(np.diff(sub.indptr))
    if hit.size == 0:
        return sub[:0], 0, 0
    o0, o1 = int(hit[0]), int(hit[-1]) + 1
    return sub[o0:o1], o0, o1


def restore(probability: np.ndarray, info: PreprocessInfo) -> np.ndarray:
    """Inverse of the geometric steps: (k, 384, 384) probabilities back onto (k, rows, cols).

    Pixels cropped away by the square were never seen by the network and get probability 0.
    The bilinear resize is the separable sparse operator of `linear_weights`, applied per slice
    only to the block that holds non-zero probabilities (the head's box): zeros resize to zeros,
    so this equals resizing the whole plane, at a fraction of the work.
    """
    k, rows, cols = info.native_shape
    if probability.shape != (k, PLANE_SIZE, PLANE_SIZE):
        raise ValueError(f"probability stack {probability.shape} does not match {(k, PLANE_SIZE, PLANE_SIZE)}")
    r0, c0, side = info.square
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + side, rows), min(c0 + side, cols)
    out = np.zeros(info.native_shape, dtype=np.float32)
    if side == PLANE_SIZE:
        out[:, rs:re, cs:ce] = probability[:, rs - r0 : re - r0, cs - c0 : ce - c0]
        return np.clip(out, 0.0, 1.0, out=out)
    weights = linear_weights(PLANE_SIZE, side)
    w_rows = weights[rs - r0 : re - r0]  # only the square's rows and columns inside the image
    w_cols = weights[cs - c0 : ce - c0]
    any_rows = probability.any(axis=2)
    any_cols = probability.any(axis=1)
    for z in range(k):
        r = np.flatnonzero(any_rows[z])
        if r.size == 0:
            continue
        c = np.flatnonzero(any_cols[z])
        a0, a1, b0, b1 = int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
        wr, o0, o1 = _hit_range(w_rows, a0, a1)
        wc, p0, p1 = _hit_range(w_cols, b0, b1)
        if o1 <= o0 or p1 <= p0:
            continue
        block = wr @ probability[z, a0:a1, b0:b1].astype(np.float64)  # (o1-o0, b1-b0)
        block = (wc @ block.T).T  # (o1-o0, p1-p0)
        out[z, rs + o0 : rs + o1, cs + p0 : cs + p1] = np.clip(block, 0.0, 1.0)
    return out
