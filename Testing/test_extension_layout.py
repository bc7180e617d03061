"""The extension's shape, as Slicer's build and the ExtensionsIndex need it.

The Slicer application cannot run here, so these checks stand in for what a Slicer build
would catch late: a .py or resource not listed in the module's CMakeLists.txt (missing from
the installed extension), a catalog entry that disagrees with EXTENSION_DEPENDS, names in the
.ui that the module code does not use or vice versa, requirements that would replace what
Slicer ships, and module files that import torch or the Lib at load time.
"""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("CMBDetect", "CMBReview")
FORBIDDEN_REQUIREMENTS = {"slicer", "slicer-core", "vtk", "simpleitk", "numpy", "torch", "scipy", "pillow", "requests", "pydicom"}


def cmake_list(cmake_file: Path, variable: str) -> list[str]:
    """Entries of `set(VARIABLE ...)` with ${MODULE_NAME} expanded."""
    text = cmake_file.read_text()
    module = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text)
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert block, f"{cmake_file} has no set({variable} ...)"
    lines = [ln.split("#", 1)[0].strip() for ln in block.group(1).splitlines()]
    entries = [tok for ln in lines for tok in ln.split()]
    return [e.replace("${MODULE_NAME}", module.group(1) if module else "") for e in entries]


def cmake_value(cmake_file: Path, variable: str) -> str:
    match = re.search(rf'set\({variable}\s+"([^"]*)"\)', cmake_file.read_text())
    assert match, f"{cmake_file} does not set {variable}"
    return match.group(1)


def module_python_files(module: str) -> set[str]:
    base = ROOT / module
    return {
        p.relative_to(base).as_posix()
        for p in base.rglob("*.py")
        if "__pycache__" not in p.parts and p.relative_to(base).parts[0] != "Testing"
    }


def module_resources(module: str) -> set[str]:
    base = ROOT / module
    return {p.relative_to(base).as_posix() for p in (base / "Resources").rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.parametrize("module", MODULES)
def test_every_python_file_is_listed_in_the_module_cmake(module):
    listed = cmake_list(ROOT / module / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    present = module_python_files(module)
    unlisted, gone = sorted(present - set(listed)), sorted(set(listed) - present)
    assert not unlisted, f"add to {module}/CMakeLists.txt MODULE_PYTHON_SCRIPTS: {unlisted}"
    assert not gone, f"listed in {module}/CMakeLists.txt but missing: {gone}"
    assert len(listed) == len(set(listed)), "a file is listed twice"


@pytest.mark.parametrize("module", MODULES)
def test_every_resource_is_listed_in_the_module_cmake(module):
    listed = cmake_list(ROOT / module / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    present = module_resources(module)
    unlisted, gone = sorted(present - set(listed)), sorted(set(listed) - present)
    assert not unlisted, f"add to {module}/CMakeLists.txt MODULE_PYTHON_RESOURCES: {unlisted}"
    assert not gone, f"listed in {module}/CMakeLists.txt but missing: {gone}"


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_builds_with_generic_tests_and_the_self_test(module):
    text = (ROOT / module / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)
    assert re.search(rf"set\(MODULE_NAME {module}\)", text)


def test_top_cmake_has_the_extension_metadata_and_every_module():
    top = ROOT / "CMakeLists.txt"
    text = top.read_text()
    assert re.search(r"^cmake_minimum_required\(", text, re.M)
    assert re.search(r"^project\(CMBDetect\)", text, re.M)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert cmake_value(top, variable).strip(), variable
    assert cmake_value(top, "EXTENSION_ICONURL").startswith(cmake_value(top, "EXTENSION_HOMEPAGE").replace("github.com", "raw.githubusercontent.com"))
    assert cmake_value(top, "EXTENSION_ICONURL").endswith("/CMBDetect.png")
    subdirs = re.findall(r"^add_subdirectory\((\w+)\)", text, re.M)
    assert subdirs == list(MODULES)
    assert text.index("find_package(Slicer") < text.index("add_subdirectory(") < text.index("Slicer_EXTENSION_CPACK")


def test_catalog_entry_agrees_with_cmake():
    entry = json.loads((ROOT / "CMBDetect.json").read_text())
    top = ROOT / "CMakeLists.txt"
    depends = cmake_value(top, "EXTENSION_DEPENDS").split()
    assert entry["build_dependencies"] == ([] if depends == ["NA"] else depends)
    assert entry["category"] == cmake_value(top, "EXTENSION_CATEGORY")
    assert entry["scm_url"].removesuffix(".git") == cmake_value(top, "EXTENSION_HOMEPAGE")
    assert entry["build_subdirectory"] == "."
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-")
    assert {"scm_revision", "tier"} <= entry.keys()


def test_requirements_ask_only_for_what_slicer_lacks():
    lines = [ln.split("#", 1)[0].strip() for ln in (ROOT / "CMBDetect/Resources/requirements.txt").read_text().splitlines()]
    requirements = [ln for ln in lines if ln]
    assert requirements
    for line in requirements:
        name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower()
        assert name not in FORBIDDEN_REQUIREMENTS, f"{name} comes with Slicer (or the PyTorch extension): never pip it"
        assert ">=" in line and "==" not in line, f"{line}: use a >= floor, not a pin"


@pytest.mark.parametrize("module", MODULES)
def test_icons_are_128_pixel_pngs(module):
    from PIL import Image

    with Image.open(ROOT / module / "Resources" / "Icons" / f"{module}.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def test_extension_icon_is_the_module_icon():
    assert (ROOT / "CMBDetect.png").read_bytes() == (ROOT / "CMBDetect/Resources/Icons/CMBDetect.png").read_bytes()


# --- Module files (cannot be imported here: they need Slicer's Qt) ------------------------


def module_tree(module: str) -> ast.Module:
    return ast.parse((ROOT / module / f"{module}.py").read_text())


@pytest.mark.parametrize("module", MODULES)
def test_module_file_has_the_four_classes(module):
    classes = {n.name: n for n in module_tree(module).body if isinstance(n, ast.ClassDef)}
    bases = {name: {ast.unparse(b) for b in node.bases} for name, node in classes.items()}
    assert "ScriptedLoadableModule" in bases[module]
    assert "ScriptedLoadableModuleWidget" in bases[f"{module}Widget"]
    assert "ScriptedLoadableModuleLogic" in bases[f"{module}Logic"]
    assert "ScriptedLoadableModuleTest" in bases[f"{module}Test"]


@pytest.mark.parametrize("module", MODULES)
def test_module_file_loads_without_torch_or_the_lib(module):
    """Slicer imports every module at startup: no torch, no Lib, no installs at import time."""
    tree = module_tree(module)
    top_level_imports = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level_imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level_imports.add(node.module.split(".")[0])
    assert not top_level_imports & {"torch", "CMBDetectLib", "CMBReviewLib", "skimage", "nrrd", "safetensors", "imp"}
    source = (ROOT / module / f"{module}.py").read_text()
    assert "import imp\n" not in source and "pip_install(" not in source.split("class ")[0]


def test_help_text_is_honest_and_cites_the_paper():
    source = (ROOT / "CMBDetect/CMBDetect.py").read_text()
    for phrase in ("Research use only", "trained on", "synthetic data", "not validated on patients"):
        assert phrase in source
    assert "Fan P" in source and "2022" in source and "10.3389/fmed.2022.807443" in source
    review = (ROOT / "CMBReview/CMBReview.py").read_text()
    assert "later issue" in review


def test_ui_names_agree_with_the_module_code():
    ui = ET.parse(ROOT / "CMBDetect/Resources/UI/CMBDetect.ui").getroot()
    widgets = {w.get("name"): w.get("class") for w in ui.iter("widget")}
    source = (ROOT / "CMBDetect/CMBDetect.py").read_text()

    # Every self.ui.<name> the code touches exists in the .ui ...
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and not used - widgets.keys(), f"not in CMBDetect.ui: {sorted(used - widgets.keys())}"
    # ... and every interactive widget of the .ui is used by the code or bound to a parameter.
    bound = {}
    for w in ui.iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[w.get("name")] = prop.find("string").text
    interactive = {n for n, c in widgets.items() if c not in ("QLabel", "qMRMLWidget", "ctkCollapsibleButton")}
    assert not interactive - used - bound.keys(), f"unused widgets: {sorted(interactive - used - bound.keys())}"

    # SlicerParameterName values are fields of the parameter node, of a type the widget can show.
    tree = module_tree("CMBDetect")
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CMBDetectParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in wrapper.decorator_list)
    fields = {n.target.id: ast.unparse(n.annotation) for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    expected_type = {"qMRMLNodeComboBox": "vtkMRML", "ctkSliderWidget": "float", "QCheckBox": "bool"}
    for widget, parameter in bound.items():
        assert parameter in fields, f"{widget} is bound to {parameter}, which the parameter node lacks"
        assert expected_type[widgets[widget]] in fields[parameter], f"{widget} ({widgets[widget]}) cannot show {fields[parameter]}"
    # The size range widget is bound by hand to these two fields.
    assert {"minDiameterMm", "maxDiameterMm"} <= fields.keys() and "sizeRangeWidget" in used

    # Custom widgets are declared, and the node selectors get the scene.
    declared = {c.find("class").text for c in ui.iter("customwidget")}
    assert {c for c in widgets.values() if c.startswith(("qMRML", "ctk"))} <= declared
    receivers = {c.find("receiver").text for c in ui.iter("connection") if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    assert {n for n, c in widgets.items() if c in ("qMRMLNodeComboBox", "qMRMLTableView")} <= receivers


def test_parameter_defaults_match_the_paper_and_the_lib():
    from CMBDetectLib.detection.lesions import DEFAULT_THRESHOLD, MAX_DIAMETER_MM, MIN_DIAMETER_MM

    wrapper = next(n for n in module_tree("CMBDetect").body if isinstance(n, ast.ClassDef) and n.name == "CMBDetectParameterNode")
    defaults = {n.target.id: ast.literal_eval(n.value) for n in wrapper.body if isinstance(n, ast.AnnAssign) and n.value is not None}
    assert defaults["threshold"] == DEFAULT_THRESHOLD
    assert (defaults["minDiameterMm"], defaults["maxDiameterMm"]) == (MIN_DIAMETER_MM, MAX_DIAMETER_MM)
    assert defaults["useGpu"] is False


def test_icon_and_screenshot_urls_name_files_of_this_repository():
    text = (ROOT / "CMakeLists.txt").read_text()
    urls = re.findall(r"https://raw\.githubusercontent\.com/[^/\s\"]+/[^/\s\"]+/main/([^\s\"]+)", text)
    assert len(urls) >= 2, "EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS point into the repository"
    for path in urls:
        assert (ROOT / path).is_file(), f"CMakeLists.txt links {path}, which is not in the repository"
