"""CMBReview's Python requirements: complete, installed the way CMBDetect's are, and not clashing
with CMBDetect's in the installed extension.

What CMBReviewLib imports is found by importing it, not by reading a list: a fresh interpreter
imports every CMBReviewLib module (and the CMBDetectLib modules CMBReviewLib names, lazy imports
included) and records each import statement that our own code runs. Every third-party package
so reached must come with Slicer, with the PyTorch extension (when the module asks for torch),
or be named in CMBReview's requirements file.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from CMBDetectLib import requirements
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "CMBReview" / "CMBReview.py"
REQUIREMENTS = ROOT / "CMBReview" / "Resources" / "CMBReview-requirements.txt"

# Import names that 3D Slicer's Python ships (never pip them into Slicer).
SHIPPED_WITH_SLICER = {"numpy", "scipy", "SimpleITK", "vtk", "vtkmodules", "slicer", "qt", "ctk", "packaging", "PIL", "requests", "pydicom"}

# Run in a fresh interpreter: records (importing module, imported top-level name) for every import
# statement executed by CMBReviewLib or CMBDetectLib code while all of CMBReviewLib is imported.
WALK = r"""
import ast, builtins, importlib, json, pathlib, sys
ours = ("CMBReviewLib", "CMBDetectLib")
seen = set()
real_import = builtins.__import__
def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    caller = (globals or {}).get("__name__", "")
    if level == 0 and caller.split(".")[0] in ours:
        seen.add((caller, name.split(".")[0]))
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = recording_import
package = pathlib.Path(sys.argv[1])
names = ["CMBReviewLib." + p.stem for p in sorted(package.glob("*.py")) if p.stem != "__init__"]
# CMBDetectLib modules CMBReviewLib names anywhere, also inside functions (they run on use).
for p in sorted(package.glob("*.py")):
    for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("CMBDetectLib"):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("CMBDetectLib")]
for name in names:
    importlib.import_module(name)
print(json.dumps(sorted(seen)))
"""


def reached_third_party() -> dict[str, set[str]]:
    """Top-level import name -> our modules that import it, as imported in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", WALK, str(ROOT / "CMBReview" / "CMBReviewLib")], capture_output=True, text=True, check=True)
    found: dict[str, set[str]] = {}
    for caller, name in json.loads(out.stdout.strip().splitlines()[-1]):
        if name not in sys.stdlib_module_names and name not in ("__future__", "CMBReviewLib", "CMBDetectLib"):
            found.setdefault(name, set()).add(caller)
    return found


def module_constant(name: str):
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == name for t in n.targets))
    return ast.literal_eval(node.value)


def listed_distributions(path: Path) -> dict[str, str]:
    """Normalised distribution name -> its requirement line."""
    return {re.sub(r"[-_.]+", "-", Requirement(line).name).lower(): line for line in requirements.requirement_lines(path)}


def test_everything_cmbreviewlib_imports_comes_with_slicer_or_is_required():
    reached = reached_third_party()
    assert {"statsmodels", "SimpleITK", "slicer"} <= reached.keys(), reached  # the walk saw the review's own imports
    distributions = packages_distributions()
    listed = listed_distributions(REQUIREMENTS)
    needs_torch = module_constant("NEEDS_TORCH")
    missing = []
    for name, callers in sorted(reached.items()):
        if name in SHIPPED_WITH_SLICER:
            continue
        if name == "torch":
            if not needs_torch:
                missing.append(f"torch (imported by {sorted(callers)}): set NEEDS_TORCH = True in CMBReview.py")
            continue
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(name, [name])}
        if not dists & listed.keys():
            missing.append(f"{name} ({'/'.join(sorted(dists))}, imported by {sorted(callers)[:3]})")
    assert not missing, f"add to {REQUIREMENTS.name}: {missing}"


def test_the_review_requirements_are_met_here_and_agree_with_cmbdetects():
    assert requirements.missing_packages(REQUIREMENTS) == []
    mine, detect = listed_distributions(REQUIREMENTS), listed_distributions(ROOT / "CMBDetect" / "Resources" / "requirements.txt")
    for name in mine.keys() & detect.keys():  # one package, one floor: the two modules share one Python
        assert Requirement(mine[name]).specifier == Requirement(detect[name]).specifier, (mine[name], detect[name])
    for line in mine.values():
        name = Requirement(line).name.lower()
        assert name not in {"slicer", "slicer-core", "vtk", "simpleitk", "numpy", "torch", "scipy"}, f"{name} comes with Slicer"
        assert ">=" in line and "==" not in line


def test_no_two_modules_install_a_resource_at_the_same_path():
    """Both modules install into one qt-scripted-modules folder (slicerMacroBuildScriptedModule
    without WITH_SUBDIR): two `Resources/requirements.txt` would overwrite each other there."""
    from test_extension_layout import MODULES, cmake_list

    owner: dict[str, str] = {}
    for module in MODULES:
        for entry in cmake_list(ROOT / module / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES") + cmake_list(
            ROOT / module / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS"
        ):
            assert entry not in owner, f"{module} and {owner[entry]} both install {entry}"
            owner[entry] = module


def test_the_module_installs_with_consent_through_the_shared_installer():
    """CMBReview.py cannot run here: it must hand its requirements to CMBDetectLib.installer (which
    asks through `confirm`, uses slicer.packaging where it exists, pip_install on 5.10)."""
    source = MODULE.read_text(encoding="utf-8")
    assert 'hasattr(slicer, "packaging")' not in source, "slicer.packaging is never an attribute of a plain `import slicer`"
    assert "from CMBDetectLib import installer" in source
    assert re.search(r"installer\.setup\(\s*self\.requirementsPath\(\),\s*\"CMBReview\",\s*confirm,\s*need_torch=NEEDS_TORCH", source)
    assert '"CMBReview-requirements.txt"' in source
    assert "pip_install(" not in source and "pip_ensure(" not in source
