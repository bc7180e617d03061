"""Reading and writing volumes with their full geometry, through SimpleITK.

A `Volume` is a numpy array in scan order, shape (slices, rows, columns) = (k, j, i),
plus the geometry that places voxel (i, j, k) in patient space. Patient coordinates are
LPS, as in DICOM, NIfTI-through-ITK and SimpleITK; `Geometry.ijk_to_ras` gives Slicer's RAS.
Every output of CMBDetect is written on the input's own grid, so nothing is ever resampled
into another space.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import CaseError

# File name endings we read as single files; anything else must be a DICOM series folder.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# Working memory of a detection run, in bytes per input voxel: the float32 input, its
# preprocessed copy, the probability map back on the native grid, labels and masks.
# Measured peaks stay below this; it guards against volumes that cannot fit at all.
WORKING_BYTES_PER_VOXEL = 24

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in patient space: spacing (mm, along i, j, k), origin (LPS mm) and
    direction (3x3, columns are the i, j, k axis directions in LPS), as SimpleITK has them."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix from voxel index to RAS millimetres (Slicer's convention)."""
        m = self.ijk_to_lps()
        m[:3, :] = LPS_TO_RAS @ m[:3, :]
        return m

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel indices (..., 3) in i, j, k order to LPS points (..., 3)."""
        ijk = np.asarray(ijk, dtype=float)
        m = self.ijk_to_lps()
        return ijk @ m[:3, :3].T + m[:3, 3]

    def index_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        return self.index_to_lps(ijk) * np.array([-1.0, -1.0, 1.0])

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def matches(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (
            np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )


@dataclass
class Volume:
    """A 3D image in scan order: array shape (k, j, i), with its geometry."""

    array: np.ndarray
    geometry: Geometry

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def geometry_of(image: sitk.Image) -> Geometry:
    return Geometry(
        spacing=tuple(float(s) for s in image.GetSpacing()),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(float(d) for d in image.GetDirection()),
    )


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def is_volume_file(path: Path) -> bool:
    """A volume by its suffix; hidden files never are: a ".tmp-..." file is another process's
    write in progress (atomic_path), and "._x.nii.gz" is a macOS resource fork."""
    name = path.name.lower()
    return not name.startswith(".") and any(name.endswith(s) for s in VOLUME_SUFFIXES)


def case_name(path: Path) -> str:
    """The case's name: the file name without its volume suffix, or the folder's name."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _available_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None  # not knowable on this platform: no guard


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder: its files in slice order (as GDCM sorts them) and what
    identifies it to a reader."""

    uid: str
    description: str
    files: tuple[str, ...]
    rows: int
    columns: int
    study_uid: str = ""
    frame_of_reference_uid: str = ""

    def describe(self) -> str:
        return f"{self.uid} ('{self.description}', {len(self.files)} slices of {self.columns}x{self.rows})"


def _series_of(folder: Path, uid: str) -> DicomSeries:
    files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    info = sitk.ImageFileReader()
    info.SetFileName(files[0])
    info.ReadImageInformation()

    def tag(key: str) -> str:
        return info.GetMetaData(key).strip() if info.HasMetaDataKey(key) else ""

    columns, rows = info.GetSize()[:2]
    return DicomSeries(uid, tag("0008|103e"), files, rows, columns, tag("0020|000d"), tag("0020|0052"))


def dicom_series(folder: Path, case: str, series: str | None = None) -> DicomSeries:
    """The series of `folder` to read: the only one, or the one whose Series Instance UID is
    `series`. Several series and no choice is refused with the list: taking one silently
    (the largest, say) could read a phase or a minimum-intensity projection as the SWI."""
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not uids:
        raise CaseError(case, f"no DICOM series found in folder {folder}")
    found = [_series_of(folder, uid) for uid in uids]
    listing = "; ".join(s.describe() for s in found)
    if series is not None:
        chosen = [s for s in found if s.uid == series]
        if not chosen:
            raise CaseError(case, f"DICOM series {series} is not in {folder}; it holds: {listing}")
        return chosen[0]
    if len(found) > 1:
        raise CaseError(
            case,
            f"the folder {folder} holds {len(found)} DICOM series; choose one with --series UID "
            f"(or a 'series' column in the case list): {listing}",
        )
    return found[0]


def check_size(shape_ijk: tuple[int, ...], case: str, available: int | None = None) -> None:
    """Refuse volumes whose working set cannot fit in memory, before reading their voxels."""
    available = _available_memory_bytes() if available is None else available
    if available is None:
        return
    need = int(np.prod(shape_ijk, dtype=np.int64)) * WORKING_BYTES_PER_VOXEL
    if need > available:
        raise CaseError(
            case,
            f"volume of {'x'.join(map(str, shape_ijk))} voxels needs about {need / 2**30:.1f} GiB "
            f"to process, more than the {available / 2**30:.1f} GiB of memory available",
        )


def read_volume(path: str | os.PathLike, case: str | None = None, series: str | None = None) -> Volume:
    """Read a 3D scalar volume (NIfTI, NRRD, MHA, or a DICOM series folder) as float32.

    `series`: the Series Instance UID to read from a folder that holds several (dicom_series).
    Raises CaseError naming the case for anything that is not a readable 3D scalar volume.
    """
    path = Path(path)
    case = case or case_name(path)
    series = (series or "").strip() or None  # an empty cell of a case list chooses nothing
    if not path.exists():
        raise CaseError(case, f"file not found: {path}")
    if series and not path.is_dir():
        raise CaseError(case, f"DICOM series {series} was asked for, but {path} is a file, not a DICOM folder")
    try:
        if path.is_dir():
            files = list(dicom_series(path, case, series).files)
            reader: sitk.ImageFileReader | sitk.ImageSeriesReader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            info = sitk.ImageFileReader()
            info.SetFileName(files[0])
            info.ReadImageInformation()
            dims = (*info.GetSize()[:2], len(files))
            components = info.GetNumberOfComponents()
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            dims = tuple(reader.GetSize())
            components = reader.GetNumberOfComponents()
    except CaseError:
        raise
    except RuntimeError as exc:
        raise CaseError(case, f"cannot read {path}: {_first_line(exc)}") from None

    if components != 1:
        raise CaseError(case, f"image has {components} components per voxel; a scalar SWI magnitude volume is needed")
    real_dims = [d for d in dims if d > 1]
    if len(dims) < 3 or len(real_dims) < 3:
        raise CaseError(case, f"image is {len(real_dims)}D (size {'x'.join(map(str, dims))}); a 3D volume is needed")
    if len(dims) > 3:
        raise CaseError(case, f"image is {len(dims)}D (size {'x'.join(map(str, dims))}); a single 3D volume is needed")
    check_size(dims, case)

    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CaseError(case, f"cannot read {path}: {_first_line(exc)}") from None
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise CaseError(case, f"volume has {bad} NaN or infinite voxels")
    if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_nan(path, case)
    return Volume(array, geometry_of(image))


def read_phase(phase: str | Path, case: str, volume: Volume) -> np.ndarray:
    """The case's phase image (a file, or `<case>.*` in a folder), on the SWI image's grid."""
    phase = Path(phase)
    if phase.is_dir():
        found = sorted(p for p in phase.iterdir() if p.is_file() and is_volume_file(p) and case_name(p) == case)
        if not found:
            raise CaseError(case, f"no phase image for this case in {phase} (expected {case}.nii.gz or similar)")
        phase = found[0]
    image = read_volume(phase, case)
    if image.shape != volume.shape or not image.geometry.matches(volume.geometry):
        raise CaseError(case, f"phase image {phase.name} is not on the SWI image's grid (shape {image.shape} vs {volume.shape}, or spacing/origin/direction differ)")
    return image.array


def _check_nifti_nan(path: Path, case: str) -> None:
    """ITK's NIfTI reader silently turns NaN voxels into 0; look at the raw data instead.

    Only floating-point files can hold NaN, so the usual integer SWI costs nothing here.
    """
    import nibabel

    image = nibabel.load(str(path))
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return
    raw = np.asanyarray(image.dataobj)
    bad = int(np.count_nonzero(~np.isfinite(raw)))
    if bad:
        raise CaseError(case, f"volume has {bad} NaN or infinite voxels")


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True) -> None:
    """Write an array on the given grid, atomically (a temporary file renamed into place)."""
    path = Path(path)
    image = to_sitk(array, geometry)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)


class atomic_path:
    """Context manager giving a temporary path beside `path`, renamed onto it on success.

    Readers never see a half-written file, and a failure leaves nothing behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the full suffix (.nii.gz, .seg.nrrd) so writers pick the right format.
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + self.path.name, dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            # mkstemp makes owner-only files; results are ordinary files, so honour the umask.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK puts the useful sentence last; keep it short.
    return lines[-1] if lines else type(exc).__name__


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (model weights, reader files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
