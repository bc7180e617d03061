"""Where the head sits in the scanner: a random pose, scaling and smooth deformation per case.

The chain, from the scanner's LPS millimetres y to MNI millimetres p (RAS):

    q = c + F S^-1 R^T (y - t)        rigid pose and anisotropic scaling about the head centre c
    p = q + u(y)                       a smooth random displacement u (MNI mm)

F flips LPS to RAS, S = diag(scale), R a rotation (pitch, roll, yaw), t the scanner position of
the head centre. u lives on a coarse lattice (15 mm) in scanner space, so evaluating it on an
acquisition grid is a separable linear interpolation. Images are pulled back through this
chain (every acquisition voxel looks up the template); points (vein centrelines, calcification
sites) are pushed forward by solving q + u(y) = p with a few fixed-point steps, which converge
because u is smooth and small (displacement gradients well below 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.interpolate import interp1d
from scipy.spatial.transform import Rotation

from .anatomy import HEAD_CENTRE_MNI, MNI_ORIGIN_IJK, PAD_INFERIOR

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
LATTICE_SPACING_MM = 15.0
LATTICE_HALF_EXTENT_MM = 135.0


@dataclass(frozen=True)
class Warp:
    rotation: np.ndarray  # 3x3, scanner frame
    scale: np.ndarray  # (3,) along the head's x, y, z
    translation: np.ndarray  # (3,) scanner LPS mm of the head centre
    lattice_origin: np.ndarray  # (3,) scanner LPS mm of lattice node (0, 0, 0), (x, y, z)
    displacement: np.ndarray  # (3, nz, ny, nx) MNI mm, components (x, y, z), lattice (z, y, x)
    angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def head_to_scanner(self) -> np.ndarray:
        """3x3 linear part taking MNI offsets from the head centre to scanner LPS offsets."""
        return self.rotation @ np.diag(self.scale) @ RAS_TO_LPS

    def displacement_at(self, lps: np.ndarray) -> np.ndarray:
        """u(y) at scanner points (N, 3) -> (N, 3) MNI mm."""
        idx = ((np.atleast_2d(lps) - self.lattice_origin) / LATTICE_SPACING_MM)[:, ::-1].T
        return np.stack(
            [ndimage.map_coordinates(c, idx, order=1, mode="nearest") for c in self.displacement], -1
        )

    def scanner_to_mni(self, lps: np.ndarray) -> np.ndarray:
        lps = np.atleast_2d(np.asarray(lps, dtype=float))
        inv = np.linalg.inv(self.head_to_scanner)
        q = HEAD_CENTRE_MNI + (lps - self.translation) @ inv.T
        return q + self.displacement_at(lps)

    def mni_to_scanner(self, mni: np.ndarray, iterations: int = 8) -> np.ndarray:
        mni = np.atleast_2d(np.asarray(mni, dtype=float))
        a = self.head_to_scanner
        y = self.translation + (mni - HEAD_CENTRE_MNI) @ a.T
        for _ in range(iterations):
            y = self.translation + (mni - self.displacement_at(y) - HEAD_CENTRE_MNI) @ a.T
        return y

    def template_coordinates(
        self, origin: np.ndarray, spacing: np.ndarray, k: np.ndarray, j: np.ndarray, i: np.ndarray
    ) -> np.ndarray:
        """Padded-template array coordinates (3, len(k), len(j), len(i)) in (k, j, i) order of
        the acquisition grid points with (possibly fractional) indices k, j, i.

        The grid's direction is the identity (axial slices in scanner LPS), so the pose part
        is a sum of per-axis terms and the displacement a separable interpolation."""
        axes = [np.asarray(v, dtype=float) * s + o for v, s, o in zip((i, j, k), spacing, origin)]  # x, y, z
        inv = np.linalg.inv(self.head_to_scanner)
        shape = (len(k), len(j), len(i))
        lattice_axes = [
            self.lattice_origin[d] + LATTICE_SPACING_MM * np.arange(self.displacement.shape[3 - d]) for d in range(3)
        ]
        # Interpolation matrices from lattice nodes to grid points, one per axis (x, y, z).
        weights = [
            interp1d(lat, np.eye(len(lat), dtype=np.float32), axis=0, bounds_error=False,
                     fill_value=(np.eye(len(lat))[0], np.eye(len(lat))[-1]))(ax).astype(np.float32)
            for lat, ax in zip(lattice_axes, axes)
        ]
        out = np.empty((3,) + shape, np.float32)
        # MNI component m (x, y, z) -> template array axis (i, j, k): axis index 2 - m
        offsets = MNI_ORIGIN_IJK + np.array([0.0, 0.0, PAD_INFERIOR])
        for m in range(3):
            u = self.displacement[m]  # (nz, ny, nx)
            u = np.tensordot(u, weights[0], axes=([2], [1]))  # (nz, ny, I)
            u = np.tensordot(weights[1], u, axes=([1], [1])).transpose(1, 0, 2)  # (nz, J, I)
            u = np.tensordot(weights[2], u, axes=([1], [0]))  # (K, J, I)
            const = HEAD_CENTRE_MNI[m] - inv[m] @ self.translation + offsets[m]
            terms = [inv[m, d] * axes[d] for d in range(3)]  # x, y, z contributions
            u += const
            u += terms[2].astype(np.float32)[:, None, None]
            u += terms[1].astype(np.float32)[None, :, None]
            u += terms[0].astype(np.float32)[None, None, :]
            out[2 - m] = u
        return out


def sample_warp(
    rng: np.random.Generator, translation: np.ndarray, deformation_mm: float | None = None
) -> Warp:
    """A random head pose (pitch +-12, roll +-5, yaw +-6 degrees), size (+-8 % overall, +-4 %
    per axis) and smooth deformation (RMS 1.5-3.5 mm, correlated over ~30 mm)."""
    angles = (rng.uniform(-12, 12), rng.uniform(-5, 5), rng.uniform(-6, 6))
    # Pitch about the left-right axis, roll about anterior-posterior, yaw about the bore axis.
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.96, 1.04, size=3)
    n = int(round(2 * LATTICE_HALF_EXTENT_MM / LATTICE_SPACING_MM)) + 1
    raw = rng.standard_normal((3, n, n, n))
    smooth = np.stack([ndimage.gaussian_filter(c, 1.0, mode="nearest") for c in raw])
    rms = float(np.sqrt((smooth**2).mean()))
    amplitude = rng.uniform(1.5, 3.5) if deformation_mm is None else float(deformation_mm)
    displacement = (smooth * (amplitude / max(rms, 1e-9))).astype(np.float32)
    origin = np.asarray(translation, dtype=float) - LATTICE_HALF_EXTENT_MM
    return Warp(rotation, scale, np.asarray(translation, dtype=float), origin, displacement, angles)


def mni_to_voxel(warp: Warp, origin: np.ndarray, spacing_ijk: np.ndarray, mni: np.ndarray) -> np.ndarray:
    """MNI points (N, 3) to continuous acquisition voxel indices (N, 3) in (k, j, i) order."""
    lps = warp.mni_to_scanner(mni)
    return ((lps - np.asarray(origin)) / np.asarray(spacing_ijk))[:, ::-1]

