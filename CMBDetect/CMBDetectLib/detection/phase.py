"""The phase image the candidate stage accepts: high-pass filtered phase in radians.

Checked before anything else runs (the command line, the worker and the Slicer module all
check it first), so that a phase in scanner units fails in a second instead of after the whole
U-Net. Torch-free: Slicer's own process checks the phase it already holds.
"""

from __future__ import annotations

import numpy as np

# Beyond this the image is not phase in radians (scanner units such as +-4096, or unfiltered
# unwrapped phase): refused rather than clipped into nonsense.
PHASE_LIMIT_RAD = 2.0 * np.pi


def check_phase(phase: np.ndarray | None, image_shape: tuple[int, ...]) -> None:
    """ValueError unless `phase` is finite, radians (within +-2 pi) and on the image's grid shape."""
    if phase is None:
        return
    if phase.shape != tuple(image_shape):
        raise ValueError(f"phase image has shape {phase.shape} but the SWI image {tuple(image_shape)}; it must lie on the same grid")
    if not np.isfinite(phase).all():
        raise ValueError("phase image contains NaN or infinite values")
    peak = float(np.abs(phase).max(initial=0.0))
    if peak > PHASE_LIMIT_RAD:
        raise ValueError(
            f"phase image values reach {peak:.4g}: the candidate stage expects high-pass filtered phase in radians "
            "(within -pi..pi); rescale it first (scanner units of -4096..4096 are value x pi/4096)"
        )
