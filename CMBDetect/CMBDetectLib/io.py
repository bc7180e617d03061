"""Reading and writing volumes with their full geometry, through SimpleITK.

A `Volume` is a numpy array in scan order, shape (slices, rows, columns) = (k, j, i),
plus the geometry that places voxel (i, j, k) in patient space. Patient coordinates are
LPS, as in DICOM, NIfTI-through-ITK and SimpleITK; `Geometry.ijk_to_ras` gives Slicer's RAS.
Every output of CMBDetect is written on the input's own grid, so nothing is ever resampled
into another space.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import zlib
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

# Voxel spacing a scanner can produce, in mm on every axis. Outside it the header is wrong
# (a unit mix-up, a zero pixdim), and the lesion size filter would then measure nonsense.
SPACING_RANGE_MM = (0.05, 20.0)
# How far the direction matrix may stray from orthonormal (rounding in DICOM or NIfTI
# headers stays below this). ITK's NIfTI writer silently orthonormalises a sheared matrix
# while the .seg.nrrd keeps it, so the outputs of one case would disagree about the grid.
ORTHONORMAL_TOLERANCE = 1e-4


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
    Raises CaseError naming the case for anything that is not a readable 3D scalar volume:
    a missing or truncated file, a grid no scanner makes (spacing, shear), NaN voxels.
    """
    path = Path(path)
    case = case or case_name(path)
    series = (series or "").strip() or None  # an empty cell of a case list chooses nothing
    if not path.exists():
        raise CaseError(case, _missing(path))
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
            reader = info = sitk.ImageFileReader()
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
    if path.is_file():
        check_grid(reader.GetSpacing(), reader.GetDirection(), case)  # from the header: before the voxels
        voxel_bytes = int(np.prod(dims, dtype=np.int64)) * _itemsize(info.GetPixelID())
        if _is_nifti(path):
            # ITK's NIfTI reader fills what a truncated file lacks with zeros and says nothing.
            try:
                _refuse_truncated(path, case, nifti_shortfall(path))
            except ValueError as exc:
                raise CaseError(case, f"cannot read {path}: {exc}") from None

    try:
        image = reader.Execute()
    except RuntimeError as exc:
        # NRRD and MetaImage readers do notice a short file; say so in plain words when we can.
        shortfall = _other_shortfall(path, voxel_bytes) if path.is_file() else None
        _refuse_truncated(path, case, shortfall)
        raise CaseError(case, f"cannot read {path}: {_first_line(exc)}") from None
    if not path.is_file():
        check_grid(image.GetSpacing(), image.GetDirection(), case)  # a series' slice spacing is known only now
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise CaseError(case, f"volume has {bad} NaN or infinite voxels")
    if path.is_file() and _is_nifti(path):
        _check_nifti_nan(path, case)
    return Volume(array, geometry_of(image))


def check_grid(spacing: tuple[float, ...], direction: tuple[float, ...], case: str) -> None:
    """Refuse a voxel grid no scanner makes: spacing outside SPACING_RANGE_MM on any axis, or a
    direction matrix that is not orthonormal (a sheared grid)."""
    low, high = SPACING_RANGE_MM
    if not all(low <= s <= high for s in spacing):
        axes = ", ".join(f"{a} {s:g} mm" for a, s in zip("ijk", spacing) if not low <= s <= high)
        raise CaseError(
            case, f"voxel spacing {' x '.join(f'{s:g}' for s in spacing)} mm is outside {low:g} to {high:g} mm ({axes}): the header's spacing is wrong"
        )  # fmt: skip
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    off = float(np.abs(d.T @ d - np.eye(3)).max())
    if off > ORTHONORMAL_TOLERANCE:
        raise CaseError(
            case, f"the direction matrix is not orthonormal (off by {off:.2g}; at most {ORTHONORMAL_TOLERANCE:g} allowed): "
            "a sheared grid, which the outputs could not keep; resample it onto an orthonormal grid first",
        )  # fmt: skip


def _missing(path: Path) -> str:
    """Why `path` does not exist, in words: links that dangle or loop are named as such."""
    if not path.is_symlink():
        return f"file not found: {path}"
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"the symbolic link {path} loops (it leads back to itself)"
    return f"the symbolic link {path} points to {os.readlink(path)}, which does not exist"


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _itemsize(pixel_id: int) -> int:
    return sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], pixel_id)).itemsize


def _refuse_truncated(path: Path, case: str, shortfall: tuple[int, int] | None) -> None:
    if shortfall is not None:
        have, need = shortfall
        raise CaseError(case, f"file is truncated: {path.name} holds {have} of the {need} bytes its header promises")


def nifti_shortfall(path: Path) -> tuple[int, int] | None:
    """(bytes present, bytes the header promises) when a NIfTI file is shorter than its header
    says, else None. Counted on the uncompressed stream of a .nii.gz, which is read through
    only when the gzip trailer disagrees (a cut file, or several gzip members).
    Raises ValueError when not even the header can be read.
    """
    import nibabel

    try:
        header = nibabel.load(str(path)).header
        need = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
    except Exception as exc:  # nibabel names what is wrong with the header
        raise ValueError(f"the NIfTI header cannot be read: {exc}") from None
    if not path.name.lower().endswith(".gz"):
        have = path.stat().st_size
    else:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() >= 18:  # the smallest complete gzip member
                f.seek(-4, os.SEEK_END)
                if int.from_bytes(f.read(4), "little") == need % 2**32:  # ISIZE: the length mod 2**32
                    return None
        have = gzip_stream_length(path, 0, need)
    return (have, need) if have < need else None


def gzip_stream_length(path: Path, start: int, enough: int) -> int:
    """Bytes of uncompressed data in the gzip stream that begins at byte `start` of `path`,
    through every member, counting no further than `enough`; a stream cut short or damaged
    counts what came out of it."""
    total = 0
    inflater = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        f.seek(start)
        data = b""
        while total < enough:
            if not data:
                data = f.read(1 << 20)
                if not data:
                    try:
                        total += len(inflater.flush())  # output held back by the size bound
                    except zlib.error:
                        pass
                    break
            try:
                total += len(inflater.decompress(data, 1 << 24))  # bounded output: no big buffers
            except zlib.error:
                break  # damaged, or padding after the last member
            data = inflater.unconsumed_tail
            if inflater.eof:  # one member ends; another may follow (bgzip, pigz)
                data = inflater.unused_data
                inflater = zlib.decompressobj(wbits=31)
    return total


def _text_header(path: Path, separator: str, last: str | None = None) -> tuple[dict[str, str], int] | None:
    """The `key<separator>value` lines of a NRRD or MetaImage header (keys lower-case), and
    the byte where the data starts: after the blank line, after the line whose key is `last`,
    or at the end of a detached header. None when no header end is found."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)  # headers are a few hundred bytes
    fields: dict[str, str] = {}
    pos = 0
    while (end := head.find(b"\n", pos)) >= 0:
        line = head[pos:end].decode("latin-1").rstrip("\r")
        pos = end + 1
        if not line.strip():
            return fields, pos
        key, sep, value = line.partition(separator)
        if sep:
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == last:
                return fields, pos
    return (fields, pos) if pos == len(head) else None


def _other_shortfall(path: Path, voxel_bytes: int) -> tuple[int, int] | None:
    """For a NRRD or MetaImage file that ITK could not read: (data bytes present, bytes the
    header promises) when the data is short; None when that is not the problem, or for a
    layout we do not follow (lists of data files, skipped bytes, other encodings)."""
    name = path.name.lower()
    if name.endswith((".mha", ".mhd")):
        parsed = _text_header(path, "=", last="elementdatafile")
        if parsed is None or parsed[0].get("headersize", "0") not in ("0", "-1"):
            return None
        fields, start = parsed
        data_file, gzipped = fields.get("elementdatafile", ""), False
        need = voxel_bytes
        if fields.get("compresseddata", "false").lower() == "true":  # zlib data of a recorded size
            if not fields.get("compresseddatasize", "").isdigit():
                return None
            need = int(fields["compresseddatasize"])
    elif name.endswith((".nrrd", ".nhdr")):
        parsed = _text_header(path, ":")
        if parsed is None or parsed[0].get("line skip", "0") != "0" or parsed[0].get("byte skip", "0") != "0":
            return None
        fields, start = parsed
        data_file = fields.get("data file", fields.get("datafile", "LOCAL"))
        encoding = fields.get("encoding", "raw")
        if encoding not in ("raw", "gzip", "gz"):
            return None
        gzipped, need = encoding != "raw", voxel_bytes
    else:
        return None
    if data_file.upper() != "LOCAL":
        if data_file.upper().startswith("LIST") or "%" in data_file or " " in data_file:
            return None
        path, start = path.parent / data_file, 0
        if not path.is_file():
            return 0, need
    have = gzip_stream_length(path, start, need) if gzipped else path.stat().st_size - start
    return (have, need) if have < need else None


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

    try:
        image = nibabel.load(str(path))
        if not np.issubdtype(image.get_data_dtype(), np.floating):
            return
        raw = np.asanyarray(image.dataobj)
    except Exception as exc:  # a second reader should not find more wrong than ITK did; say what it found
        raise CaseError(case, f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    bad = int(np.count_nonzero(~np.isfinite(raw)))
    if bad:
        raise CaseError(case, f"volume has {bad} NaN or infinite voxels")


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True) -> None:
    """Write an array on the given grid, atomically (a hidden temporary file renamed into place
    once it is complete); a write that fails raises OSError naming `path`, and leaves nothing."""
    path = Path(path)
    image = to_sitk(array, geometry)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise OSError(errno.EIO, _first_line(exc), str(path)) from None
        if _is_nifti(path):
            # niftilib, inside ITK's NIfTI writer, prints "** ERROR: NWAD: wrote only ..." when the
            # disk fills up, then returns as if all went well: check what reached the file.
            try:
                short = nifti_shortfall(tmp) is not None
            except ValueError:  # not even a whole header
                short = True
            if short:
                stopped = f"the NIfTI writer stopped short after {tmp.stat().st_size} bytes (disk full, or a file size limit)"
                raise OSError(errno.EIO, stopped, str(path))


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk; a deferred write error (NFS, a full disk) raises here."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows' fsync needs write access
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class atomic_path:
    """Context manager giving a hidden temporary path beside `path`, renamed onto it on success.

    Readers never see a half-written file: the temporary name starts with a dot (never taken
    for a case or a result), the file is flushed to the disk before it is renamed, and any
    failure, the flush's included, removes it and leaves `path` as it was.
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
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        try:
            fsync_file(self.tmp)
            # mkstemp makes owner-only files; results are ordinary files, so honour the umask.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise


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
