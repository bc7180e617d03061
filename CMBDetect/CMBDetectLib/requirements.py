"""Which Python packages the detection needs and this Python lacks, without importing them.

Used by the Slicer module before anything else of CMBDetectLib is imported (it needs only the
standard library and `packaging`, which Slicer ships), so it can say what to install on a
fresh Slicer, and report a torch that is too old, without importing torch into Slicer's process.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

TORCH_REQUIREMENT = ">=2.1"


class TorchTooOld(RuntimeError):
    """torch is installed, at a version below what the network code needs."""

    def __init__(self, installed: str, requirement: str) -> None:
        super().__init__(f"PyTorch {installed} is installed; CMBDetect needs torch{requirement}")
        self.installed, self.requirement = installed, requirement


def installed_version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def satisfies(installed: str, specifier: str) -> bool:
    """Whether a version meets a specifier; local build tags ("2.5.1+cu121") do not count."""
    try:
        release = Version(Version(installed).public)
    except InvalidVersion:
        return False
    return SpecifierSet(specifier).contains(release, prereleases=True)


def requirement_lines(path: str | Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line]


def missing_packages(path: str | Path) -> list[str]:
    """Lines of a requirements file that are not installed at a satisfying version."""
    missing = []
    for line in requirement_lines(path):
        requirement = Requirement(line)
        installed = installed_version(requirement.name)
        if installed is None or not satisfies(installed, str(requirement.specifier) or ">=0"):
            missing.append(line)
    return missing


def missing_requirements(path: str | Path, torch_requirement: str = TORCH_REQUIREMENT) -> list[str]:
    """torch (when absent) and the missing lines of `path`; raises TorchTooOld for an old torch."""
    torch_version = installed_version("torch")
    missing = []
    if torch_version is None:
        missing.append("torch" + torch_requirement)
    elif not satisfies(torch_version, torch_requirement):
        raise TorchTooOld(torch_version, torch_requirement)
    return missing + missing_packages(path)
