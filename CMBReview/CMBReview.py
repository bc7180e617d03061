"""CMBReview: the experts' side of CMBDetect. Readers triage the detector's lesions, add what it
missed, label ground truth slice by slice, endorse each other's labelling; the study's statistics
(the paper's Table 4, kappas) and a consensus ground truth come out of it.

This file only wires widgets to CMBReviewLib (the study store, statistics and MRML adapter),
which is imported once its requirements are set up, never at import time. The requirements are
installed through CMBDetectLib.installer, shared with CMBDetect, only after the user agrees.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Keyboard: case navigation, lesion navigation and triage (also listed in the help text). They
# live on the main window while the module is shown, so that they work with the focus in a slice
# view; hence no bare keys (those would take the slice views' own letters and fire while typing)
# and none Slicer binds already (Ctrl+C/X/V are Edit's, Alt+F/E/V/H open its menus). Plain
# arrows stay with the slice views (they move slices there); lesions move with Ctrl+arrows.
SHORTCUTS = {
    "nextCase": "Ctrl+Right", "previousCase": "Ctrl+Left", "nextLesion": "Ctrl+Down", "previousLesion": "Ctrl+Up",
    "correct": "Alt+C", "incorrect": "Alt+X", "possible": "Alt+P", "addMissed": "Alt+M",
}  # fmt: skip

# CMBReviewLib reaches CMBDetectLib's outputs and records only, which are torch-free (for Slicer's
# own process), so a reviewer's Slicer needs no PyTorch; Testing/test_review_requirements.py
# fails if an import of torch comes back.
NEEDS_TORCH = False


class CMBReview(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CMBReview")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["CMBDetect"]
        self.parent.contributors = ["CMBDetect contributors"]
        keys = ", ".join(f"{name}: {key}" for name, key in SHORTCUTS.items())
        self.parent.helpText = _(
            "Expert review of cerebral microbleed detections made by the CMBDetect module (or `cmbdetect detect`).<br><br>"
            "Open a study, or create one under <i>New study</i> from a folder of SWI volumes and the folder of "
            "their CMBDetect results (the same checks as <tt>cmbdetect review create</tt>); choose a reader, and go through the cases: "
            "each detected lesion is judged correct or incorrect (with the mimic it is: vessel, calcification, ...; "
            "definite or possible), missed lesions are added with one click or painted, ground truth can be labelled "
            "in the Segment Editor and endorsed by a second reader. Every decision is stored at once. "
            "The study's Table 4 and kappas are shown below and written by <tt>cmbdetect review report</tt>.<br><br>"
            f"Keys: {keys}.<br><br>"
            "<b>Research use only; not for clinical use.</b> The default detection model is trained on synthetic data."
        )
        self.parent.acknowledgementText = _(
            "Part of CMBDetect, which reimplements Fan P, Shan W, Yang H, et al. Cerebral microbleed "
            "automatic detection system based on the deep learning. Frontiers in Medicine 2022;9:807443."
        )


#
# CMBReviewParameterNode
#


@parameterNodeWrapper
class CMBReviewParameterNode:
    """
    The widget's persistent choices (saved with the scene); an empty path field reads as "."
    (CMBReviewLib.session.chosen_path treats that as not chosen).
    studyPath - the study file to open.
    newStudyPath - where New study writes a study.
    imagesFolder - the SWI volumes of the new study's cases.
    detectionsFolder - their CMBDetect results (<case>_lesions.csv, _lesions.nii.gz, _summary.json).
    readers - the new study's readers, separated by commas or spaces.
    adaptOutputFolder - where "Adapt the model to this site" writes the adapted model.
    """

    studyPath: Path
    newStudyPath: Path
    imagesFolder: Path
    detectionsFolder: Path
    readers: str
    adaptOutputFolder: Path


#
# CMBReviewWidget
#


class CMBReviewWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the widgets to the reading session (CMBReviewLib/session.py), which holds the study,
    the reader, the open case and its nodes; every click is one session call. A failure shows
    one dialog: no step shown inside another's tryWithErrorDisplay shows one of its own."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[CMBReviewLogic] = None
        self._parameterNode: Optional[CMBReviewParameterNode] = None
        self._parameterNodeGuiTag = None
        self._shortcuts: list[Any] = []
        self._clickNode = None
        self._groundTruthNode = None
        self._timer = qt.QTimer()
        self._timer.setInterval(1000)
        self._adaptJob = None  # the running CMBReviewLib.adaptjob.AdaptJob
        self._adaptTimer = qt.QTimer()
        self._adaptTimer.setInterval(500)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMBReview.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CMBReviewLogic()

        self.ui.studyPathLineEdit.filters = ctkPathFilters()
        self.ui.studyPathLineEdit.nameFilters = ["Review study (*.db *.sqlite)"]
        self.ui.newStudyPathLineEdit.filters = ctkPathFilters(writable=True)  # a save dialog
        self.ui.newStudyPathLineEdit.nameFilters = ["Review study (*.db)"]
        self.ui.reasonComboBox.addItems(list(MIMIC_REASONS))
        self.ui.openStudyButton.connect("clicked(bool)", self.onOpenStudy)
        self.ui.createStudyButton.connect("clicked(bool)", self.onCreateStudy)
        self.ui.addReaderButton.connect("clicked(bool)", self.onAddReader)
        self.ui.readerComboBox.connect("currentIndexChanged(int)", lambda _: self.onReaderChanged())
        self.ui.caseListWidget.connect("currentRowChanged(int)", self.onCaseSelected)
        self.ui.nextCaseButton.connect("clicked(bool)", lambda: self.onStepCase(+1))
        self.ui.previousCaseButton.connect("clicked(bool)", lambda: self.onStepCase(-1))
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.caseDoneButton.connect("clicked(bool)", self.onCaseDone)
        self.ui.lesionTableWidget.connect("currentCellChanged(int, int, int, int)", lambda row, *_: self.onLesionSelected(row))
        self.ui.correctButton.connect("clicked(bool)", lambda: self.onVerdict("correct"))
        self.ui.incorrectButton.connect("clicked(bool)", lambda: self.onVerdict("incorrect"))
        self.ui.addMissedButton.connect("clicked(bool)", self.onAddMissed)
        self.ui.storeEditsButton.connect("clicked(bool)", self.onStoreEdits)
        self.ui.groundTruthButton.connect("clicked(bool)", self.onGroundTruth)
        self.ui.saveGroundTruthButton.connect("clicked(bool)", self.onSaveGroundTruth)
        self.ui.endorseButton.connect("clicked(bool)", self.onEndorse)
        self.ui.statisticsButton.connect("clicked(bool)", self.onStatistics)
        self.ui.reportButton.connect("clicked(bool)", self.onReport)
        self.ui.adaptButton.connect("clicked(bool)", self.onAdapt)
        self.ui.adaptProgressBar.hide()
        self._timer.connect("timeout()", self._onTick)
        self._adaptTimer.connect("timeout()", self._onAdaptTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._enableCaseWidgets(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopAdaptation()
        try:
            self._finishCase()
        finally:
            self._timer.stop()
            self.removeObservers()
            self._removeShortcuts()

    def onSceneStartClose(self, caller, event) -> None:
        """Closing the scene removes the case's nodes and the widget's own: the session stores
        what it can and lets go of them (CMBReviewLib.session.ReviewSession.scene_closing), and
        so does the widget; the reader opens the case again in the next scene."""
        self._timer.stop()
        problems = self.session.scene_closing() if self.session is not None else []
        if self._clickNode is not None:
            self.removeObserver(self._clickNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onClick)
        self._clickNode = None
        self._groundTruthNode = None
        self._enableCaseWidgets(False)
        self.setParameterNode(None)
        if problems:
            text = _("The scene was closed while a case was open; not everything could be stored:") + "\n\n" + "\n".join(problems)
            self.ui.statusLabel.text = text
            # Shown once the scene has closed: a modal dialog inside the close would hold it up.
            qt.QTimer.singleShot(0, lambda: slicer.util.errorDisplay(text, windowTitle=_("CMBReview")))

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        self._refreshCaseList()
        self.ui.caseListWidget.blockSignals(True)
        self.ui.caseListWidget.setCurrentRow(-1)  # a click on the case opens it again
        self.ui.caseListWidget.blockSignals(False)
        self._showCase()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._installShortcuts()

    def exit(self) -> None:
        self._removeShortcuts()
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[CMBReviewParameterNode]) -> None:
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Two-way binding through the SlicerParameterName properties of the .ui widgets.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    @property
    def session(self):
        return self.logic.session

    # --- keyboard ---------------------------------------------------------------------

    def _installShortcuts(self) -> None:
        self._removeShortcuts()
        actions = {
            "nextCase": lambda: self.onStepCase(+1), "previousCase": lambda: self.onStepCase(-1),
            "nextLesion": lambda: self._stepLesion(+1), "previousLesion": lambda: self._stepLesion(-1),
            "correct": lambda: self.onVerdict("correct"), "incorrect": lambda: self.onVerdict("incorrect"),
            "possible": lambda: self.ui.possibleCheckBox.toggle(), "addMissed": self.onAddMissed,
        }  # fmt: skip
        for name, key in SHORTCUTS.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", actions[name])
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []

    # --- requirements, study, reader, cases ---------------------------------------------

    def _studyOpen(self) -> bool:
        return self.session is not None and self.session.study is not None

    def _setupRequirements(self) -> bool:
        """Install what is missing, after asking (CMBDetectLib.installer, as CMBDetect does). Open
        and Create stay disabled and the cursor waits meanwhile; a failure is one message."""
        buttons = (self.ui.openStudyButton, self.ui.createStudyButton)
        for button in buttons:
            button.enabled = False
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            self.logic.setupPythonRequirements(confirm=self._confirmInstall)
            return True
        except Exception as exc:  # noqa: BLE001 - every failure ends in a message, not a traceback popup
            slicer.util.errorDisplay(str(exc), windowTitle=_("CMBReview"))
            logging.exception("CMBReview: Python requirements")
            return False
        finally:
            slicer.app.restoreOverrideCursor()
            for button in buttons:
                button.enabled = True

    @staticmethod
    def _confirmInstall(text: str) -> bool:
        slicer.app.setOverrideCursor(qt.Qt.ArrowCursor)  # a question, not a wait
        try:
            return slicer.util.confirmOkCancelDisplay(text, windowTitle=_("CMBReview"))
        finally:
            slicer.app.restoreOverrideCursor()

    def onOpenStudy(self) -> None:
        path = self._parameterNode.studyPath
        if not self._setupRequirements():
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not open the study {path}.").format(path=path), waitCursor=True):
                self._timer.stop()
                self.logic.openStudy(path)
        except Exception:  # shown once, by tryWithErrorDisplay
            logging.exception("CMBReview: opening %s", path)
            return
        self._showStudy()

    def onCreateStudy(self) -> None:
        """New study: the images folder and the detections folder checked as `cmbdetect review
        create` checks them; the study opens, and the cases left out are listed in one message."""
        p = self._parameterNode
        if not self._setupRequirements():
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not create the study {path}.").format(path=p.newStudyPath), waitCursor=True):
                self._timer.stop()
                added, leftOut = self.logic.createStudy(p.newStudyPath, p.imagesFolder, p.detectionsFolder, p.readers)
        except Exception:  # shown once, by tryWithErrorDisplay
            logging.exception("CMBReview: creating %s", p.newStudyPath)
            return
        p.studyPath = self.session.study.path
        self._showStudy()
        text = _("Created the study {path} with {n} case(s).").format(path=self.session.study.path, n=len(added))
        self.ui.statusLabel.text = text
        if leftOut:
            slicer.util.warningDisplay(
                text + "\n\n" + _("Left out:") + "\n" + "\n".join(str(e) for e in leftOut), windowTitle=_("CMBReview")
            )

    def _showStudy(self) -> None:
        """The open study in the panel: its readers (the first is chosen if none was), this
        reader's cases, and the statistics, whose failure is its own one message naming the study."""
        readers = self.session.readers()
        if self.session.reader is None and readers:
            self.session.select_reader(readers[0])
        self.ui.readerComboBox.blockSignals(True)
        self.ui.readerComboBox.clear()
        self.ui.readerComboBox.addItems(readers)
        self.ui.readerComboBox.setCurrentText(self.session.reader or "")
        self.ui.readerComboBox.blockSignals(False)
        self._enableCaseWidgets(False)
        self._refreshCaseList()
        self._showCase()
        self._showStatistics(_("The study {path} is open, but its statistics could not be computed.").format(path=self.session.study.path))

    def onAddReader(self) -> None:
        if not self._studyOpen():
            return
        name = qt.QInputDialog.getText(slicer.util.mainWindow(), _("Add reader"), _("Reader name (letters, digits, - and _):"))
        if name:
            with slicer.util.tryWithErrorDisplay(_("Could not add the reader.")):
                self.session.add_reader(name)
                self.ui.readerComboBox.addItem(name)
                self.ui.readerComboBox.setCurrentText(name)

    def onReaderChanged(self) -> None:
        if not self._studyOpen():
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not switch the reader.")):
                self.session.select_reader(self.ui.readerComboBox.currentText.strip())
        finally:
            # The combo shows the reader decisions are filed under, also when the switch failed.
            self.ui.readerComboBox.blockSignals(True)
            self.ui.readerComboBox.setCurrentText(self.session.reader or "")
            self.ui.readerComboBox.blockSignals(False)
            self._refreshCaseList()
            self._showCase()

    def _refreshCaseList(self) -> None:
        if not self._studyOpen() or not self.session.reader:
            return
        rows = self.session.case_list()
        self.ui.caseListWidget.blockSignals(True)
        current = self.ui.caseListWidget.currentRow
        self.ui.caseListWidget.clear()
        for name, done in rows:
            self.ui.caseListWidget.addItem(("[done] " if done else "") + name)
        self.ui.caseListWidget.setCurrentRow(current)
        self.ui.caseListWidget.blockSignals(False)
        self.ui.progressLabel.text = _("{done} of {total} cases done").format(done=sum(d for _, d in rows), total=len(rows))

    def onResume(self) -> None:
        if self._studyOpen() and self.session.reader:
            self.ui.caseListWidget.setCurrentRow(min(self.session.resume_position(), self.ui.caseListWidget.count - 1))

    def onStepCase(self, step: int) -> None:
        row = self.ui.caseListWidget.currentRow + step
        if 0 <= row < self.ui.caseListWidget.count:
            self.ui.caseListWidget.setCurrentRow(row)

    def onCaseSelected(self, row: int) -> None:
        self._finishCase()
        if row < 0 or not self._studyOpen() or not self.session.reader:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the case."), waitCursor=True):
            self.session.open_case(row)
            self._showCase()

    def _showCase(self) -> None:
        """Show the session's open case (if any): its volume, its lesions, the clock."""
        nodes = self.session.nodes
        self._enableCaseWidgets(nodes is not None)
        if nodes is None:
            self._timer.stop()
            return
        slicer.util.setSliceViewerLayers(background=nodes.volume, fit=True)
        self._fillLesionTable()
        self._timer.start()
        if self.ui.lesionTableWidget.rowCount:
            self.ui.lesionTableWidget.setCurrentCell(0, 0)

    def _finishCase(self, completed: Optional[bool] = None) -> None:
        """Leaving a case stores its edits and reading time; completed when every lesion is judged.
        If that fails the case stays open (and keeps being stored every second)."""
        if self.session is not None and self.session.nodes is not None:
            with slicer.util.tryWithErrorDisplay(_("Could not store the case.")):
                self.session.close_case(completed)
            self._refreshCaseList()
        self._timer.stop()
        self._enableCaseWidgets(False)

    def onCaseDone(self) -> None:
        self._finishCase(completed=True)
        self.onStepCase(+1)

    def _onTick(self) -> None:
        """Every second: the clock, and whatever was painted or typed since the last store is stored
        (a crash loses at most a second's work); problems go to the status line, not a dialog a second."""
        self.ui.timerLabel.text = _("{s:.0f} s on this case").format(s=self.session.elapsed_seconds())
        try:
            done = self.session.store_edits_if_changed()
        except Exception as exc:  # shown, and tried again at the next tick
            self.ui.statusLabel.text = _("Not stored: {error}").format(error=exc)
            return
        if done:
            self._showStored(done)

    def _showStored(self, done: dict) -> None:
        if done["added"] or done["replaced"] or done["withdrawn"]:
            self._fillLesionTable()
        text = _("Stored {verdicts} verdicts, {added} added lesions, {replaced} repainted, {withdrawn} withdrawn.").format(**done)
        self.ui.statusLabel.text = text + ("".join(" " + e for e in done["errors"]) if done["errors"] else "")

    def _enableCaseWidgets(self, enabled: bool) -> None:
        for name in ("correctButton", "incorrectButton", "reasonComboBox", "possibleCheckBox", "addMissedButton", "storeEditsButton",
                     "groundTruthButton", "saveGroundTruthButton", "endorseButton", "caseDoneButton", "lesionTableWidget"):  # fmt: skip
            getattr(self.ui, name).enabled = enabled

    # --- lesions ------------------------------------------------------------------------

    def _fillLesionTable(self) -> None:
        table = self.ui.lesionTableWidget
        rows = self.session.lesion_rows()
        table.setRowCount(len(rows))
        for r, (label, verdict) in enumerate(rows):
            table.setItem(r, 0, qt.QTableWidgetItem(label))
            table.setItem(r, 1, qt.QTableWidgetItem(verdict or _("(not judged)")))

    def _stepLesion(self, step: int) -> None:
        table = self.ui.lesionTableWidget
        row = table.currentRow() + step
        if 0 <= row < table.rowCount:
            table.setCurrentCell(row, 0)

    def onLesionSelected(self, row: int) -> None:
        if row >= 0 and self.session.nodes is not None:
            self.session.jump_to(row)

    def onVerdict(self, verdict: str) -> None:
        row = self.ui.lesionTableWidget.currentRow()
        if row < 0 or self.session is None or self.session.nodes is None:
            return
        reason = self.ui.reasonComboBox.currentText if verdict == "incorrect" else None
        certainty = "possible" if self.ui.possibleCheckBox.checked else "definite"
        with slicer.util.tryWithErrorDisplay(_("Could not store the verdict.")):
            self.session.set_verdict(row, verdict, reason, certainty)
            self._fillLesionTable()
            self._stepLesion(+1) if row + 1 < self.ui.lesionTableWidget.rowCount else self.ui.lesionTableWidget.setCurrentCell(row, 0)

    def onAddMissed(self) -> None:
        """One click: place a point in a view; the lesion is grown there and stored."""
        if self.session is None or self.session.nodes is None:
            return
        if self._clickNode is None:
            self._clickNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "CMBReview click")
            self._clickNode.SetHideFromEditors(True)
            self.addObserver(self._clickNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onClick)
        slicer.modules.markups.logic().SetActiveList(self._clickNode)
        slicer.modules.markups.logic().StartPlaceMode(0)

    def _onClick(self, caller, event) -> None:
        position = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(caller.GetNumberOfControlPoints() - 1, position)
        caller.RemoveAllControlPoints()
        certainty = "possible" if self.ui.possibleCheckBox.checked else "definite"
        with slicer.util.tryWithErrorDisplay(_("Could not add a lesion there.")):
            self.session.add_missed_at(position, certainty)
            self._fillLesionTable()

    def onStoreEdits(self) -> None:
        if self.session is None or self.session.nodes is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not store the edits.")):
            done = self.session.store_edits()
            self._fillLesionTable()
            self._showStored(done)
            if done["errors"]:
                slicer.util.errorDisplay("\n".join(done["errors"]))

    # --- ground truth -------------------------------------------------------------------

    def onGroundTruth(self) -> None:
        """Label this case slice by slice in the Segment Editor, on a segmentation of the reader's own."""
        nodes = self.session.nodes
        self._groundTruthNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{nodes.case} ground truth ({nodes.reader})")
        self._groundTruthNode.CreateDefaultDisplayNodes()
        self._groundTruthNode.SetReferenceImageGeometryParameterFromVolumeNode(nodes.volume)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(self._groundTruthNode)
        editor.setSourceVolumeNode(nodes.volume)

    def onSaveGroundTruth(self) -> None:
        if self._groundTruthNode is None:
            slicer.util.errorDisplay(_("Start a ground-truth labelling first."))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not store the ground truth.")):
            self.session.store_groundtruth(self._groundTruthNode)
            self.ui.statusLabel.text = _("Ground truth stored (a new version; earlier ones are kept).")

    def onEndorse(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not endorse.")):
            author = self.session.endorse_latest()
            self.ui.statusLabel.text = _("Endorsed the ground truth by {author}.").format(author=author)

    # --- statistics ---------------------------------------------------------------------

    def onStatistics(self) -> None:
        if self._studyOpen():
            self._showStatistics(_("Could not compute the statistics of the study {path}.").format(path=self.session.study.path))

    def _showStatistics(self, message: str) -> None:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            self.ui.statisticsTextBrowser.setHtml(self.session.statistics_html())

    def onReport(self) -> None:
        if not self._studyOpen():
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder for the report"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Could not write the report."), waitCursor=True):
                paths = self.session.write_report(folder)
                self.ui.statusLabel.text = _("Wrote {path}").format(path=paths.get("html"))

    # --- Adapt the model to this site (a child process: the GUI stays responsive) ------------

    def onAdapt(self) -> None:
        if self._adaptJob is not None:
            self._stopAdaptation()
            self.ui.statusLabel.text = _("Adaptation cancelled; the output folder keeps what it had written (work/).")
            return
        if not self._studyOpen():
            return
        from CMBReviewLib.session import chosen_path

        out = chosen_path(self._parameterNode.adaptOutputFolder) if self._parameterNode else None
        if out is None:
            slicer.util.errorDisplay(_("Choose an output folder for the adapted model first."), windowTitle=_("CMBReview"))
            return
        with slicer.util.tryWithErrorDisplay(_("The adaptation could not start."), waitCursor=True):
            self.logic.setupAdaptRequirements(confirm=self._confirmInstall)
            self._adaptJob = self.logic.startAdaptation(self.session.study.path, out, self.ui.adaptMinutesSpinBox.value)
        if self._adaptJob is None:
            return
        self.ui.adaptButton.text = _("Cancel adaptation")
        self.ui.adaptProgressBar.value = 0
        self.ui.adaptProgressBar.show()
        self._adaptTimer.start()

    def _onAdaptTimer(self) -> None:
        job = self._adaptJob
        if job is None:
            self._adaptTimer.stop()
            return
        job.poll()
        self.ui.adaptProgressBar.value = int(round(100 * job.run.fraction))
        self.ui.adaptProgressBar.format = f"{job.run.message} (%p%)"
        if not job.run.finished:
            return
        self._endAdaptation()
        if job.run.state == "succeeded":
            with slicer.util.tryWithErrorDisplay(_("The adapted model could not be offered in CMBDetect."), waitCursor=True):
                folder = self.logic.offerAdaptedModel(job.out)
                self.ui.statusLabel.text = _("Adapted model written to {folder}; CMBDetect's model selector now offers it (and has chosen it).").format(folder=folder)
        else:
            slicer.util.errorDisplay(_("The adaptation failed.") + "\n\n" + job.run.error, windowTitle=_("CMBReview"), detailedText="\n".join(job.run.log))

    def _endAdaptation(self) -> None:
        self._adaptTimer.stop()
        self._adaptJob = None
        self.ui.adaptButton.text = _("Adapt the model to this site")
        self.ui.adaptProgressBar.hide()

    def _stopAdaptation(self) -> None:
        """Kill a running adaptation (and everything it started) now."""
        job = self._adaptJob
        if job is not None:
            job.cancel()
            self._endAdaptation()


def ctkPathFilters(writable: bool = False) -> int:
    import ctk

    # Files | Writable makes the browse button a save dialog (a new study's file).
    return ctk.ctkPathLineEdit.Files | (ctk.ctkPathLineEdit.Writable if writable else ctk.ctkPathLineEdit.Readable)


MIMIC_REASONS = ("vessel", "calcification", "cavernous_malformation", "partial_volume", "artefact", "iron_deposit", "other")


#
# CMBReviewLogic
#


class CMBReviewLogic(ScriptedLoadableModuleLogic):
    """Works without the widget: sets up CMBReviewLib's requirements (CMBDetectLib.installer, with
    the user's consent), then holds the reading session (CMBReviewLib.session.ReviewSession),
    where everything a reader does is done. Never opens a dialog: questions go through the
    `confirm` callback the widget passes; scripts and tests pass none, and then nothing is
    ever installed."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = None  # created once the requirements are in place (not at import time)

    def getParameterNode(self):
        return CMBReviewParameterNode(super().getParameterNode())

    @staticmethod
    def requirementsPath() -> str:
        # Not Resources/requirements.txt: both modules install into one folder, where that is CMBDetect's.
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "CMBReview-requirements.txt")

    def setupPythonRequirements(self, confirm: Optional[Callable[[str], bool]] = None) -> None:
        """Install what CMBReviewLib needs and Slicer lacks, only if `confirm(question)` returns True;
        RuntimeError with a readable message otherwise (nothing to ask with, declined, or failed)."""
        from CMBDetectLib import installer  # needs only `packaging`: importable on a fresh Slicer

        installer.setup(self.requirementsPath(), "CMBReview", confirm, need_torch=NEEDS_TORCH)

    def _session(self):
        if self.session is None:
            from CMBReviewLib.session import ReviewSession

            self.session = ReviewSession()
        return self.session

    def openStudy(self, path, confirm: Optional[Callable[[str], bool]] = None) -> None:
        self.setupPythonRequirements(confirm)
        session = self._session()
        session.open_study(path)

    def createStudy(self, path, imagesFolder, detectionsFolder, readers: str = "", confirm: Optional[Callable[[str], bool]] = None):
        """A new study from a folder of SWI volumes and the folder of their CMBDetect results, with
        `cmbdetect review create`'s checks, and the readers typed (commas or spaces); opened at
        once. Returns (cases added, CaseErrors of the cases left out)."""
        self.setupPythonRequirements(confirm)
        from CMBReviewLib.session import reader_names

        session = self._session()
        return session.create_study(path, imagesFolder, detectionsFolder, reader_names(readers))

    # --- Adapt the model to this site -----------------------------------------------------

    @staticmethod
    def _cmbdetectResources() -> str:
        return os.path.join(os.path.dirname(os.path.abspath(slicer.modules.cmbdetect.path)), "Resources")

    def setupAdaptRequirements(self, confirm: Optional[Callable[[str], bool]] = None) -> None:
        """What `cmbdetect adapt` needs: CMBDetect's detection requirements (torch included) and
        Resources/adapt-requirements.txt (scikit-learn, statsmodels); installed only if `confirm` agrees."""
        from CMBDetectLib import installer

        resources = self._cmbdetectResources()
        installer.setup(os.path.join(resources, "requirements.txt"), "CMBDetect", confirm)
        installer.setup(os.path.join(resources, "adapt-requirements.txt"), "CMBReview", confirm, need_torch=False)

    @staticmethod
    def startAdaptation(studyPath, outFolder, maxMinutes: float, python: Optional[str] = None, env: Optional[dict] = None):
        """Start `adapt --study` in PythonSlicer; returns the running CMBReviewLib.adaptjob.AdaptJob."""
        import shutil

        from CMBReviewLib.adaptjob import AdaptJob

        if python is None:
            python = shutil.which("PythonSlicer")
            if not python:
                raise RuntimeError(_("PythonSlicer was not found on PATH; it runs the adaptation beside Slicer."))
            env = slicer.util.startupEnvironment()
        job = AdaptJob(studyPath, outFolder, float(maxMinutes), python=python, env=env)
        job.start()
        return job

    @staticmethod
    def offerAdaptedModel(folder) -> str:
        """Offer the folder in CMBDetect's model selector (its parameter node), and choose it there."""
        from CMBDetectLib.mrml import modelchoice

        return modelchoice.offer_adapted_model(modelchoice.parameter_node(slicer.mrmlScene), folder)


#
# CMBReviewTest
#


class CMBReviewTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (ctest) without installing anything: skips, saying why, if statsmodels or
    CMBDetect's requirements are missing. A one-case study on an oblique grid goes through the Logic."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_CMBReview_triageAndStatistics()

    def test_CMBReview_triageAndStatistics(self) -> None:
        import json

        import numpy as np

        try:
            import statsmodels  # noqa: F401

            from CMBDetectLib.detection.lesions import extract_lesions
            from CMBDetectLib.detection.outputs import write_lesion_csv
            from CMBDetectLib.io import Geometry, write_volume
        except ImportError as exc:
            self.skipTest(f"CMBReview's Python requirements are not installed in this Slicer ({exc})")

        folder = tempfile.mkdtemp(prefix="CMBReviewTest-")
        shape, spacing = (10, 64, 72), (0.45, 0.6, 2.0)
        c, s = np.cos(0.3), np.sin(0.3)
        geometry = Geometry(spacing, (12.0, -4.0, 3.0), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
        image = np.random.default_rng(0).normal(400, 10, shape).astype(np.float32)
        probability = np.zeros(shape, np.float32)
        kk, jj, ii = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
        spheres = [((5, 20, 20), 2.5, True), ((4, 44, 50), 3.0, True), ((6, 44, 20), 2.0, False)]
        for (ck, cj, ci), r, detected in spheres:
            ball = ((kk - ck) * spacing[2]) ** 2 + ((jj - cj) * spacing[1]) ** 2 + ((ii - ci) * spacing[0]) ** 2 <= r * r
            image[ball] = 100.0
            probability[ball] = 0.9 if detected else 0.0
        write_volume(image, geometry, os.path.join(folder, "images", "c1.nii.gz"))
        labels, lesions = extract_lesions(probability, geometry)
        write_volume(labels, geometry, os.path.join(folder, "det", "c1_lesions.nii.gz"))
        write_lesion_csv(os.path.join(folder, "det", "c1_lesions.csv"), lesions)
        with open(os.path.join(folder, "det", "c1_summary.json"), "w") as f:
            json.dump({"n_lesions": len(lesions), "seconds": 1.0}, f)
        logic = CMBReviewLogic()
        added, leftOut = logic.createStudy(
            os.path.join(folder, "study.db"), os.path.join(folder, "images"), os.path.join(folder, "det"), "ana"
        )
        self.assertEqual((added, leftOut), (["c1"], []))
        logic.session.close()
        logic.openStudy(os.path.join(folder, "study.db"))
        session = logic.session
        session.select_reader("ana")
        self.assertEqual(session.case_list(), [("c1", False)])
        nodes = session.open_case(0)
        self.assertEqual(nodes.markups.GetNumberOfControlPoints(), 2)
        session.jump_to(1)
        session.set_verdict(0, "correct")
        session.set_verdict(1, "incorrect", "vessel", "possible")
        ras = (geometry.ijk_to_ras() @ [20, 44, 6, 1])[:3]
        session.add_missed_at(ras)
        self.assertEqual(session.lesion_rows()[2][1], "correct")
        session.close_case()
        self.assertEqual(session.case_list(), [("c1", True)])
        stats = session.statistics()
        t4 = stats["table4"]["ana"]
        self.assertEqual((t4["correct"], t4["incorrect"], t4["missed"]), (1, 1, 1))
        self.assertIn("Table 4", session.statistics_html())
        session.close()
        self.delayDisplay("Test passed")
