"""CMBReview: the experts' side of CMBDetect. Readers triage the detector's lesions, add what it
missed, label ground truth slice by slice, endorse each other's labelling; the study's statistics
(the paper's Table 4, kappas) and a consensus ground truth come out of it.

This file only wires widgets to CMBReviewLib (the study store, statistics and MRML adapter),
which is imported once its requirements are set up, never at import time.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from typing import Any, Optional

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:  # translatable strings in Slicer >= 5.4; plain strings before
    from slicer.i18n import tr as _
except ImportError:  # pragma: no cover - older Slicer

    def _(text: str) -> str:
        return text


# Keyboard: case navigation, lesion navigation and triage (also listed in the help text).
# Plain arrows stay with the slice views (they move slices there); lesions move with Ctrl+arrows.
SHORTCUTS = {
    "nextCase": "Ctrl+Right", "previousCase": "Ctrl+Left", "nextLesion": "Ctrl+Down", "previousLesion": "Ctrl+Up",
    "correct": "C", "incorrect": "X", "possible": "P", "addMissed": "M",
}  # fmt: skip


class CMBReview(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CMBReview")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["CMBDetect"]
        self.parent.contributors = ["CMBDetect contributors"]
        keys = ", ".join(f"{name}: {key}" for name, key in SHORTCUTS.items())
        self.parent.helpText = _(
            "Expert review of cerebral microbleed detections made by the CMBDetect module (or `cmbdetect detect`).<br><br>"
            "Open a study (create one with <tt>cmbdetect review create</tt>), choose a reader, and go through the cases: "
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
# CMBReviewWidget
#


class CMBReviewWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the widgets to the reading session (CMBReviewLib/session.py), which holds the study,
    the reader, the open case and its nodes; every click is one session call."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[CMBReviewLogic] = None
        self._shortcuts: list[Any] = []
        self._clickNode = None
        self._groundTruthNode = None
        self._timer = qt.QTimer()
        self._timer.setInterval(1000)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMBReview.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CMBReviewLogic()

        self.ui.studyPathLineEdit.filters = ctkPathFilters()
        self.ui.studyPathLineEdit.nameFilters = ["Review study (*.db *.sqlite)"]
        self.ui.reasonComboBox.addItems(list(MIMIC_REASONS))
        self.ui.openStudyButton.connect("clicked(bool)", self.onOpenStudy)
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
        self._timer.connect("timeout()", self._onTick)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self._enableCaseWidgets(False)

    def cleanup(self) -> None:
        try:
            self._finishCase()
        finally:
            self.removeObservers()
            self._removeShortcuts()

    def onSceneStartClose(self, caller, event) -> None:
        """Closing the scene removes the case's nodes: leave the case (storing it) first."""
        self._finishCase()

    def enter(self) -> None:
        self._installShortcuts()

    def exit(self) -> None:
        self._removeShortcuts()

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

    # --- study, reader, cases -----------------------------------------------------------

    def _studyOpen(self) -> bool:
        return self.session is not None and self.session.study is not None

    def onOpenStudy(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not open the study."), waitCursor=True):
            self._timer.stop()
            self.logic.openStudy(self.ui.studyPathLineEdit.currentPath)
            self._enableCaseWidgets(False)
            self.ui.readerComboBox.blockSignals(True)
            self.ui.readerComboBox.clear()
            self.ui.readerComboBox.addItems(self.session.readers())
            if self.session.reader:
                self.ui.readerComboBox.setCurrentText(self.session.reader)
            self.ui.readerComboBox.blockSignals(False)
            self.onReaderChanged()
            self.onStatistics()

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
        (editor.setSourceVolumeNode if hasattr(editor, "setSourceVolumeNode") else editor.setMasterVolumeNode)(nodes.volume)

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
            with slicer.util.tryWithErrorDisplay(_("Could not compute the statistics."), waitCursor=True):
                self.ui.statisticsTextBrowser.setHtml(self.session.statistics_html())

    def onReport(self) -> None:
        if not self._studyOpen():
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder for the report"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Could not write the report."), waitCursor=True):
                paths = self.session.write_report(folder)
                self.ui.statusLabel.text = _("Wrote {path}").format(path=paths.get("html"))


def ctkPathFilters() -> int:
    import ctk

    return ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable


MIMIC_REASONS = ("vessel", "calcification", "cavernous_malformation", "partial_volume", "artefact", "iron_deposit", "other")


#
# CMBReviewLogic
#


class CMBReviewLogic(ScriptedLoadableModuleLogic):
    """Works without the widget: sets up CMBReviewLib's requirements, then holds the reading
    session (CMBReviewLib.session.ReviewSession), where everything a reader does is done."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = None  # created once the requirements are in place (not at import time)

    @staticmethod
    def requirementsPath() -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    def setupPythonRequirements(self, interactive: bool = True) -> None:
        """Install what CMBReviewLib needs and Slicer lacks (statsmodels, pynrrd), asking first."""
        if hasattr(slicer, "packaging"):
            import inspect

            options = {"requester": "CMBReview"}
            if "prompt_install" in inspect.signature(slicer.packaging.pip_ensure).parameters:
                options["prompt_install"] = interactive
            slicer.packaging.pip_ensure(slicer.packaging.load_requirements(self.requirementsPath()), **options)
        importlib.invalidate_caches()

    def openStudy(self, path: str, interactive: bool = True) -> None:
        self.setupPythonRequirements(interactive)
        if self.session is None:
            self.session = importlib.import_module("CMBReviewLib.session").ReviewSession()
        self.session.open_study(path)


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
            from CMBReviewLib.store import Study
            from CMBReviewLib.study import add_cases
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
        study = Study.create(os.path.join(folder, "study.db"))
        add_cases(study, [("c1", os.path.join(folder, "images", "c1.nii.gz"), os.path.join(folder, "det"))])
        study.add_reader("ana")
        study.close()

        logic = CMBReviewLogic()
        logic.openStudy(os.path.join(folder, "study.db"), interactive=False)
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
