"""The ONNX models (the fp32 export and its int8 variant, the candidate classifier's export)
cached on disk, so that a process pays neither the export nor torch's import twice.

An entry is keyed by what decides its bytes: the weights' sha256, the precision, the int8
calibration's sha256, the exporter's opset and the versions of onnxruntime, torch and onnx
(read from the installed packages' metadata: asking torch would import it). Its file name
holds the key and the sha256 of its own bytes, `<key>-<sha256>.onnx`; it is written to a
temporary file and renamed into place, so a reader sees a whole entry or none. An entry whose
bytes do not match its name, or that ONNX Runtime cannot load, is deleted and rebuilt, never
trusted. A cache folder that cannot be written is used for nothing: the model is built in
memory for this process, with one warning.

The folder: CMBDETECT_CACHE_DIR if set; else the user's cache folder, by platformdirs when it
is installed (Linux ~/.cache/cmbdetect, macOS ~/Library/Caches/cmbdetect, Windows
%LOCALAPPDATA%\\cmbdetect\\Cache), else the same places worked out here. Entries are a
few MB each; deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

CACHE_ENV = "CMBDETECT_CACHE_DIR"
FORMAT = 1  # bump when what is exported changes without any version above changing
T = TypeVar("T")

_memory: dict[str, bytes] = {}  # this process's entries, whatever the disk allowed
_warned: set[str] = set()


def cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    try:
        import platformdirs
    except ImportError:
        platformdirs = None
    if platformdirs is not None:
        return Path(platformdirs.user_cache_dir("cmbdetect", appauthor=False))
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "cmbdetect" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "cmbdetect"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "cmbdetect"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def runtime_versions() -> dict[str, str]:
    return {name: package_version(name) for name in ("onnxruntime", "torch", "onnx")}


def entry_key(fields: dict) -> str:
    described = {"format": FORMAT, **runtime_versions(), **fields}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _warn_once(folder: Path, exc: OSError) -> None:
    if str(folder) not in _warned:
        _warned.add(str(folder))
        log.warning("the model cache %s cannot be written (%s): the ONNX model is kept in memory for this process only",
                    folder, exc.strerror or exc)  # fmt: skip


def _read(folder: Path, key: str) -> bytes | None:
    """The entry's bytes when they match the sha256 in its name; a mismatched file is removed."""
    try:
        candidates = sorted(folder.glob(f"{key}-*.onnx"))
    except OSError:
        return None
    for path in candidates:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == path.stem.split("-", 1)[1]:
            return data
        discard_file(path)
    return None


def discard_file(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # read-only: it will fail its check again, and be rebuilt in memory again


def _write(folder: Path, key: str, data: bytes) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{key}-{hashlib.sha256(data).hexdigest()}.onnx"
        fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # atomic: another process sees the whole entry or none
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        _warn_once(folder, exc)


def cached(fields: dict, build: Callable[[], bytes], load: Callable[[bytes], T]) -> T:
    """`load(bytes)` of the entry for `fields`, building (and storing) it when absent or bad.

    `build` makes the bytes (an export, a quantisation); `load` turns them into what the caller
    uses (an ONNX Runtime session). A stored entry that `load` refuses is deleted and rebuilt.
    """
    key = entry_key(fields)
    folder = cache_dir()
    data = _memory.get(key) or _read(folder, key)
    if data is not None:
        try:
            result = load(data)
            _memory[key] = data
            return result
        except Exception as exc:  # noqa: BLE001 - whatever the runtime says, the entry is not to be trusted
            log.warning("cached ONNX model %s could not be loaded (%s): rebuilding it", key, exc)
            _memory.pop(key, None)
            for path in folder.glob(f"{key}-*.onnx"):
                discard_file(path)
    data = build()
    result = load(data)  # a fresh build that does not load is the caller's error, raised as is
    _memory[key] = data
    _write(folder, key, data)
    return result


def cached_bytes(fields: dict, build: Callable[[], bytes]) -> bytes:
    """The bytes of the entry for `fields` (checksum-verified), building and storing them when absent."""
    return cached(fields, build, lambda data: data)
