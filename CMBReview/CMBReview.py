"""CMBReview: the experts' side of CMBDetect (skeleton).

Layer-by-layer ground-truth labelling and the audit of detections (each detected lesion
triaged correct / incorrect, missed lesions added, per-reader timing, agreement statistics)
come in a later issue. This file registers the module so the extension has its final shape.
"""

from __future__ import annotations

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

try:  # translatable strings in Slicer >= 5.4; plain strings before
    from slicer.i18n import tr as _
except ImportError:  # pragma: no cover - older Slicer

    def _(text: str) -> str:
        return text


class CMBReview(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CMBReview")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["CMBDetect contributors"]
        self.parent.helpText = _(
            "Expert review of cerebral microbleed detections made by the CMBDetect module.<br><br>"
            "<b>Not functional yet.</b> Layer-by-layer expert labelling, and the audit of "
            "detections (each detected lesion marked correct or incorrect, missed lesions added, "
            "per-reader timing, agreement between readers) come in a later issue.<br><br>"
            "<b>Research use only; not for clinical use.</b>"
        )
        self.parent.acknowledgementText = _(
            "Part of CMBDetect, which reimplements Fan P, Shan W, Yang H, et al. Cerebral microbleed "
            "automatic detection system based on the deep learning. Frontiers in Medicine 2022;9:807443."
        )


class CMBReviewWidget(ScriptedLoadableModuleWidget):
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        label = qt.QLabel(_("Expert labelling and the audit of detections come in a later release."))
        label.wordWrap = True
        self.layout.addWidget(label)
        self.layout.addStretch(1)
        self.logic = CMBReviewLogic()


class CMBReviewLogic(ScriptedLoadableModuleLogic):
    """Empty until the review features land; they will delegate to CMBReviewLib."""


class CMBReviewTest(ScriptedLoadableModuleTest):
    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_CMBReview_loads()

    def test_CMBReview_loads(self) -> None:
        # The skeleton has no features to test; this checks the module and its logic load.
        self.assertIsNotNone(CMBReviewLogic())
        self.assertTrue(hasattr(slicer.modules, "cmbreview"))
