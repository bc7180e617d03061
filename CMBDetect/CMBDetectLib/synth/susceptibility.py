"""Susceptibility physics: dipole field, phase, intravoxel dephasing and SWI reconstruction.

Conventions: B0 points along the acquisition's slice axis (array axis 0, scanner z; axial
slices). Susceptibility chi is in ppm (SI) relative to brain tissue, the field offset in ppm
of B0. The measured phase is phi = -gamma * dB * TE, so a paramagnetic source (dB > 0 above
and below it) gives negative phase there: the right-handed convention in which SWI's phase
mask suppresses negative phase (Haacke et al., MRM 2004).

Two scales of dephasing:
- on the acquisition grid, for smooth fields (air-tissue interfaces, nuclei, veins at voxel
  scale), the phase ramp across a voxel dampens the signal; we use the Gaussian form
  exp(-sum_a Phi_a^2 / 24) of the box-voxel sinc(Phi / 2), with Phi_a the phase change across
  the voxel along axis a (it matches the sinc to second order and has no unphysical side lobes);
- around compact sources (microbleeds, calcifications), `simulate_source` computes the field at
  high resolution through the dipole kernel and averages the complex signal over each
  acquisition voxel, which is what produces blooming.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

GAMMA_RAD_PER_S_PER_T = 2.0 * np.pi * 42.577478e6
# FFTs split into independent 1D transforms, so the result does not depend on the thread count.
FFT_WORKERS = max(1, min(4, os.cpu_count() or 1))
MAX_SUBVOXELS = 1.5e6


def phase_per_ppm(field_strength_t: float, te_ms: float) -> float:
    """Phase (rad) accumulated at TE per ppm of field offset."""
    return GAMMA_RAD_PER_S_PER_T * field_strength_t * te_ms * 1e-3 * 1e-6


def dipole_kernel(shape: tuple[int, int, int], spacing_kji: tuple[float, float, float]) -> np.ndarray:
    """Unit dipole response in k-space for a real FFT (last axis halved): D = 1/3 - kz^2/|k|^2,
    B0 along axis 0, with D(0) = 0 (the mean field is not observable)."""
    kz = sfft.fftfreq(shape[0], d=spacing_kji[0]).astype(np.float32)[:, None, None]
    ky = sfft.fftfreq(shape[1], d=spacing_kji[1]).astype(np.float32)[None, :, None]
    kx = sfft.rfftfreq(shape[2], d=spacing_kji[2]).astype(np.float32)[None, None, :]
    k2 = kz**2 + ky**2 + kx**2
    k2[0, 0, 0] = 1.0
    kernel = np.float32(1.0 / 3.0) - kz**2 / k2
    kernel[0, 0, 0] = 0.0
    return kernel.astype(np.float32)


def field_ppm(chi: np.ndarray, spacing_kji: tuple[float, float, float]) -> np.ndarray:
    """Field offset (ppm of B0) of a susceptibility distribution (ppm), periodic boundaries:
    callers pad with tissue (chi = 0) where wrap-around would matter."""
    spectrum = sfft.rfftn(chi.astype(np.float32, copy=False), workers=FFT_WORKERS)
    spectrum *= dipole_kernel(chi.shape, spacing_kji)
    return sfft.irfftn(spectrum, s=chi.shape, workers=FFT_WORKERS).astype(np.float32, copy=False)


def _shim_terms(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """The 10 terms of a second-order polynomial as separable factors (z, y, x), each a 1D array
    or None (meaning 1), so that each term can be evaluated by broadcasting."""
    one = None
    return [
        (one, one, one), (z, one, one), (one, y, one), (one, one, x),
        (z * z, one, one), (one, y * y, one), (one, one, x * x),
        (z, y, one), (z, one, x), (one, y, x),
    ]


def shim(field: np.ndarray, weight: np.ndarray, step: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Remove the second-order polynomial that best fits the field where `weight` > 0, as the
    scanner's B0 shim does over the brain. Returns the shimmed field (in place) and the
    coefficients (ppm, over coordinates scaled to -1..1)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in field.shape]
    sub = (slice(None, None, max(1, step // 2)), slice(None, None, step), slice(None, None, step))
    w = weight[sub]
    keep = w > 0
    if keep.sum() < 50:
        return field, np.zeros(10)
    sz, sy, sx = (a[s] for a, s in zip(axes, sub))
    zz, yy, xx = np.meshgrid(sz, sy, sx, indexing="ij")
    design = []
    for tz, ty, tx in _shim_terms(zz[keep], yy[keep], xx[keep]):
        col = np.ones(int(keep.sum()), np.float64)
        for t in (tz, ty, tx):
            if t is not None:
                col = col * t
        design.append(col)
    a = np.stack(design, 1) * np.sqrt(w[keep])[:, None]
    b = field[sub][keep] * np.sqrt(w[keep])
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    z, y, x = axes
    for c, (tz, ty, tx) in zip(coef, _shim_terms(z, y, x)):
        term = np.float32(c)
        for axis, t in enumerate((tz, ty, tx)):
            if t is not None:
                shape = [1, 1, 1]
                shape[axis] = len(t)
                term = term * t.reshape(shape)
        field -= term
    return field, coef


def gradient_dephasing(field: np.ndarray, rad_per_ppm: float) -> np.ndarray:
    """Signal fraction left after the field's phase ramp across each voxel, all three axes."""
    total = np.zeros(field.shape, np.float32)
    for axis in range(3):
        ramp = np.gradient(field, axis=axis)  # ppm per voxel
        ramp *= np.float32(rad_per_ppm)
        total += ramp * ramp
    total *= np.float32(-1.0 / 24.0)
    return np.exp(total, out=total)


def highpass_phase(signal: np.ndarray, fraction: float) -> np.ndarray:
    """Homodyne high-pass filtered phase, slice by slice as SWI does: the complex image divided
    by its low-pass copy (central `fraction` of k-space under a 2D Hann window)."""
    rows, cols = signal.shape[1:]
    spectrum = sfft.fft2(signal, axes=(1, 2), workers=FFT_WORKERS)
    window = np.outer(_hann(rows, fraction), _hann(cols, fraction)).astype(np.float32)
    spectrum *= window
    low = sfft.ifft2(spectrum, axes=(1, 2), workers=FFT_WORKERS, overwrite_x=True)
    np.conjugate(low, out=low)
    low *= signal
    return np.angle(low).astype(np.float32, copy=False)


def _hann(n: int, fraction: float) -> np.ndarray:
    """A Hann window of width `fraction * n` centred on zero frequency, in FFT order."""
    width = max(3, int(round(fraction * n)))
    window = np.zeros(n, np.float32)
    w = np.hanning(width + 2)[1:-1].astype(np.float32)
    start = n // 2 - width // 2
    window[start : start + width] = w
    return np.fft.ifftshift(window)


def phase_mask(phase: np.ndarray, power: float) -> np.ndarray:
    """SWI's negative-phase mask to the given power: (pi + phi) / pi for phi < 0, else 1."""
    mask = np.minimum(phase, 0.0).astype(np.float32)
    mask *= np.float32(1.0 / np.pi)
    mask += np.float32(1.0)
    if power <= 0:
        return np.ones(phase.shape, np.float32)
    if float(power).is_integer():
        base = mask.copy()
        for _ in range(int(power) - 1):
            mask *= base
    else:
        mask **= np.float32(power)
    return mask


def visibility(factor: np.ndarray, power: float) -> np.ndarray:
    """How dark a source leaves each voxel on SWI, relative to the same voxel without it:
    the magnitude loss times the phase mask of the source's own phase."""
    return np.abs(factor) * phase_mask(np.angle(factor), power)


@dataclass(frozen=True)
class Source:
    """A compact susceptibility source: an ellipsoid with semi-axes (mm) along the columns of
    `rotation` (scanner i, j, k frame), susceptibility chi (ppm) and the relative signal left
    inside it (hemosiderin and calcium have almost none)."""

    semi_axes_mm: tuple[float, float, float]
    rotation: np.ndarray
    chi_ppm: float
    interior_signal: float = 0.02
    # Extra spherical lobes (irregular, lobulated sources): (x, y, z offset from the centre in
    # mm, scanner i, j, k frame; radius mm). The source is the union of the ellipsoid and lobes.
    lobes: tuple[tuple[float, float, float, float], ...] = ()

    @property
    def equivalent_diameter_mm(self) -> float:
        """Equivalent-sphere diameter of the main ellipsoid (lobes not counted)."""
        return 2.0 * float(np.cbrt(np.prod(self.semi_axes_mm)))

    @property
    def reach_mm(self) -> float:
        """How far the source extends from its centre."""
        return max([max(self.semi_axes_mm)] + [float(np.linalg.norm(l[:3])) + l[3] for l in self.lobes])


@dataclass(frozen=True)
class SourcePatch:
    """The complex signal factor a source imposes on the acquisition voxels of a box.

    `lo` is the (k, j, i) index of the box's first voxel in the acquisition grid (it may lie
    outside the volume: callers crop); `factor` multiplies the complex signal there."""

    lo: tuple[int, int, int]
    factor: np.ndarray  # complex64 (Kp, Jp, Ip)
    subsampling: tuple[int, int, int]
    hires_phase: np.ndarray | None = None  # rad, on the sub-voxel grid, when requested

    def visibility(self, power: float) -> np.ndarray:
        return visibility(self.factor, power)


def patch_radius_mm(source: Source, rad_per_ppm: float, spacing_kji: tuple[float, float, float]) -> float:
    """Half-width of the box that holds the visible bloom: out to where the dipole phase has
    fallen to ~0.2 rad, plus two voxels."""
    a = source.reach_mm
    pole_phase = rad_per_ppm * abs(source.chi_ppm) * 2.0 / 3.0  # at the surface, along B0
    bloom = a * max(1.0, (pole_phase / 0.2) ** (1.0 / 3.0))
    return float(min(bloom + 2.0 * max(spacing_kji), 40.0))


def simulate_source(
    source: Source,
    centre_kji: np.ndarray,
    spacing_kji: tuple[float, float, float],
    field_strength_t: float,
    te_ms: float,
    keep_hires_phase: bool = False,
) -> SourcePatch:
    """Field of `source` through the dipole kernel on a sub-voxel grid, intravoxel dephasing at
    TE and B0, and the complex average over each acquisition voxel.

    The sub-voxel pitch is about a third of the source's smallest semi-axis (0.12-0.4 mm), so
    even a 1 mm bleed is resolved; the box reaches as far as the dipole phase matters."""
    centre = np.asarray(centre_kji, dtype=float)
    spacing = np.asarray(spacing_kji, dtype=float)
    rad_per_ppm = phase_per_ppm(field_strength_t, te_ms)
    radius = patch_radius_mm(source, rad_per_ppm, tuple(spacing))
    half = np.ceil(radius / spacing).astype(int) + 1
    # (lobes are at least 0.35 of the body's radius: the body's pitch resolves them well enough)
    pitch = float(np.clip(min(source.semi_axes_mm) / 3.0, 0.12, 0.4))
    # Keep the sub-voxel grid under ~1.5 M points (big voxels, big blooms): a coarser pitch
    # there costs little accuracy, the bloom being many sub-voxels wide.
    extent = (2 * half + 1) * spacing
    pitch = max(pitch, min(0.6, float(np.cbrt(np.prod(extent) / MAX_SUBVOXELS))))
    sub = np.maximum(1, np.ceil(spacing / pitch - 1e-9)).astype(int)
    base = np.rint(centre).astype(int)
    lo = base - half
    n_vox = 2 * half + 1
    # Sub-voxel centres, in mm from the source centre, along each axis (k, j, i).
    axes = []
    for a in range(3):
        v = np.arange(n_vox[a])[:, None] + lo[a]
        m = (np.arange(sub[a])[None, :] + 0.5) / sub[a] - 0.5
        axes.append(((v + m).ravel() - centre[a]) * spacing[a])
    hires_spacing = tuple(spacing / sub)
    kk, jj, ii = np.meshgrid(*axes, indexing="ij", sparse=True)
    # Scanner-frame offsets (x = i, y = j, z = k) into the source's own axes.
    r = source.rotation
    semi = np.asarray(source.semi_axes_mm, dtype=float)
    q = np.zeros(np.broadcast_shapes(kk.shape, jj.shape, ii.shape), np.float32)
    for axis in range(3):
        local = (ii * r[0, axis] + jj * r[1, axis] + kk * r[2, axis]) / semi[axis]
        q += (local * local).astype(np.float32)
    rho = np.sqrt(q)
    # Soft edge one sub-voxel wide, so the source's volume does not jump with grid alignment.
    inside = np.clip((1.0 - rho) * (semi.min() / min(hires_spacing)) + 0.5, 0.0, 1.0).astype(np.float32)
    for dx, dy, dz, radius in source.lobes:
        dist = np.sqrt(((ii - dx) ** 2 + (jj - dy) ** 2 + (kk - dz) ** 2).astype(np.float32))
        lobe = np.clip((radius - dist) / min(hires_spacing) + 0.5, 0.0, 1.0)
        np.maximum(inside, lobe.astype(np.float32), out=inside)
    field = field_ppm(inside * np.float32(source.chi_ppm), hires_spacing)
    phase = field * np.float32(-rad_per_ppm)
    signal = np.exp(1j * phase).astype(np.complex64)
    signal *= (1.0 - inside * np.float32(1.0 - source.interior_signal)).astype(np.float32)
    factor = signal.reshape(n_vox[0], sub[0], n_vox[1], sub[1], n_vox[2], sub[2]).mean(axis=(1, 3, 5))
    return SourcePatch(
        lo=tuple(int(v) for v in lo),
        factor=factor.astype(np.complex64),
        subsampling=tuple(int(s) for s in sub),
        hires_phase=phase if keep_hires_phase else None,
    )


def apply_patch(signal: np.ndarray, patch: SourcePatch) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Multiply the patch's factor into the complex signal (cropped to the volume); returns the
    volume and patch slices used."""
    vol_sl, patch_sl = overlap_slices(signal.shape, patch.lo, patch.factor.shape)
    signal[vol_sl] *= patch.factor[patch_sl]
    return vol_sl, patch_sl


def overlap_slices(
    shape: tuple[int, ...], lo: tuple[int, ...], size: tuple[int, ...]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    vol, loc = [], []
    for n, start, length in zip(shape, lo, size):
        a, b = max(start, 0), min(start + length, n)
        b = max(a, b)
        vol.append(slice(a, b))
        loc.append(slice(a - start, b - start))
    return tuple(vol), tuple(loc)
