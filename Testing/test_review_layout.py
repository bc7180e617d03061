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


def parameter_fields() -> dict[str, str]:
    """Fields of the module's @parameterNodeWrapper class: name -> annotation text."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CMBReviewParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in wrapper.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in wrapper.body if isinstance(n, ast.AnnAssign)}


def test_ui_names_agree_with_the_module_code():
    ui = ET.parse(UI).getroot()
    widgets = {w.get("name"): w.get("class") for w in ui.iter("widget")}
    source = MODULE.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    for tuple_text in re.findall(r'for name in \(([^)]*)\)', source):  # widgets enabled by name in a loop
        used |= set(re.findall(r'"(\w+)"', tuple_text))
    assert used and not used - widgets.keys(), f"not in CMBReview.ui: {sorted(used - widgets.keys())}"
    bound = {
        w.get("name"): p.find("string").text for w in ui.iter("widget") for p in w.findall("property") if p.get("name") == "SlicerParameterName"
    }
    interactive = {n for n, c in widgets.items() if c not in ("QLabel", "qMRMLWidget", "ctkCollapsibleButton")}
    assert not interactive - used - bound.keys(), f"widgets the code never uses: {sorted(interactive - used - bound.keys())}"
    declared = {c.find("class").text for c in ui.iter("customwidget")}
    assert {c for c in widgets.values() if c.startswith(("qMRML", "ctk"))} <= declared
    assert ui.find("widget").get("class") == "qMRMLWidget"  # setMRMLScene is called on the root


def test_the_parameter_node_holds_the_widgets_persistent_choices():
    """Each bound widget names a field of a type Slicer 5.10's parameterNodeWrapper connects it
    to (guiConnectors.py: ctkPathLineEdit and ctkDirectoryButton <-> pathlib.Path, QLineEdit <-> str),
    and each field has its widget."""
    ui = ET.parse(UI).getroot()
    widgets = {w.get("name"): w.get("class") for w in ui.iter("widget")}
    bound = {
        w.get("name"): p.find("string").text for w in ui.iter("widget") for p in w.findall("property") if p.get("name") == "SlicerParameterName"
    }
    fields = parameter_fields()
    connects = {"ctkPathLineEdit": "Path", "ctkDirectoryButton": "Path", "QLineEdit": "str"}
    for widget, parameter in bound.items():
        assert parameter in fields, f"{widget} is bound to {parameter}, which the parameter node lacks"
        assert fields[parameter] == connects[widgets[widget]], f"{widget} ({widgets[widget]}) cannot show {fields[parameter]}"
    assert set(fields) == set(bound.values()) and len(bound) == len(fields), "one widget per field"
    assert {"studyPath", "newStudyPath", "imagesFolder", "detectionsFolder", "readers"} <= fields.keys()
    source = MODULE.read_text(encoding="utf-8")
    assert "from pathlib import Path" in source, "the annotations are resolved in the module's globals"
    for name in ("newStudyPathLineEdit", "imagesDirectoryButton", "detectionsDirectoryButton", "readersLineEdit", "createStudyButton"):
        assert name in widgets, f"the New study section has {name}"


def test_the_widget_offers_the_stores_mimic_reasons():
    assert module_constant("MIMIC_REASONS") == MIMIC_REASONS


# Keys Slicer 5.10 itself binds in the main window (qSlicerMainWindow.ui, qSlicerMainWindow.cxx,
# qSlicerAppMainWindow.cxx, the Markups toolbar, the subject hierarchy, the Python console), and
# the Alt+letter mnemonics of its menus (&File, &Edit, &View, &Help).
SLICER_KEYS = {
    "Ctrl+O", "Ctrl+S", "Ctrl+W", "Ctrl+Z", "Ctrl+Y", "Ctrl+X", "Ctrl+C", "Ctrl+V", "Ctrl+H", "Ctrl+F", "Ctrl+B", "Ctrl+G",
    "Ctrl+`", *(f"Ctrl+{n}" for n in range(10)), "Ctrl+Shift+A", "Ctrl+Shift+T", "Ctrl+Shift+Space",
    "Alt+F", "Alt+E", "Alt+V", "Alt+H",
}  # fmt: skip


def test_shortcuts_are_distinct_documented_and_not_single_keys():
    """The module's keys live on the main window while the module is shown, so that they work with
    the focus in a slice view: none may be a bare key (it would fire while typing elsewhere and
    takes the slice views' own letters) or one Slicer already binds."""
    shortcuts = module_constant("SHORTCUTS")
    assert len({k.lower() for k in shortcuts.values()}) == len(shortcuts)
    for action, key in shortcuts.items():
        assert key.startswith(("Ctrl+", "Alt+")), f"{action}: {key} is a bare key"
        assert key.lower() not in {k.lower() for k in SLICER_KEYS}, f"{action}: Slicer binds {key} already"
    ui_text = UI.read_text(encoding="utf-8")
    for action in ("nextCase", "previousCase", "correct", "incorrect", "possible", "addMissed"):
        assert f"({shortcuts[action]})" in ui_text, f"the button of {action} shows its key"
    source = MODULE.read_text(encoding="utf-8")
    module_init = source[source.index("class CMBReview(") : source.index("acknowledgementText")]
    assert "for name, key in SHORTCUTS.items()" in module_init and "{keys}" in module_init, "the help text lists the keys"


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


def _dialog_methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}


def _shows_errors(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in ("tryWithErrorDisplay", "errorDisplay") for n in ast.walk(node))


def _self_calls(node: ast.AST) -> set[str]:
    return {
        n.func.attr for n in ast.walk(node)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) and n.func.value.id == "self"
    }  # fmt: skip


def test_a_failure_shows_one_dialog():
    """tryWithErrorDisplay shows its dialog and raises again: a step inside one that shows a dialog
    of its own (opening a study, then its statistics) would give the user two for one failure."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CMBReviewWidget")
    methods = _dialog_methods(widget)
    showing = {name for name, fn in methods.items() if _shows_errors(fn)}
    changed = True
    while changed:  # methods that show a dialog through another method they call
        more = {name for name, fn in methods.items() if _self_calls(fn) & showing} - showing
        showing |= more
        changed = bool(more)
    nested = []
    for name, fn in methods.items():
        for w in (n for n in ast.walk(fn) if isinstance(n, ast.With)):
            if any(_shows_errors(item.context_expr) for item in w.items):
                inner = set().union(*(_self_calls(stmt) for stmt in w.body)) & showing
                nested += [f"{name} -> {callee}" for callee in sorted(inner)]
    assert not nested, f"a dialog inside another's tryWithErrorDisplay: {nested}"


def test_scene_close_hands_the_case_to_the_session():
    source = MODULE.read_text(encoding="utf-8")
    assert "StartCloseEvent, self.onSceneStartClose" in source and "EndCloseEvent, self.onSceneEndClose" in source
    start = source[source.index("def onSceneStartClose") : source.index("def onSceneEndClose")]
    assert "scene_closing()" in start, "the session lets go of the nodes the scene takes"
    assert "_clickNode = None" in start and "_groundTruthNode = None" in start, "nor does the widget keep any"


def test_the_module_uses_the_api_of_slicer_5_10():
    source = MODULE.read_text(encoding="utf-8")
    assert "except ImportError:  # pragma: no cover - older Slicer" not in source, "slicer.i18n exists in every supported Slicer"
    assert "from slicer.i18n import tr as _\n" in source
    assert 'translate("qSlicerAbstractCoreModule", "Segmentation")' in source
    test_class = source[source.index("class CMBReviewTest") :]
    assert "setupPythonRequirements" not in test_class and "confirm=" not in test_class, "the self-test never installs"
