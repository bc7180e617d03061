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


# What the CMBDetect Slicer package leaves out, on purpose: synthesis, evaluation and benchmarks,
# and the training commands. Nothing in Slicer reaches them (the module and the batch script
# detect; CMBReview's "Adapt the model to this site" runs `python -m CMBDetectLib.commands.adapt`,
# which needs commands/adapt.py, training/ and evaluation/metrics.py, shipped; the module's
# "Compare with baseline" runs `python -m CMBDetectLib.longitudinal.worker`, which needs
# longitudinal/ and registration/, shipped), and they need
# nilearn and matplotlib, which Slicer does not ship. They stay in the pip package (pyproject.toml
# ships everything). Any other new .py file must be listed in the CMake file.
NOT_SHIPPED_IN_SLICER = {
    "CMBDetect": (
        "CMBDetectLib/cli.py",
        "CMBDetectLib/cohort/benchmark.py",
        "CMBDetectLib/commands/cohort_benchmark.py",
        "CMBDetectLib/commands/benchmark.py",
        "CMBDetectLib/commands/calibrate.py",
        "CMBDetectLib/commands/evaluate.py",
        "CMBDetectLib/commands/evaluate_pairs.py",
        "CMBDetectLib/commands/longitudinal.py",
        "CMBDetectLib/commands/quantize.py",
        "CMBDetectLib/commands/review.py",
        "CMBDetectLib/commands/synth.py",
        "CMBDetectLib/commands/train.py",
        "CMBDetectLib/commands/train_candidates.py",
        "CMBDetectLib/evaluation/evaluate.py",
        "CMBDetectLib/evaluation/pairs.py",
        "CMBDetectLib/training/int8.py",  # builds int8 ranges from synthetic heads (cmbdetect quantize)
        "CMBDetectLib/evaluation/report.py",
        "CMBDetectLib/anatomy/build_atlas.py",
        "CMBDetectLib/anatomy/structures.py",
        "CMBDetectLib/synth/",
    ),
}


def shipped_python_files(module: str) -> set[str]:
    excluded = NOT_SHIPPED_IN_SLICER.get(module, ())
    return {f for f in module_python_files(module) if not any(f == e or (e.endswith("/") and f.startswith(e)) for e in excluded)}


@pytest.mark.parametrize("module", MODULES)
def test_every_python_file_is_listed_in_the_module_cmake(module):
    listed = cmake_list(ROOT / module / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    present = shipped_python_files(module)
    unlisted, gone = sorted(present - set(listed)), sorted(set(listed) - present)
    assert not unlisted, f"add to {module}/CMakeLists.txt MODULE_PYTHON_SCRIPTS: {unlisted}"
    assert not gone, f"listed in {module}/CMakeLists.txt but missing: {gone}"
    assert len(listed) == len(set(listed)), "a file is listed twice"


def _imported_lib_modules(path: Path, package: str) -> set[str]:
    """Dotted names of the CMBDetectLib modules a file imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "CMBDetectLib"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "CMBDetectLib":
                names.add(target)
                names |= {f"{target}.{a.name}" for a in node.names}  # `from .detection import outputs`
    return names


def test_what_slicer_ships_imports_only_what_slicer_ships():
    """Every CMBDetectLib import in a shipped file, lazy ones included, names a shipped file."""
    shipped = shipped_python_files("CMBDetect")
    modules = {f.removesuffix(".py").removesuffix("/__init__").replace("/", "."): f for f in shipped if f.startswith("CMBDetectLib/")}
    all_modules = {f.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for f in module_python_files("CMBDetect")}
    for name, f in sorted(modules.items()):
        package = name if f.endswith("__init__.py") else name.rsplit(".", 1)[0]
        for target in _imported_lib_modules(ROOT / "CMBDetect" / f, package):
            if target in all_modules:  # a module (not a name inside one)
                assert target in modules, f"{f} imports {target}, which the Slicer package does not ship"
    for script in ("CMBDetect.py", "Scripts/cmbdetect_slicer_batch.py"):
        for target in _imported_lib_modules(ROOT / "CMBDetect" / script, "CMBDetectLib"):
            if target in all_modules:
                assert target in modules, f"{script} imports {target}, which the Slicer package does not ship"
    # CMBReview reaches into CMBDetectLib too (its outputs, records, and `adapt` for the Adapt button).
    for f in sorted(module_python_files("CMBReview")):
        for target in _imported_lib_modules(ROOT / "CMBReview" / f, "CMBReviewLib"):
            if target in all_modules:
                assert target in modules, f"CMBReview/{f} imports {target}, which the CMBDetect Slicer package does not ship"


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
    for variable, name in (("EXTENSION_LICENSE_FILE", "LICENSE.txt"), ("EXTENSION_README_FILE", "README.md")):
        match = re.search(rf"^set\({variable}\s+\$\{{CMAKE_CURRENT_SOURCE_DIR\}}/(\S+)\)", text, re.M)
        assert match and match.group(1) == name and (ROOT / name).is_file(), f"{variable} must name the project's {name}"
    subdirs = re.findall(r"^add_subdirectory\((\w+)\)", text, re.M)
    assert subdirs == list(MODULES)
    assert text.index("find_package(Slicer") < text.index("add_subdirectory(") < text.index("Slicer_EXTENSION_CPACK")


CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # schema v1.0.1/v1.0.2, additionalProperties false  # fmt: skip


def test_catalog_entry_agrees_with_cmake():
    text = (ROOT / "CMBDetect.json").read_text()
    entry = json.loads(text)
    assert set(entry) <= CATALOG_KEYS, f"the catalog schema allows no other keys: {sorted(set(entry) - CATALOG_KEYS)}"
    # ExtensionsIndex's prettier (multiline-arrays, wrap threshold 0) puts each item on its own line.
    assert not re.search(r"\[[^\]\n]*\S[^\]\n]*\]", text), "non-empty arrays must be written one item per line"
    assert text.endswith("}\n") and "\r" not in text
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
    assert "Research use only" in review and "synthetic data" in review


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
    expected_type = {"qMRMLNodeComboBox": "vtkMRML", "ctkSliderWidget": "float", "QCheckBox": "bool", "ctkRangeWidget": "FloatRange", "QComboBox": "str"}
    for widget, parameter in bound.items():
        assert parameter in fields, f"{widget} is bound to {parameter}, which the parameter node lacks"
        assert expected_type[widgets[widget]] in fields[parameter], f"{widget} ({widgets[widget]}) cannot show {fields[parameter]}"
    # ... and every field of the parameter node has its widget (none is left to hand-written code).
    assert set(fields) == set(bound.values()), f"parameters without a widget: {sorted(set(fields) - set(bound.values()))}"
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"
    # A bounded range: RangeBounds on the field, and the widget's own bounds agree with it.
    bounds = re.search(r"RangeBounds\(([-\d.]+),\s*([-\d.]+)\)", fields["sizeRange"])
    assert bounds, "sizeRange needs RangeBounds for the ctkRangeWidget"
    widget = next(w for w in ui.iter("widget") if w.get("name") == "sizeRangeWidget")
    props = {p.get("name"): p.find("double") for p in widget.findall("property")}
    assert (float(props["minimum"].text), float(props["maximum"].text)) == (float(bounds.group(1)), float(bounds.group(2)))

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
    assert defaults["useGpu"] is False
    size = next(n for n in wrapper.body if isinstance(n, ast.AnnAssign) and n.target.id == "sizeRange")
    default = re.search(r"Default\(FloatRange\(([-\d.]+),\s*([-\d.]+)\)\)", ast.unparse(size.annotation))
    assert default and (float(default.group(1)), float(default.group(2))) == (MIN_DIAMETER_MM, MAX_DIAMETER_MM)


def test_icon_and_screenshot_urls_name_files_of_this_repository():
    text = (ROOT / "CMakeLists.txt").read_text()
    urls = re.findall(r"https://raw\.githubusercontent\.com/[^/\s\"]+/[^/\s\"]+/main/([^\s\"]+)", text)
    assert len(urls) >= 2, "EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS point into the repository"
    for path in urls:
        assert (ROOT / path).is_file(), f"CMakeLists.txt links {path}, which is not in the repository"


# --- Slicer version and API ----------------------------------------------------------------


def test_one_minimum_slicer_version_everywhere():
    """README, module help, module docstring and the CMake check name the same version."""
    cmake = re.search(r'set\(CMBDETECT_MINIMUM_SLICER_VERSION "([\d.]+)"\)', (ROOT / "CMakeLists.txt").read_text())
    assert cmake, "the top CMakeLists.txt checks the minimum Slicer version"
    version = cmake.group(1)
    source = (ROOT / "CMBDetect/CMBDetect.py").read_text()
    assert f'MINIMUM_SLICER = "{version}"' in source
    help_text = source[source.index("helpText") : source.index("acknowledgementText")]
    assert f"Slicer {version} or later" in help_text
    readme = (ROOT / "README.md").read_text()
    assert f"3D Slicer {version} or later" in readme


def test_module_uses_the_api_of_its_minimum_slicer():
    source = (ROOT / "CMBDetect/CMBDetect.py").read_text()
    lib = "".join(p.read_text() for p in (ROOT / "CMBDetect/CMBDetectLib").rglob("*.py"))
    # slicer.packaging is not imported by `import slicer`: import it where it is used.
    installer = (ROOT / "CMBDetect/CMBDetectLib/installer.py").read_text()
    for text in (source, installer):
        if "slicer.packaging." in text:
            assert "import slicer.packaging" in text
    # No fallbacks for Slicer versions below the minimum (i18n exists there).
    assert "except ImportError:  # pragma: no cover - older Slicer" not in source
    assert "from slicer.i18n import tr as _\n" in source
    # Categories in the shared context, so a translated Slicer files the module with the others.
    assert 'translate("qSlicerAbstractCoreModule", "Segmentation")' in source
    # The Test never installs (ctest, Reload and Test): no install call in the test class.
    test_class = source[source.index("class CMBDetectTest") :]
    assert "setupPythonRequirements" not in test_class and "pip_install" not in test_class and "installTorch" not in test_class
    assert "skipTest" in test_class
    # Terminology through SetTag, which every supported Slicer has.
    assert "SetTerminology(" not in lib


def test_a_lib_that_fails_to_import_in_any_way_does_not_break_module_setup():
    """_adapter() imports the Lib on the GUI's events: a broken binary package raises OSError or
    others, not only ImportError, and the module must survive it (logged, then remembered)."""
    adapter = next(n for n in module_tree("CMBDetect").body if isinstance(n, ast.FunctionDef) and n.name == "_adapter")
    handlers = [h for h in ast.walk(adapter) if isinstance(h, ast.ExceptHandler)]
    assert handlers and all(h.type is not None and ast.unparse(h.type) == "Exception" for h in handlers)
    assert any("logging." in ast.unparse(h) for h in handlers), "the failure is logged"


def test_runs_leave_no_folders_in_slicers_temporary_folder():
    """slicer.util.tempDirectory() makes a new folder per call and nothing removes it: the
    module gives the job Slicer's temporary folder instead, and the job removes its own."""
    source = (ROOT / "CMBDetect/CMBDetect.py").read_text()
    assert "tempDirectory(" not in source
    assert "temp_dir=slicer.app.temporaryPath" in source
