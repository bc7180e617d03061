"""CMBReview's module file cannot run here (it needs Slicer's Qt): check what can be checked statically.

Names in the .ui and the code agree, the mimic reasons the widget offers are the store's, the
shortcuts are distinct, and the requirements ask only for what Slicer lacks.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from CMBReviewLib.store import MIMIC_REASONS

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "CMBReview" / "CMBReview.py"
UI = ROOT / "CMBReview" / "Resources" / "UI" / "CMBReview.ui"


def module_constant(name: str):
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == name for t in n.targets))
    return ast.literal_eval(node.value)


def test_ui_names_agree_with_the_module_code():
    ui = ET.parse(UI).getroot()
    widgets = {w.get("name"): w.get("class") for w in ui.iter("widget")}
    source = MODULE.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    for tuple_text in re.findall(r'for name in \(([^)]*)\)', source):  # widgets enabled by name in a loop
        used |= set(re.findall(r'"(\w+)"', tuple_text))
    assert used and not used - widgets.keys(), f"not in CMBReview.ui: {sorted(used - widgets.keys())}"
    interactive = {n for n, c in widgets.items() if c not in ("QLabel", "qMRMLWidget", "ctkCollapsibleButton")}
    assert not interactive - used, f"widgets the code never uses: {sorted(interactive - used)}"
    declared = {c.find("class").text for c in ui.iter("customwidget")}
    assert {c for c in widgets.values() if c.startswith(("qMRML", "ctk"))} <= declared
    assert ui.find("widget").get("class") == "qMRMLWidget"  # setMRMLScene is called on the root


def test_the_widget_offers_the_stores_mimic_reasons():
    assert module_constant("MIMIC_REASONS") == MIMIC_REASONS


def test_shortcuts_are_distinct_and_documented():
    shortcuts = module_constant("SHORTCUTS")
    assert len(set(shortcuts.values())) == len(shortcuts)
    ui_text = UI.read_text(encoding="utf-8")
    for action in ("nextCase", "previousCase", "correct", "incorrect", "possible", "addMissed"):
        assert f"({shortcuts[action]})" in ui_text, f"the button of {action} shows its key"


def _class_methods(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def test_logic_and_session_methods_the_module_calls_exist():
    source = MODULE.read_text(encoding="utf-8")
    logic = _class_methods(MODULE, "CMBReviewLogic")
    called = set(re.findall(r"self\.logic\.(\w+)\(", source)) | set(re.findall(r"\blogic\.(\w+)\(", source))
    assert called and not called - logic, f"CMBReviewLogic lacks {sorted(called - logic)}"
    # The widget and the Test reach the reading session as self.session / session.
    session = _class_methods(ROOT / "CMBReview" / "CMBReviewLib" / "session.py", "ReviewSession")
    called = set(re.findall(r"\bsession\.(\w+)\(", source))
    assert called and not called - session, f"ReviewSession lacks {sorted(called - session)}"


def test_requirements_ask_only_for_what_slicer_lacks():
    lines = [ln.split("#", 1)[0].strip() for ln in (ROOT / "CMBReview/Resources/requirements.txt").read_text(encoding="utf-8").splitlines()]
    requirements = [ln for ln in lines if ln]
    assert "statsmodels>=0.14" in requirements
    for line in requirements:
        name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower()
        assert name not in {"slicer", "slicer-core", "vtk", "simpleitk", "numpy", "torch", "scipy"}
        assert ">=" in line and "==" not in line
