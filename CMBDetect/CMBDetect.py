"""CMBDetect: detect cerebral microbleeds on SWI (Fan et al. 2022, reimplemented).

The module file stays thin: GUI wiring, the parameter node and a Logic that delegates to
CMBDetectLib. Detection runs in a child process (`PythonSlicer -m CMBDetectLib.detection.worker`,
started and read by CMBDetectLib.detection.runner), so the GUI stays responsive and Cancel
works at every stage; CMBDetectLib.mrml turns a finished run into nodes and re-thresholds
the kept probability map. CMBDetectLib is imported only once its Python requirements are
set up, never at import time, so the module loads before torch is installed.

Minimum Slicer: 5.10 (Python 3.12). The Lib needs Python >= 3.10 (pyproject.toml), and
Slicer 5.8 runs Python 3.9; every Slicer call here exists in 5.10. `slicer.packaging`
(pip_ensure) exists from 5.12 on and is imported explicitly where it is used, with the
5.10 path (slicer.util.pip_install) kept for 5.10 and 5.11.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import time
import types
import unittest
from typing import Annotated, Callable, Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Default, FloatRange, RangeBounds, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

TORCH_REQUIREMENT = ">=2.1"
MINIMUM_SLICER = "5.10"
POLL_INTERVAL_MS = 200  # how often the GUI reads the detection process's progress
RETHRESHOLD_DELAY_MS = 300  # a slider drag re-extracts once it rests this long


#
# CMBDetect
#


class CMBDetect(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Cerebral Microbleed Detection")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        # No individual names to give yet: the project is published under a collective name.
        self.parent.contributors = ["CMBDetect contributors"]
        self.parent.helpText = _(
            "Detects cerebral microbleeds on susceptibility-weighted images (SWI): a 2.5D residual "
            "U-Net gives a probability map, lesions are thresholded, split into 3D connected "
            "components and kept between 2 and 10 mm (small 2-5 mm, large 5-10 mm). Results: a "
            "segmentation (one segment per microbleed), a lesion table, centroid markups and the "
            "probability map (a hidden volume). Moving the threshold or the size range afterwards "
            "re-extracts the lesions from that map at once, without running the network again. "
            "Click a row of the table to centre the views on that lesion.<br><br>"
            "<b>Compare with baseline</b> (optional): with an earlier scan of the same head chosen, "
            "\"Detect microbleeds\" compares the input with it as <code>cmbdetect longitudinal</code> does: "
            "the two scans registered and linked side by side, each lesion new, persisting or resolved, "
            "and the ARIA-H microhaemorrhage grade from the new microbleeds (mild 1-4, moderate 5-9, "
            "severe 10 or more). Superficial siderosis is not assessed; never a treatment decision.<br><br>"
            "Detection runs in a separate process with progress and Cancel. "
            "Needs 3D Slicer 5.10 or later and the PyTorch extension; the other Python packages are "
            "installed on the first detection, after asking.<br><br>"
            "<b>Research use only; not for clinical use.</b> The default model is trained on "
            "synthetic data and is not validated on patients; a model whose card says it is "
            "untrained produces meaningless detections. The same detection runs without the GUI: "
            "<code>PythonSlicer Scripts/cmbdetect_slicer_batch.py</code> (in the extension's "
            "qt-scripted-modules folder), or the project's <code>cmbdetect detect</code> command "
            "line outside Slicer.<br>"
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
    phaseVolume - optional: its high-pass filtered phase (radians, same grid); the candidate
        stage then tells paramagnetic bleeds from diamagnetic calcifications.
    baselineVolume - optional: an earlier scan of the same head; then a run compares inputVolume
        (the follow-up) with it (new microbleeds, ARIA-H grade) instead of detecting only.
    threshold - what makes a lesion: the network's probability (the paper's single-stage
        pipeline, 0.4) or, with the candidate stage, P(microbleed) per candidate (a run sets it
        to the stage's own cut, as the command line decides).
    sizeRange - kept lesion sizes, equivalent diameter in mm (2-10 in the paper).
    operatingPoint - stage 2's operating point on calibrated P(microbleed), from the classifier's
        card: count (precision first, the default) or review (sensitivity first, for triage).
    useGpu - run the network on CUDA (CPU otherwise).
    outputSegmentation - where lesions go; created on Apply when empty.
    showRejected - show the candidates stage 2 rejected in the views.
    The chosen model and the adapted model folders offered are kept in the same MRML node by
    CMBDetectLib.mrml.modelchoice (not fields here: the list changes, and CMBReview adds to it).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    phaseVolume: vtkMRMLScalarVolumeNode
    baselineVolume: vtkMRMLScalarVolumeNode
    threshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.4
    sizeRange: Annotated[FloatRange, RangeBounds(0.0, 20.0), Default(FloatRange(2.0, 10.0))]
    operatingPoint: Annotated[str, Choice(["count", "review"])] = "count"
    useGpu: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    showRejected: bool = True


#
# CMBDetectWidget
#


class CMBDetectWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI wiring only. A detection is a CMBDetectLib.mrml.job.DetectionJob (a child process),
    polled by a QTimer; Apply turns into Cancel while it runs. Nothing is written into the
    scene until the run has succeeded; closing the scene or deleting the input volume during
    a run ends it quietly."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[CMBDetectLogic] = None
        self._parameterNode: Optional[CMBDetectParameterNode] = None
        self._parameterNodeGuiTag = None
        self._job = None  # the running CMBDetectLib.mrml.job.DetectionJob or ComparisonJob
        self._finishJob = None  # what turns the finished job into nodes
        self._jobOutput = None  # (segmentation to fill or None, reuse a foreign one)
        self._busy = False  # installing requirements: Apply stays disabled
        self._shownSegmentation = None
        self._shownTable = None
        self._shownRejectedTable = None
        self._shownChanges = None  # the changes table of the last comparison
        self._lesionParameters = None  # (threshold, min, max) the shown lesions were made with

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMBDetect.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CMBDetectLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("activated(int)", self.onModelActivated)
        # Only a click on a row moves the views; a refreshed table (any parameter change) does not.
        self.ui.lesionTableView.connect("clicked(QModelIndex)", self.onLesionClicked)
        self.ui.rejectedTableView.connect("clicked(QModelIndex)", self.onRejectedClicked)
        self.ui.changesTableView.connect("clicked(QModelIndex)", self.onChangeClicked)
        self.ui.progressBar.hide()
        self.ui.changesCollapsibleButton.hide()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPollTimer)
        self._rethresholdTimer = qt.QTimer()
        self._rethresholdTimer.setSingleShot(True)
        self._rethresholdTimer.setInterval(RETHRESHOLD_DELAY_MS)
        self._rethresholdTimer.connect("timeout()", self._onRethresholdTimer)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopJob(_("Stopped: the module was closed."))
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopJob(_("Stopped: the scene was closed."))  # quietly: nothing to write into
        self._showComparison(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        if self._job is not None and self._job.uses(node):
            self._stopJob(_("Stopped: the input volume was deleted."))

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = next(
                (n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if not n.GetHideFromEditors()), None
            )
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[CMBDetectParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Two-way binding through the SlicerParameterName properties of the .ui widgets
            # (sizeRange: FloatRange <-> ctkRangeWidget).
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        self._updateApplyButton()
        self._fillModelComboBox()
        self._showOutputs(p.outputSegmentation if p else None)
        if p and self._job is None and self._lesionParameters is not None and self._currentLesionParameters() != self._lesionParameters:
            self._rethresholdTimer.start()  # restarted by every further change: one run per rest

    def _currentLesionParameters(self):
        p = self._parameterNode
        return (float(p.threshold), float(p.sizeRange.minimum), float(p.sizeRange.maximum))

    def _updateApplyButton(self) -> None:
        if self._job is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the detection now; the scene stays as it was.")
            self.ui.applyButton.enabled = True
        elif self._busy:
            self.ui.applyButton.text = _("Installing Python packages...")
            self.ui.applyButton.enabled = False
        elif self._parameterNode and self._parameterNode.inputVolume:
            self.ui.applyButton.text = _("Detect microbleeds")
            self.ui.applyButton.toolTip = (
                _("Detect microbleeds in the input volume and in the baseline, and count the new ones (ARIA-H).")
                if self._parameterNode.baselineVolume
                else _("Detect microbleeds in the input volume.")
            )
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Detect microbleeds")
            self.ui.applyButton.toolTip = _("Select an input SWI volume.")
            self.ui.applyButton.enabled = False

    def _setRunning(self, running: bool) -> None:
        # Nothing that could change the inputs under a running detection stays editable.
        for widget in (self.ui.inputsCollapsibleButton, self.ui.parametersCollapsibleButton, self.ui.outputsCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        self._updateApplyButton()

    # --- Model -------------------------------------------------------------------------

    def _fillModelComboBox(self) -> None:
        """The registry's models, the adapted folders offered, and "Adapted model folder..."
        last; the parameter node's choice selected. Rebuilt only when the list changes."""
        p = self._parameterNode
        if p is None:
            return
        try:
            choices = self.logic.modelChoices(p)
        except Exception:  # noqa: BLE001 - a broken registry must not break the module's setup
            logging.exception("CMBDetect: the model list")
            return
        items = [(c.label, c.spec) for c in choices] + [(_("Adapted model folder..."), None)]
        combo = self.ui.modelComboBox
        if getattr(self, "_modelItems", None) != items:
            self._modelItems = items
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for label, _spec in items:
                combo.addItem(label)
            combo.blockSignals(wasBlocked)
        chosen = self.logic.chosenModel(p) or ""
        index = next((n for n, (_label, spec) in enumerate(items) if spec == chosen), 0)
        if combo.currentIndex != index:
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = index
            combo.blockSignals(wasBlocked)

    def onModelActivated(self, index: int) -> None:
        p = self._parameterNode
        items = getattr(self, "_modelItems", [])
        if p is None or not 0 <= index < len(items):
            return
        spec = items[index][1]
        if spec is None:  # "Adapted model folder...": the folder `cmbdetect adapt -o` wrote
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Adapted model folder (cmbdetect adapt -o FOLDER)"))
            if folder:
                with slicer.util.tryWithErrorDisplay(_("This folder cannot be used as a model."), waitCursor=True):
                    self.logic.addAdaptedModel(p, folder)
            self._fillModelComboBox()  # back to the chosen model when nothing was added
            return
        self.logic.chooseModel(p, spec)

    # --- Detection -----------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self._job is not None:
            self._stopJob(_("Cancelled; the scene is as it was."))
            return
        p = self._parameterNode
        if p.baselineVolume:
            self._startComparison()
            return
        output = p.outputSegmentation
        reuseForeign = False
        if output is not None and not self.logic.isOwnOutput(output):
            choice = self._askForeignSegmentation(output)
            if choice is None:
                return
            reuseForeign = choice
            if not reuseForeign:
                output = None
        if not self._setupRequirements():
            return
        # The input (and phase) are copied and written for the child first: a moment on a large
        # volume, under a wait cursor.
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            self._job = self.logic.startDetection(
                p.inputVolume,
                threshold=p.threshold,
                minDiameterMm=p.sizeRange.minimum,
                maxDiameterMm=p.sizeRange.maximum,
                useGpu=p.useGpu,
                phaseVolume=p.phaseVolume,
                operatingPoint=p.operatingPoint,
                model=self.logic.chosenModel(p),
            )
        except Exception as exc:  # noqa: BLE001
            slicer.app.restoreOverrideCursor()
            slicer.util.errorDisplay(_("Microbleed detection could not start.") + "\n\n" + str(exc), windowTitle=_("Cerebral Microbleed Detection"))
            logging.exception("CMBDetect: start")
            return
        slicer.app.restoreOverrideCursor()
        self._jobOutput = (output, reuseForeign)
        self._finishJob = self._finishDetection
        self._setRunning(True)
        self.ui.summaryLabel.text = ""
        self._pollTimer.start()

    def _askForeignSegmentation(self, segmentation) -> Optional[bool]:
        """True: replace its segments; False: make a new segmentation; None: do nothing."""
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setIcon(qt.QMessageBox.Question)
        box.setWindowTitle(_("Cerebral Microbleed Detection"))
        box.setText(
            _("Segmentation '{name}' was not made by this module. Replace all of its segments with the detected microbleeds?").format(
                name=segmentation.GetName()
            )
        )
        # Standard buttons with our labels: exec_() then returns which one was pressed.
        box.setStandardButtons(qt.QMessageBox.Yes | qt.QMessageBox.No | qt.QMessageBox.Cancel)
        box.button(qt.QMessageBox.Yes).setText(_("Replace its segments"))
        box.button(qt.QMessageBox.No).setText(_("Create a new segmentation"))
        box.setDefaultButton(qt.QMessageBox.No)
        answer = box.exec_()
        return True if answer == qt.QMessageBox.Yes else (False if answer == qt.QMessageBox.No else None)

    def _setupRequirements(self) -> bool:
        """Install what is missing, after asking. Apply is disabled and the cursor waits meanwhile,
        so a second click cannot start a second install."""
        self._busy = True
        self._updateApplyButton()
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            self.logic.setupPythonRequirements(confirm=self._confirmInstall)
            return True
        except Exception as exc:  # noqa: BLE001 - every failure ends in a message, not a traceback popup
            slicer.util.errorDisplay(str(exc), windowTitle=_("Cerebral Microbleed Detection"))
            logging.exception("CMBDetect: Python requirements")
            return False
        finally:
            slicer.app.restoreOverrideCursor()
            self._busy = False
            self._updateApplyButton()

    @staticmethod
    def _confirmInstall(text: str) -> bool:
        slicer.app.setOverrideCursor(qt.Qt.ArrowCursor)  # a question, not a wait
        try:
            return slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Cerebral Microbleed Detection"))
        finally:
            slicer.app.restoreOverrideCursor()

    def _onPollTimer(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        job.poll()
        self.ui.progressBar.value = int(round(100 * job.run.fraction))
        self.ui.progressBar.format = f"{job.run.stage}: {job.run.message} (%p%)"
        if not job.run.finished:
            return
        self._pollTimer.stop()
        self._job = None
        self._setRunning(False)
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)  # writing the nodes takes a moment
        try:
            self._finishJob(job)
        except Exception as exc:  # noqa: BLE001
            if self.logic.isInputGone(exc):
                self.ui.summaryLabel.text = _("Stopped: the input volume was deleted.")
            else:
                slicer.util.errorDisplay(
                    (_("Microbleed detection failed.") if self._finishJob == self._finishDetection else _("The comparison with the baseline failed."))
                    + "\n\n" + str(exc),
                    windowTitle=_("Cerebral Microbleed Detection"),
                    detailedText="\n".join(job.run.log),
                )
        finally:
            slicer.app.restoreOverrideCursor()
            job.cleanup()

    def _finishDetection(self, job) -> None:
        output, reuseForeign = self._jobOutput
        result, segmentation, _table, _markups = self.logic.finishDetection(job, output, reuseForeign)
        # With the candidate stage the run cut P(microbleed) at the stage's own value: the slider
        # shows it, so that slider, summary and command line name one threshold. Setting it must
        # not start a re-threshold of its own.
        self._lesionParameters = None
        self._parameterNode.threshold = result.threshold
        self._lesionParameters = self._currentLesionParameters()
        self._parameterNode.outputSegmentation = segmentation  # also refreshes table and summary
        self._showOutputs(segmentation)

    # --- Compare with baseline -------------------------------------------------------------

    def _startComparison(self) -> None:
        """The input is the follow-up: both scans detected, registered and compared in a child
        process (CMBDetectLib.mrml.job.ComparisonJob), with the chosen model and operating point."""
        if not self._setupRequirements():
            return
        p = self._parameterNode
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)  # both volumes are written for the child first
        try:
            self._job = self.logic.startComparison(
                p.baselineVolume, p.inputVolume, useGpu=p.useGpu, model=self.logic.chosenModel(p), operatingPoint=p.operatingPoint
            )
        except Exception as exc:  # noqa: BLE001
            slicer.app.restoreOverrideCursor()
            slicer.util.errorDisplay(_("The comparison with the baseline could not start.") + "\n\n" + str(exc), windowTitle=_("Cerebral Microbleed Detection"))
            logging.exception("CMBDetect: start comparison")
            return
        slicer.app.restoreOverrideCursor()
        self._finishJob = self._finishComparison
        self._setRunning(True)
        self.ui.summaryLabel.text = ""
        self._pollTimer.start()

    def _finishComparison(self, job) -> None:
        comparison = self.logic.finishComparison(job)
        self._showComparison(comparison.table)

    def _showComparison(self, table) -> None:
        """The grade, what it does not cover, and the changes table of a comparison (None: hide)."""
        adapter = _adapter()
        summary = adapter.longitudinal.comparison_summary(table) if adapter is not None and table is not None else None
        self._shownChanges = table if summary is not None else None
        self.ui.changesTableView.setMRMLTableNode(self._shownChanges)
        self.ui.ariaGradeLabel.text = adapter.longitudinal.comparison_text(summary) if summary is not None else ""
        self.ui.changesCollapsibleButton.visible = summary is not None
        if summary is not None:
            self.ui.changesCollapsibleButton.collapsed = False

    def onChangeClicked(self, index) -> None:
        """Centre the linked views on the lesion of the clicked changes row (through the registration)."""
        adapter = _adapter()
        table = self._shownChanges
        if adapter is None or table is None or index is None or not index.isValid():
            return
        model = self.ui.changesTableView.model()
        try:
            rowId = int(float(model.data(model.index(index.row(), 0))))  # column 0 is the row's id, whatever the sorting
        except (TypeError, ValueError):
            return
        position = adapter.longitudinal.change_position_world(table, rowId)
        if position is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*position, True)

    def _stopJob(self, message: str) -> None:
        """End a running detection now (kills its process); the scene is left as it is."""
        job, self._job = self._job, None
        if job is None:
            return
        self._pollTimer.stop()
        job.cancel()
        job.cleanup()
        self._setRunning(False)
        self.ui.summaryLabel.text = message

    # --- Live threshold ------------------------------------------------------------------

    def _onRethresholdTimer(self) -> None:
        p = self._parameterNode
        segmentation = p.outputSegmentation if p else None
        if segmentation is None or self._job is not None or not self.logic.canRethreshold(segmentation):
            return
        if self._lesionParameters is None or self._currentLesionParameters() == self._lesionParameters:
            return  # nothing shown yet, or moved and moved back
        threshold, minimum, maximum = self._currentLesionParameters()
        if self.logic.segmentationEdited(segmentation) and not slicer.util.confirmOkCancelDisplay(
            _("The segments of '{name}' were edited since the detection wrote them. Moving the threshold or the size range "
              "extracts every lesion again and discards these edits. Discard them?").format(name=segmentation.GetName()),
            windowTitle=_("Cerebral Microbleed Detection"),
        ):  # fmt: skip
            # Keep the edits: the controls go back to what the shown lesions were made with.
            shownThreshold, low, high = self._lesionParameters
            p.threshold = shownThreshold
            p.sizeRange = FloatRange(low, high)
            self._rethresholdTimer.stop()  # restarted by the two changes just made
            return
        with slicer.util.tryWithErrorDisplay(_("Re-extracting the microbleeds failed."), waitCursor=True):
            self.logic.rethreshold(segmentation, threshold, minimum, maximum)
            self._lesionParameters = (threshold, minimum, maximum)
        self._showOutputs(segmentation)

    # --- Results ------------------------------------------------------------------------

    def _showOutputs(self, segmentation) -> None:
        """Table and summary of the segmentation's run (also after loading a saved scene).

        The table view gets a node only when the node changes: setMRMLTableNode emits
        selectionChanged and resets the columns, which must not happen on every parameter change."""
        adapter = _adapter()
        table = summary = rejectedTable = None
        if segmentation is not None and adapter is not None:
            table = adapter.nodes.outputs_of(segmentation)[1]
            summary = adapter.nodes.summary_of(segmentation)
            rejectedTable = adapter.nodes.rejected_of(segmentation)[1]
            adapter.display.set_rejected_visibility(segmentation, self._parameterNode.showRejected)
        if table is not self._shownTable:
            self._shownTable = table
            self.ui.lesionTableView.setMRMLTableNode(table)
        if rejectedTable is not self._shownRejectedTable:
            self._shownRejectedTable = rejectedTable
            self.ui.rejectedTableView.setMRMLTableNode(rejectedTable)
        self.ui.rejectedCollapsibleButton.visible = rejectedTable is not None  # a single-stage run has none
        if segmentation is not self._shownSegmentation:
            self._shownSegmentation = segmentation
            # Choosing a segmentation does not re-threshold it; moving a control afterwards does
            # (the summary says which threshold and size range its lesions were made with).
            self._lesionParameters = self._currentLesionParameters() if summary and self._parameterNode else None
        if self._job is None:
            self.ui.summaryLabel.text = _summaryText(summary) if summary else ""
        # The slider names what it cuts: the network's probability, or P(microbleed) per candidate.
        twoStage = bool(summary) and summary.get("threshold_of") == "p_microbleed"
        self.ui.thresholdLabel.text = _("P(microbleed) threshold:") if twoStage else _("Probability threshold:")

    def onLesionClicked(self, index) -> None:
        """Centre the slice views on the lesion of the clicked table row."""
        adapter = _adapter()
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        if adapter is not None and segmentation is not None:
            self._jumpToRow(self.ui.lesionTableView, index, adapter.nodes.outputs_of(segmentation)[2], adapter.navigation.lesion_index)

    def onRejectedClicked(self, index) -> None:
        """Centre the slice views on the rejected candidate of the clicked table row."""
        adapter = _adapter()
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        if adapter is not None and segmentation is not None:
            self._jumpToRow(self.ui.rejectedTableView, index, adapter.nodes.rejected_of(segmentation)[0], adapter.navigation.rejected_index)

    @staticmethod
    def _jumpToRow(view, index, markups, findPoint) -> None:
        """`findPoint(markups, id)`: the point of the id in column 0 of the row as displayed (the
        view may be sorted)."""
        if markups is None or index is None or not index.isValid():
            return
        model = view.model()
        try:
            rowId = int(float(model.data(model.index(index.row(), 0))))
        except (TypeError, ValueError):
            return
        pointIndex = findPoint(markups, rowId)
        if pointIndex is None:
            return
        position = _adapter().navigation.lesion_position_world(markups, pointIndex)
        slicer.modules.markups.logic().JumpSlicesToLocation(*position, True)


_ADAPTER = {"module": None, "failed": False}


def _adapter():
    """CMBDetectLib's MRML adapter (its `nodes`, `results`, `navigation`, `display` and `longitudinal` modules)
    if the requirements are installed, else None. A failed import is logged once and remembered
    until the requirements are set up again, so it is not retried on every event. Any exception
    counts, not only ImportError: a broken binary package raises OSError (a DLL that does not
    load) or others, and module setup must survive it."""
    if _ADAPTER["module"] is None and not _ADAPTER["failed"]:
        try:
            _ADAPTER["module"] = types.SimpleNamespace(
                **{name: importlib.import_module(f"CMBDetectLib.mrml.{name}") for name in ("nodes", "results", "navigation", "display", "longitudinal")}
            )
        except Exception:  # noqa: BLE001
            _ADAPTER["failed"] = True
            logging.exception("CMBDetect: the results cannot be shown until the Python requirements import")
    return _ADAPTER["module"]


def _summaryText(summary: dict) -> str:
    quantity = _("P(microbleed)") if summary.get("threshold_of") == "p_microbleed" else _("network probability")
    text = _("{n} microbleeds ({small} small, {large} large) at {quantity} >= {threshold}; detection took {seconds} s; model {model} v{version}").format(
        n=summary["n_lesions"],
        small=summary["n_small"],
        large=summary["n_large"],
        quantity=quantity,
        threshold=summary.get("threshold"),
        seconds=summary.get("seconds"),
        model=summary.get("model_id"),
        version=summary.get("model_version"),
    )
    stage = summary.get("candidate_stage")
    if stage:
        text += "<br>" + _("{n} candidates examined, {rejected} below the threshold (Rejected candidates); {phase}").format(
            n=stage.get("n_candidates"),
            rejected=stage.get("n_rejected"),
            phase=_("phase used.") if stage.get("phase_used") else _("no phase: a calcification-like spot is kept as a possible microbleed."),
        )
    if not summary.get("model_trained", False):
        text += "<br><b style='color:#c62828'>" + _("Untrained model: these detections mean nothing.") + "</b>"
    return text


#
# CMBDetectLogic
#


class CMBDetectLogic(ScriptedLoadableModuleLogic):
    """Thin: detection in a child process (CMBDetectLib.mrml.job.DetectionJob), nodes and the live
    threshold in CMBDetectLib.mrml, all tested headless. Never opens a dialog: questions go
    through the `confirm` callback the widget passes; scripts and tests pass none, and then
    nothing is ever installed."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CMBDetectParameterNode(super().getParameterNode())

    @staticmethod
    def requirementsPath() -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    # --- Python requirements (CMBDetectLib.installer, shared with CMBReview) ---------------

    def missingRequirements(self) -> list[str]:
        """What detection needs and this Slicer lacks (torch first); empty when all is there.
        Raises RuntimeError when torch is installed but older than TORCH_REQUIREMENT."""
        from CMBDetectLib import installer  # needs only `packaging`: importable on a fresh Slicer

        return installer.missing(self.requirementsPath(), torch_requirement=TORCH_REQUIREMENT)

    def setupPythonRequirements(self, confirm: Optional[Callable[[str], bool]] = None) -> None:
        """Install what is missing, only if `confirm(question)` returns True; RuntimeError with a
        readable message otherwise (nothing given to ask with, declined, or failed)."""
        from CMBDetectLib import installer

        try:
            installer.setup(self.requirementsPath(), "CMBDetect", confirm, torch_requirement=TORCH_REQUIREMENT)
        finally:
            _ADAPTER["failed"] = False  # the Lib may import now

    # --- Model (CMBDetectLib.mrml.modelchoice: the choice lives in the parameter node) ------

    @staticmethod
    def modelChoices(parameterNode) -> list:
        from CMBDetectLib.mrml import modelchoice

        return modelchoice.model_choices(modelchoice.adapted_folders(parameterNode.parameterNode))

    @staticmethod
    def chosenModel(parameterNode) -> Optional[str]:
        """The model for the worker's --model: a registry id or an adapted folder; None: the default."""
        from CMBDetectLib.mrml import modelchoice

        return modelchoice.chosen_model(parameterNode.parameterNode)

    @staticmethod
    def chooseModel(parameterNode, spec: Optional[str]) -> None:
        from CMBDetectLib.mrml import modelchoice

        modelchoice.choose_model(parameterNode.parameterNode, spec)

    @staticmethod
    def addAdaptedModel(parameterNode, folder: str) -> str:
        """Offer an adapted model folder and choose it; ValueError when it is not one."""
        from CMBDetectLib.mrml import modelchoice

        return modelchoice.offer_adapted_model(parameterNode.parameterNode, folder)

    # --- Detection -----------------------------------------------------------------------

    @staticmethod
    def isOwnOutput(segmentation) -> bool:
        """Made by CMBDetect (attribute CMBDetect.Created): only such nodes are refilled unasked."""
        return segmentation is not None and segmentation.GetAttribute("CMBDetect.Created") == "1"

    @staticmethod
    def isInputGone(exc: BaseException) -> bool:
        from CMBDetectLib.mrml.job import InputGone

        return isinstance(exc, InputGone)

    @staticmethod
    def workerPython() -> tuple[str, Optional[dict]]:
        """PythonSlicer and the environment Slicer started with, as slicer.util.launchConsoleProcess
        uses: PythonSlicer is a launcher that sets up Slicer's Python itself. Slicer puts it on
        PATH (slicer.util._executePythonModule relies on the same)."""
        pythonSlicer = shutil.which("PythonSlicer")
        if not pythonSlicer:
            raise RuntimeError(_("PythonSlicer was not found on PATH; it runs the detection beside Slicer."))
        return pythonSlicer, slicer.util.startupEnvironment()

    def startDetection(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        threshold: float = 0.4,
        minDiameterMm: float = 2.0,
        maxDiameterMm: float = 10.0,
        useGpu: bool = False,
        model: Optional[str] = None,
        phaseVolume: Optional[vtkMRMLScalarVolumeNode] = None,
        operatingPoint: Optional[str] = None,
    ):
        """Start detecting in a child process; returns the running CMBDetectLib.mrml.job.DetectionJob.
        phaseVolume (optional, on inputVolume's grid) goes to the candidate stage; operatingPoint
        ("count" or "review"; None: the classifier card's default) decides what it keeps."""
        if not inputVolume:
            raise ValueError(_("Input volume is invalid"))
        from CMBDetectLib.mrml.job import DetectionJob

        python, env = self.workerPython()
        job = DetectionJob(
            inputVolume,
            # One folder of the job's own in Slicer's temporary folder, removed by job.cleanup()
            # (slicer.util's tempDirectory would leave an empty folder behind per run).
            temp_dir=slicer.app.temporaryPath,
            python=python,
            env=env,
            threshold=threshold,
            min_diameter_mm=minDiameterMm,
            max_diameter_mm=maxDiameterMm,
            device="cuda" if useGpu else "cpu",
            model=model,
            phase_volume_node=phaseVolume,
            operating_point=operatingPoint,
        )
        logging.info(f"CMBDetect: detecting in {inputVolume.GetName()} on {'cuda' if useGpu else 'cpu'}")
        return self._started(job)

    @staticmethod
    def _started(job):
        """The job with its child process started; its temporary folder removed if it cannot start."""
        try:
            job.start()
        except Exception:
            job.cleanup()
            raise
        return job

    def finishDetection(self, job, outputSegmentation=None, reuseForeign: bool = False):
        """Nodes from a finished job: (lesion map, segmentation, table, markups). Raises if the
        run failed (its message) or the input left the scene (CMBDetectLib.mrml.job.InputGone)."""
        result = job.finish(outputSegmentation, reuse_foreign=reuseForeign)
        logging.info(f"CMBDetect: {len(result[0].lesions)} microbleeds")
        return result

    def startComparison(
        self,
        baselineVolume: vtkMRMLScalarVolumeNode,
        followupVolume: vtkMRMLScalarVolumeNode,
        useGpu: bool = False,
        model: Optional[str] = None,
        operatingPoint: Optional[str] = None,
    ):
        """Start comparing followupVolume with baselineVolume in a child process (what
        `cmbdetect longitudinal` runs); returns the running CMBDetectLib.mrml.job.ComparisonJob."""
        if not followupVolume:
            raise ValueError(_("Input volume is invalid"))
        from CMBDetectLib.mrml.job import ComparisonJob

        python, env = self.workerPython()
        job = ComparisonJob(
            baselineVolume,
            followupVolume,
            temp_dir=slicer.app.temporaryPath,
            python=python,
            env=env,
            device="cuda" if useGpu else "cpu",
            model=model,
            operating_point=operatingPoint,
        )
        logging.info(f"CMBDetect: comparing {followupVolume.GetName()} with the baseline {baselineVolume.GetName()}")
        return self._started(job)

    def finishComparison(self, job):
        """The comparison in the scene (CMBDetectLib.mrml.longitudinal.Comparison: transform, changes
        table, new-bleed points, grade). Raises if the run failed (its message: a follow-up that does
        not register is refused, not graded) or an input left the scene (InputGone)."""
        comparison = job.finish()
        logging.info(f"CMBDetect: ARIA-H {comparison.grade}")
        return comparison

    def process(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        outputSegmentation: Optional[vtkMRMLSegmentationNode] = None,
        threshold: float = 0.4,
        minDiameterMm: float = 2.0,
        maxDiameterMm: float = 10.0,
        useGpu: bool = False,
        reuseForeign: bool = False,
        progressCallback: Optional[Callable[[float, str], None]] = None,
        phaseVolume: Optional[vtkMRMLScalarVolumeNode] = None,
        operatingPoint: Optional[str] = None,
    ):
        """Detect microbleeds in inputVolume and wait for the result; for scripts and tests.

        The same child process as the GUI's. A segmentation CMBDetect did not make is not
        emptied unless reuseForeign (a new one is made instead). Returns (lesion map,
        segmentation, table, markups); the lesion map's summary() says which model ran and
        whether it is trained.
        """
        job = self.startDetection(
            inputVolume, threshold, minDiameterMm, maxDiameterMm, useGpu, phaseVolume=phaseVolume, operatingPoint=operatingPoint
        )
        try:
            while not job.run.finished:
                job.poll()
                if progressCallback:
                    progressCallback(job.run.fraction, job.run.message)
                time.sleep(POLL_INTERVAL_MS / 1000)
            return self.finishDetection(job, outputSegmentation, reuseForeign)
        finally:
            job.cancel()  # nothing if it ended; a kill if an exception came through
            job.cleanup()

    # --- Live threshold ------------------------------------------------------------------

    @staticmethod
    def segmentationEdited(segmentation) -> bool:
        """Whether its segments were edited by hand since CMBDetect wrote them (a re-threshold would discard that)."""
        from CMBDetectLib.mrml.results import edited_since_written

        return edited_since_written(segmentation)

    @staticmethod
    def canRethreshold(segmentation) -> bool:
        adapter = _adapter()
        return adapter is not None and adapter.results.probability_of(segmentation) is not None

    def rethreshold(self, segmentation, threshold: float, minDiameterMm: float, maxDiameterMm: float):
        """Lesions again from the segmentation's kept probability map (no network): rewrites
        its segments, table, markups and summary. Returns (lesion map, segmentation, table, markups)."""
        from CMBDetectLib.mrml.results import rethreshold

        return rethreshold(segmentation, threshold, minDiameterMm, maxDiameterMm)


#
# CMBDetectTest
#


class CMBDetectTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (ctest, or Reload and Test): a synthetic SWI-like volume with dark spheres
    on an oblique, anisotropic grid goes through the Logic (child process included); the
    outputs must lie on the input's grid, a re-threshold must rewrite them, and a segmentation
    the module did not make must survive. Never installs anything: without torch or the
    requirements it is skipped, with the reason. Detection quality is not checked here."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        try:
            self.test_CMBDetect_outputsOnInputGrid()
        except unittest.SkipTest as exc:
            # "Reload and Test" calls runTest directly, outside a unittest runner.
            self.delayDisplay(f"Test skipped: {exc}")
            if slicer.app.testingEnabled():
                raise

    def test_CMBDetect_outputsOnInputGrid(self) -> None:
        logic = CMBDetectLogic()
        try:
            missing = logic.missingRequirements()
        except RuntimeError as exc:  # torch too old
            self.skipTest(str(exc))
        if missing:
            self.skipTest("CMBDetect's Python requirements are not installed in this Slicer (this test never installs): " + ", ".join(missing))
        from CMBDetectLib import selftest

        selftest.outputs_on_input_grid(self, logic)
