"""CMBDetect: detect cerebral microbleeds on SWI (Fan et al. 2022, reimplemented).

The module file stays thin: GUI wiring, the parameter node and a Logic that delegates to
CMBDetectLib (pipeline.detect_volume for the detection, mrml.write_result for the nodes).
CMBDetectLib is imported only once its Python requirements are set up (on the first Apply,
never at import time), so the module loads even before torch is installed.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Annotated, Callable, Optional

import slicer
import vtk
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

try:  # translatable strings in Slicer >= 5.4; plain strings before
    from slicer.i18n import tr as _
except ImportError:  # pragma: no cover - older Slicer

    def _(text: str) -> str:
        return text


TORCH_REQUIREMENT = ">=2.1"


#
# CMBDetect
#


class CMBDetect(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CMBDetect")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["CMBDetect contributors"]
        self.parent.helpText = _(
            "Detects cerebral microbleeds on susceptibility-weighted images (SWI): a 2.5D residual "
            "U-Net gives a probability map, lesions are thresholded, split into 3D connected "
            "components and kept between 2 and 10 mm (small 2-5 mm, large 5-10 mm). Results: a "
            "segmentation (one segment per microbleed), a lesion table and centroid markups; "
            "select a row of the table to centre the views on that lesion.<br><br>"
            "<b>Research use only; not for clinical use.</b> The default model is trained on "
            "synthetic data and is not validated on patients; a model whose card says it is "
            "untrained produces meaningless detections. The same detection runs without the GUI: "
            "<code>cmbdetect detect</code> or <code>Scripts/cmbdetect_slicer_batch.py</code>.<br>"
            'See <a href="https://github.com/cmbdetect/SlicerCMBDetect">the project page</a>.'
        )
        self.parent.acknowledgementText = _(
            "Reimplements the method of Fan P, Shan W, Yang H, et al. Cerebral microbleed automatic "
            "detection system based on the deep learning. Frontiers in Medicine 2022;9:807443. "
            "doi:10.3389/fmed.2022.807443. Independent open-source work, not affiliated with the authors."
        )


#
# CMBDetectParameterNode
#


@parameterNodeWrapper
class CMBDetectParameterNode:
    """
    inputVolume - the SWI magnitude volume.
    threshold - probability threshold (the paper's operating point is 0.4).
    minDiameterMm, maxDiameterMm - kept lesion sizes, equivalent diameter in mm.
    useGpu - run the network on CUDA (CPU otherwise).
    outputSegmentation - where lesions go; created on Apply when empty.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    threshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.4
    minDiameterMm: Annotated[float, WithinRange(0.0, 20.0)] = 2.0
    maxDiameterMm: Annotated[float, WithinRange(0.0, 20.0)] = 10.0
    useGpu: bool = False
    outputSegmentation: vtkMRMLSegmentationNode


#
# CMBDetectWidget
#


class CMBDetectWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Detection runs in the GUI thread; the progress callback calls processEvents, so the
    window stays live and the Cancel button (the Apply button while running) is read
    before every batch of slices (one slice per batch on CPU by default), which bounds the
    delay of Cancel. Why not a child process like SlicerMONAIAuto3DSeg: the volume and the
    result would cross a process boundary through files, each run would pay torch's
    start-up again, and the loaded model would not stay cached between runs."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[CMBDetectLogic] = None
        self._parameterNode: Optional[CMBDetectParameterNode] = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMBDetect.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CMBDetectLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        # Two floats in one ctkRangeWidget: bound by hand (the wrapper binds one value per widget).
        self.ui.sizeRangeWidget.connect("valuesChanged(double,double)", self.onSizeRangeChanged)
        self.ui.lesionTableView.connect("selectionChanged()", self.onLesionSelected)
        self.ui.progressBar.hide()

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRequested = True  # a running detection must not write into a closing scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[CMBDetectParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Two-way binding through the SlicerParameterName properties of the .ui widgets.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p:
            wasBlocked = self.ui.sizeRangeWidget.blockSignals(True)
            self.ui.sizeRangeWidget.setValues(p.minDiameterMm, p.maxDiameterMm)
            self.ui.sizeRangeWidget.blockSignals(wasBlocked)
        self._updateApplyButton()
        self._showOutputs(p.outputSegmentation if p else None)

    def onSizeRangeChanged(self, minimum: float, maximum: float) -> None:
        if self._parameterNode:
            with slicer.util.NodeModify(self._parameterNode.parameterNode):
                self._parameterNode.minDiameterMm = minimum
                self._parameterNode.maxDiameterMm = maximum

    def _updateApplyButton(self) -> None:
        if self._running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the detection; earlier results stay as they were.")
            self.ui.applyButton.enabled = True
        elif self._parameterNode and self._parameterNode.inputVolume:
            self.ui.applyButton.text = _("Detect microbleeds")
            self.ui.applyButton.toolTip = _("Detect microbleeds in the input volume.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Detect microbleeds")
            self.ui.applyButton.toolTip = _("Select an input SWI volume.")
            self.ui.applyButton.enabled = False

    def _setRunning(self, running: bool) -> None:
        self._running = running
        self._cancelRequested = False
        # Nothing that could change the inputs under a running detection stays editable.
        for widget in (self.ui.inputsCollapsibleButton, self.ui.parametersCollapsibleButton, self.ui.outputsCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        self._updateApplyButton()

    def onApplyButton(self) -> None:
        if self._running:
            self._cancelRequested = True
            self.ui.applyButton.text = _("Cancelling...")
            self.ui.applyButton.enabled = False
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Microbleed detection failed."), waitCursor=False):
            self.logic.setupPythonRequirements(interactive=True)
            from CMBDetectLib.detection.pipeline import Cancelled

            self._setRunning(True)
            try:
                result, segmentation, _table, _markups = self.logic.process(
                    p.inputVolume,
                    p.outputSegmentation,
                    threshold=p.threshold,
                    minDiameterMm=p.minDiameterMm,
                    maxDiameterMm=p.maxDiameterMm,
                    useGpu=p.useGpu,
                    progressCallback=self._onProgress,
                    cancelCallback=lambda: self._cancelRequested,
                )
            except Cancelled:
                self.ui.summaryLabel.text = _("Cancelled; the previous results, if any, are unchanged.")
                return
            finally:
                self._setRunning(False)
            p.outputSegmentation = segmentation  # also refreshes the table view and summary
            self._showOutputs(segmentation)

    def _onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{message} (%p%)"
        slicer.app.processEvents()  # repaint, and let a click on Cancel through

    def _showOutputs(self, segmentation) -> None:
        """Table and summary of the segmentation's run (also after loading a saved scene)."""
        adapter = _adapter()
        table = summary = None
        if segmentation is not None and adapter is not None:
            table = adapter.outputs_of(segmentation)[1]
            summary = adapter.summary_of(segmentation)
        self.ui.lesionTableView.setMRMLTableNode(table)
        self.ui.summaryLabel.text = _summaryText(summary) if summary else ""

    def onLesionSelected(self) -> None:
        """Centre the slice views on the lesion of the selected table row."""
        adapter = _adapter()
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        view = self.ui.lesionTableView
        index = view.selectionModel().currentIndex() if view.selectionModel() else None
        if adapter is None or segmentation is None or index is None or not index.isValid():
            return
        markups = adapter.outputs_of(segmentation)[2]
        # The view may be sorted: read the lesion id (column 0) of the row as displayed.
        model = view.model()
        try:
            lesionId = int(float(model.data(model.index(index.row(), 0))))
        except (TypeError, ValueError):
            return
        pointIndex = adapter.lesion_index(markups, lesionId) if markups else None
        if pointIndex is None:
            return
        position = adapter.lesion_position_world(markups, pointIndex)
        slicer.modules.markups.logic().JumpSlicesToLocation(*position, True)


def _adapter():
    """CMBDetectLib.mrml if its requirements are installed (after the first Apply), else None."""
    try:
        return importlib.import_module("CMBDetectLib.mrml")
    except ImportError:
        return None


def _summaryText(summary: dict) -> str:
    text = _("{n} microbleeds ({small} small, {large} large) in {seconds} s; model {model} v{version}").format(
        n=summary["n_lesions"],
        small=summary["n_small"],
        large=summary["n_large"],
        seconds=summary["seconds"],
        model=summary["model_id"],
        version=summary["model_version"],
    )
    if not summary.get("model_trained", False):
        text += "<br><b style='color:#c62828'>" + _("Untrained model: these detections mean nothing.") + "</b>"
    return text


#
# CMBDetectLogic
#


class CMBDetectLogic(ScriptedLoadableModuleLogic):
    """Thin: everything happens in CMBDetectLib (pipeline for the detection, mrml for the
    nodes), which is tested headless. Never opens a dialog, except setupPythonRequirements
    when asked to be interactive."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CMBDetectParameterNode(super().getParameterNode())

    @staticmethod
    def requirementsPath() -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    def setupPythonRequirements(self, interactive: bool = True) -> None:
        """Install what CMBDetectLib needs and Slicer lacks; call before the first detection.

        torch comes through the PyTorch extension (right CUDA build for the machine); the rest
        from Resources/requirements.txt. Raises RuntimeError if something is missing and
        could not be installed (or the user declined).
        """
        self._ensureTorch(interactive)
        self._ensureRequirements(interactive)
        importlib.invalidate_caches()

    @staticmethod
    def _ensureTorch(interactive: bool) -> None:
        try:
            import torch  # noqa: F401

            return
        except ImportError:
            pass
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(_("CMBDetect needs the PyTorch extension: install it from the Extensions Manager, then restart.")) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=interactive, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                raise RuntimeError(_("PyTorch is required to detect microbleeds and was not installed."))

    def _ensureRequirements(self, interactive: bool) -> None:
        path = self.requirementsPath()
        if hasattr(slicer, "packaging"):  # Slicer >= 5.12: checks, asks, installs, says if a restart is needed
            import inspect

            requirements = slicer.packaging.load_requirements(path)
            options = {"requester": "CMBDetect"}
            if "prompt_install" in inspect.signature(slicer.packaging.pip_ensure).parameters:
                options["prompt_install"] = interactive
            slicer.packaging.pip_ensure(requirements, **options)
            return
        missing = _missingRequirements(path)
        if not missing:
            return
        if interactive and not slicer.util.confirmOkCancelDisplay(
            _("CMBDetect needs these Python packages, which will be downloaded and installed now:") + "\n\n" + "\n".join(missing),
            windowTitle="CMBDetect",
        ):
            raise RuntimeError(_("Python packages needed by CMBDetect were not installed: ") + ", ".join(missing))
        slicer.util.pip_install(missing)

    def process(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        outputSegmentation: Optional[vtkMRMLSegmentationNode] = None,
        threshold: float = 0.4,
        minDiameterMm: float = 2.0,
        maxDiameterMm: float = 10.0,
        useGpu: bool = False,
        progressCallback: Optional[Callable[[float, str], None]] = None,
        cancelCallback: Optional[Callable[[], bool]] = None,
    ):
        """Detect microbleeds in inputVolume; can be used without the GUI widget.

        Writes (or rewrites) the output segmentation, its lesion table and centroid markups.
        Returns (result, segmentation, table, markups); result is a
        CMBDetectLib.detection.pipeline.DetectionResult (result.model_trained says whether the model
        means anything). Raises CMBDetectLib.detection.pipeline.Cancelled when cancelCallback() is true.
        """
        if not inputVolume:
            raise ValueError(_("Input volume is invalid"))
        import torch
        from CMBDetectLib import mrml
        from CMBDetectLib.detection.pipeline import DetectionParams

        if useGpu and not torch.cuda.is_available():
            raise RuntimeError(
                _("No CUDA GPU is available to PyTorch here: uncheck 'Use GPU', or install a CUDA build of PyTorch with the PyTorch extension.")
            )

        params = DetectionParams(
            threshold=threshold,
            min_diameter_mm=minDiameterMm,
            max_diameter_mm=maxDiameterMm,
            device="cuda" if useGpu else "cpu",
        )
        logging.info(f"CMBDetect: processing {inputVolume.GetName()} on {params.device}")
        result, segmentation, table, markups = mrml.run_detection(
            inputVolume, params, outputSegmentation, progress=progressCallback, cancel=cancelCallback
        )
        logging.info(f"CMBDetect: {len(result.lesions)} microbleeds in {result.seconds:.1f} s (model {result.model_id})")
        return result, segmentation, table, markups


def _missingRequirements(path: str) -> list[str]:
    """Lines of requirements.txt that are not installed at a satisfying version."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    missing = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            requirement = Requirement(line)
            try:
                if requirement.specifier.contains(version(requirement.name), prereleases=True):
                    continue
            except PackageNotFoundError:
                pass
            missing.append(line)
    return missing


#
# CMBDetectTest
#


class CMBDetectTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (ctest): a synthetic SWI-like volume with dark spheres on an oblique,
    anisotropic grid goes through the Logic; the outputs must exist and lie on the input's
    grid. What the model finds is only checked if the shipped model is a trained one."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_CMBDetect_outputsOnInputGrid()

    def test_CMBDetect_outputsOnInputGrid(self) -> None:
        import numpy as np

        self.delayDisplay("Starting the test")
        logic = CMBDetectLogic()
        try:
            logic.setupPythonRequirements(interactive=False)
            import CMBDetectLib.detection.pipeline  # noqa: F401
        except (ImportError, RuntimeError) as exc:
            self.skipTest(f"CMBDetect's Python requirements are not installed in this Slicer ({exc})")

        # SWI-like: bright tissue in an ellipse, dark air around it, two dark spheres (4 and 7 mm).
        spacing = np.array([0.45, 0.6, 2.0])
        shape = (12, 200, 240)
        kk, jj, ii = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
        head = ((jj - 100) / 90.0) ** 2 + ((ii - 120) / 108.0) ** 2 < 1
        array = np.where(head, 420.0, 8.0).astype(np.float32)
        array += np.random.default_rng(0).normal(0, 6, shape).astype(np.float32)
        for (ck, cj, ci), diameter in (((6, 100, 80), 4.0), ((5, 130, 165), 7.0)):
            r2 = ((kk - ck) * spacing[2]) ** 2 + ((jj - cj) * spacing[1]) ** 2 + ((ii - ci) * spacing[0]) ** 2
            array[r2 <= (diameter / 2) ** 2] = 10.0
        angle = np.deg2rad(20.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        tilt = np.array([[1, 0, 0], [0, np.cos(angle / 2), -np.sin(angle / 2)], [0, np.sin(angle / 2), np.cos(angle / 2)]])
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = rotation @ tilt @ np.diag(spacing)
        ijkToRas[:3, 3] = (30.0, -12.0, 7.5)
        inputVolume = slicer.util.addVolumeFromArray(np.abs(array), ijkToRas, "CMBDetectTestSWI")

        self.delayDisplay("Detecting")
        result, segmentation, table, markups = logic.process(inputVolume)

        # Outputs exist, count the same lesions, and the segmentation lies on the input grid.
        nLesions = len(result.lesions)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), nLesions)
        self.assertEqual(table.GetNumberOfRows(), nLesions)
        self.assertEqual(markups.GetNumberOfControlPoints(), nLesions)
        role = segmentation.GetReferenceImageGeometryReferenceRole()
        self.assertIs(segmentation.GetNodeReference(role), inputVolume)
        converter = slicer.vtkSegmentationConverter
        geometryImage = slicer.vtkOrientedImageData()
        converter.DeserializeImageGeometry(
            segmentation.GetSegmentation().GetConversionParameter(converter.GetReferenceImageGeometryParameterName()), geometryImage
        )
        matrix = vtk.vtkMatrix4x4()
        geometryImage.GetImageToWorldMatrix(matrix)
        self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(matrix), ijkToRas, atol=1e-4))
        for n, lesion in enumerate(result.lesions):
            ras = (ijkToRas @ [*lesion.centroid_ijk, 1.0])[:3]
            self.assertTrue(np.allclose(slicer.util.arrayFromMarkupsControlPoints(markups)[n], ras, atol=1e-4))
            self.assertEqual(segmentation.GetSegmentation().GetNthSegment(n).GetName(), f"CMB {lesion.id}")

        # Nothing is claimed of detection quality here: this toy head has no anatomy, and the
        # model's figures are measured by `cmbdetect evaluate` on held-out synthetic SWI (README).

        # Running again replaces the outputs instead of adding nodes.
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        again = logic.process(inputVolume, segmentation)
        self.assertIs(again[1], segmentation)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), len(again[0].lesions))
        self.delayDisplay("Test passed")
