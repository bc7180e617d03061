"""Shared pytest fixtures. `mrml`: a headless Slicer app (slicer-core) with a clean scene."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTING = Path(__file__).resolve().parent
# The helpers beside the tests (slicer_headless) import as top-level modules.
if str(TESTING) not in sys.path:
    sys.path.insert(0, str(TESTING))


@pytest.fixture(scope="session", autouse=True)
def onnx_cache_folder(tmp_path_factory):
    """The ONNX model cache of the test session (child processes inherit it), never the user's."""
    import os

    folder = tmp_path_factory.mktemp("onnx-cache")
    old = os.environ.get("CMBDETECT_CACHE_DIR")
    os.environ["CMBDETECT_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("CMBDETECT_CACHE_DIR", None)
    else:
        os.environ["CMBDETECT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def mrml_app():
    """One headless app per session: building it registers logics and creates the views."""
    pytest.importorskip("slicer_core", reason="slicer-core (the Qt-free MRML engine) is not installed")
    import slicer_headless

    return slicer_headless.build_app()


@pytest.fixture
def mrml(mrml_app):
    """The headless app with an empty scene: `.scene`, `.logic("Segmentations")`, `.segmentations`..."""
    import slicer_headless

    slicer_headless.install(mrml_app)  # in case a test pointed slicer.mrmlScene elsewhere
    mrml_app.clear()
    yield mrml_app
    mrml_app.clear()
