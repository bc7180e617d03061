"""What the Slicer module checks before it offers an install: against this venv's real packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from CMBDetectLib import requirements
from CMBDetectLib.requirements import TorchTooOld, missing_packages, missing_requirements, satisfies

SHIPPED = Path(__file__).resolve().parent.parent / "CMBDetect" / "Resources" / "requirements.txt"


def test_the_shipped_requirements_are_met_in_the_test_venv():
    assert requirements.requirement_lines(SHIPPED)  # comments are skipped, lines are kept
    assert missing_requirements(SHIPPED) == []


def test_missing_and_too_old_packages_are_listed(tmp_path):
    listed = tmp_path / "requirements.txt"
    listed.write_text("# comment\nnumpy>=1.0  # fine\nnumpy>=9999\nno-such-package-cmbdetect>=1\nscipy\n")
    assert missing_packages(listed) == ["numpy>=9999", "no-such-package-cmbdetect>=1"]


def test_an_old_torch_is_reported_not_reinstalled(tmp_path):
    empty = tmp_path / "requirements.txt"
    empty.write_text("")
    installed = requirements.installed_version("torch")
    assert installed and missing_requirements(empty, ">=2.1") == []
    with pytest.raises(TorchTooOld) as caught:
        missing_requirements(empty, ">=999")  # stands for a torch older than the requirement
    assert caught.value.installed == installed and caught.value.requirement == ">=999"


def test_local_build_tags_do_not_change_the_release():
    assert satisfies("2.5.1+cu121", ">=2.1") and not satisfies("2.0.1+cpu", ">=2.1")
    assert satisfies("2.13.0", ">=2.1") and not satisfies("not a version", ">=2.1")


def test_psutil_is_required_where_the_worker_is_cancelled():
    """Cancel kills the worker's whole process tree (PythonSlicer is a launcher: the interpreter
    is its child) with psutil, which Slicer does not ship: the module must ask for it."""
    import tomllib

    assert any(line.split(">=")[0].strip() == "psutil" for line in requirements.requirement_lines(SHIPPED))
    project = tomllib.loads((SHIPPED.parents[2] / "pyproject.toml").read_text())["project"]
    assert any(d.split(">=")[0].strip() == "psutil" for d in project["dependencies"])
