"""A headless 3D Slicer application built from slicer-core, for tests and scripts.

slicer-core (Kitware's Qt-free MRML engine) gives the scene, nodes, storage and module
logics, but not `slicer.app`, `slicer.mrmlScene` or `slicer.modules`. This module wires them
together the way the Slicer application does at startup, so that code written for Slicer
(our MRML adapter, `slicer.util` array helpers) runs unchanged:

- one `vtkMRMLScene` and one `vtkSlicerApplicationLogic`;
- module logics registered with the application logic under Slicer's module names, Colors
  first, each given the application logic *before* the scene (the Colors logic reports an
  "invalid Colors module logic" otherwise, and other logics look Colors up at SetMRMLScene);
- a layout logic that creates the Red/Yellow/Green slice nodes and the 3D view node, so
  jumping slices to a lesion can be checked on real slice nodes;
- `slicer.mrmlScene` and `slicer.modules.<name>.logic()` set as the application sets them.

Never install the unrelated PyPI package named `slicer`: it shares the import name.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

# (Slicer module name, slicer.modules attribute, logic class name). Colors must stay first.
MODULE_LOGICS: tuple[tuple[str, str, str], ...] = (
    ("Colors", "colors", "vtkSlicerColorLogic"),
    ("Volumes", "volumes", "vtkSlicerVolumesLogic"),
    ("Segmentations", "segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("Markups", "markups", "vtkSlicerMarkupsLogic"),
    ("Terminologies", "terminologies", "vtkSlicerTerminologiesModuleLogic"),
    ("SubjectHierarchy", "subjecthierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("Tables", "tables", "vtkSlicerTablesLogic"),
)


@dataclass
class HeadlessSlicer:
    """The scene, the application logic and the module logics of one headless app."""

    scene: Any
    app_logic: Any
    layout_logic: Any
    logics: dict[str, Any] = field(default_factory=dict)

    def logic(self, module_name: str) -> Any:
        """Module logic by Slicer module name ("Segmentations") or attribute ("segmentations")."""
        for name, attr, _ in MODULE_LOGICS:
            if module_name in (name, attr):
                return self.logics[name]
        raise KeyError(module_name)

    def __getattr__(self, attr: str) -> Any:
        # mrml.volumes, mrml.segmentations, ... like slicer.modules.<name>.logic()
        for name, a, _ in MODULE_LOGICS:
            if attr == a and name in self.logics:
                return self.logics[name]
        raise AttributeError(attr)

    def clear(self) -> None:
        """Empty the scene as Slicer's File > Close Scene does, keeping singletons (views)."""
        import slicer

        self.scene.Clear(False)
        # Clear removes the subject hierarchy node too, and nothing in slicer-core makes a new
        # one (in Slicer the subject hierarchy plugins do, on scene close), while
        # GetSubjectHierarchyNode may hand back the removed node: resolve a fresh one.
        slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(self.scene)

    def slice_nodes(self) -> list[Any]:
        nodes = self.scene.GetNodesByClass("vtkMRMLSliceNode")
        return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


class _ModuleProxy:
    """What `slicer.modules.<name>` offers that our code uses: `logic()`."""

    def __init__(self, logic: Any) -> None:
        self._logic = logic

    def logic(self) -> Any:
        return self._logic


def _quietly(call) -> Any:
    """Run a VTK call with VTK's error output off.

    slicer-core ships no default colour tables and no terminology JSON files, so the Colors
    and Terminologies logics print errors about files they cannot find; nothing is wrong
    for our purposes (we set colours and terminology codes ourselves).
    """
    import vtk

    previous = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        return call()
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(previous)


def build_app(install_globals: bool = True) -> HeadlessSlicer:
    """Build a headless Slicer app on slicer-core; optionally set slicer.mrmlScene/modules."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    # The Colors logic looks for default colour files under the home directory.
    app_logic.SetHomeDirectory(tempfile.gettempdir())
    app_logic.SetMRMLScene(scene)  # adds the selection and interaction singletons

    logics: dict[str, Any] = {}
    for name, _, class_name in MODULE_LOGICS:
        cls = getattr(slicer, class_name, None)
        if cls is None:  # a logic this slicer-core build lacks; the app would lack the module
            continue
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        _quietly(lambda: logic.SetMRMLScene(scene))
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic

    # Slice views: presets first (Axial/Sagittal/Coronal), then the layout creates the nodes.
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLApplicationLogic(app_logic)
    layout_logic.SetMRMLScene(scene)
    layout_logic.GetLayoutNode().SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)

    app = HeadlessSlicer(scene=scene, app_logic=app_logic, layout_logic=layout_logic, logics=logics)
    if install_globals:
        install(app)
    return app


def install(app: HeadlessSlicer) -> None:
    """Make `slicer.mrmlScene` and `slicer.modules.<name>.logic()` point at this app."""
    import slicer

    slicer.mrmlScene = app.scene
    slicer.modules = SimpleNamespace(**{attr: _ModuleProxy(app.logics[name]) for name, attr, _ in MODULE_LOGICS if name in app.logics})


# --- Test volumes -----------------------------------------------------------------------

OBLIQUE_SPACING = (0.45, 0.6, 2.0)  # mm along i, j, k: in-plane SWI pixels, thick slices
OBLIQUE_ORIGIN_RAS = (31.5, -17.25, 12.0)


def rotation_matrix(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rotation about an arbitrary axis (Rodrigues' formula), a proper 3x3 rotation."""
    a = np.asarray(axis, dtype=float)
    a /= np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def oblique_ijk_to_ras(
    spacing: tuple[float, float, float] = OBLIQUE_SPACING,
    origin_ras: tuple[float, float, float] = OBLIQUE_ORIGIN_RAS,
    axis: tuple[float, float, float] = (1.0, 2.0, 3.0),
    degrees: float = 23.0,
) -> np.ndarray:
    """4x4 IJK-to-RAS of an oblique (rotated about an off-axis), anisotropic grid."""
    m = np.eye(4)
    m[:3, :3] = rotation_matrix(axis, degrees) @ np.diag(spacing)
    m[:3, 3] = origin_ras
    return m


def add_oblique_volume(
    array: np.ndarray,
    name: str = "SWI oblique",
    ijk_to_ras: np.ndarray | None = None,
) -> Any:
    """A scalar volume node holding `array` (k, j, i) on an oblique anisotropic grid."""
    import slicer.util

    return slicer.util.addVolumeFromArray(array, oblique_ijk_to_ras() if ijk_to_ras is None else ijk_to_ras, name)
