"""Simple microbleeds planted into training patches: an appearance no generator owns.

Every bleed the classifier sees in training comes from one renderer (cmbdetect synth's dipole
simulation), and a network learns that renderer's look: the 0.4.0 classifier rejected a
plain dark sphere, or a Gaussian dark blob of 3 mm, planted in a synthetic brain, as a
calcification or a nucleus 86% of the time (README "The default model"). Another
simulator, or a scanner, draws bleeds otherwise. So some training samples get a bleed of the
simplest kinds planted at their centre and are labelled microbleed: a sphere or ellipsoid
with partial-volume edges, or a Gaussian blob, of 2-8 mm, 35-95 % signal loss, blurred as a
thick slice or a coarse grid would blur it. Their phase is withheld (the planted bleed has
none), so with phase the classifier still learns from the simulated dipoles.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

DIAMETER_MM = (2.0, 8.0)  # drawn log-uniformly: small bleeds are the common ones
DEPTH = (0.35, 0.95)  # fraction of the signal the bleed's core removes
KINDS = ("sphere", "ellipsoid", "gaussian")


def lesion_profile(size: int, spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """(S, S, S) signal loss in [0, 1] of one random simple lesion near the patch centre."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    diameter = float(np.exp(rng.uniform(*np.log(DIAMETER_MM))))
    offsets = (np.arange(size) - (size - 1) / 2.0) * spacing_mm
    grid = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), axis=-1)
    grid = grid - rng.uniform(-0.5, 0.5, 3) * spacing_mm  # off the voxel grid
    axes = np.full(3, diameter / 2.0)
    if kind == "ellipsoid":
        axes = axes * rng.uniform(0.6, 1.0, 3)
        axes *= diameter / 2.0 / axes.max()
    local = grid @ Rotation.from_quat(rng.normal(size=4)).as_matrix()  # a uniform random rotation
    d = np.linalg.norm(local / axes, axis=-1)  # 1 on the surface
    if kind == "gaussian":
        profile = np.exp2(-(d**2))  # half the loss at the nominal radius
    else:
        # Partial volume: a one-voxel linear ramp across the surface.
        profile = np.clip((1.0 - d) * axes.min() / spacing_mm + 0.5, 0.0, 1.0)
    # Thick slices blur along S (array axis 0), a coarse in-plane grid along the other two.
    # Scaled back to a peak of 1: blurring widens and softens the bleed, and `depth` alone says
    # how dark its core is (a planted bleed too faint to see would be a wrong label).
    sigma = (rng.uniform(0.0, 2.0), *([rng.uniform(0.0, 0.8)] * 2))
    blurred = ndimage.gaussian_filter(profile, sigma)
    return (blurred / max(float(blurred.max()), 1e-6)).astype(np.float32)


def plant(magnitude: np.ndarray, spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """`magnitude` (S, S, S) with a simple bleed multiplied in at its centre."""
    loss = lesion_profile(magnitude.shape[0], spacing_mm, rng)
    return (magnitude * (1.0 - rng.uniform(*DEPTH) * loss)).astype(np.float32)
