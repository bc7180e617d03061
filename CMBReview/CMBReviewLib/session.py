"""A reading session: what the CMBReview module holds while a reader works.

The open study, the reader selected, and the case open for them with its nodes. The Slicer
widget only wires its buttons and lists to these methods, so everything a click does is here
and tested headless on slicer-core's scene (`Testing/test_review_session.py`).

Speaks MRML only through `mrml.py`; never opens a dialog or prints: problems are raised as
`StudyError` with the case and the problem in the message.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from CMBDetectLib.errors import CaseError

from . import mrml
from .mrml import CaseNodes
from .store import Study, StudyError


def chosen_path(value: str | Path | None) -> Path | None:
    """A path a user chose, or None when the field was left empty. Slicer's parameter node keeps
    an empty pathlib.Path as "." (Path("") is Path(".")), which no one picks on purpose."""
    text = str(value).strip() if value is not None else ""
    return Path(text) if text not in ("", ".") else None


def reader_names(text: str) -> list[str]:
    """Reader names typed in one field, separated by commas or spaces ("ana, ben"), in order,
    each once; their spelling is checked where they are added (store.check_reader_name)."""
    return list(dict.fromkeys(name for name in re.split(r"[,;\s]+", text or "") if name))


class ReviewSession:
    """One study, one reader, at most one open case. `scene` defaults to slicer.mrmlScene."""

    def __init__(self, scene: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.scene = scene
        self.study: Study | None = None
        self.reader: str | None = None
        self.nodes: CaseNodes | None = None
        self._clock = clock
        self._opened_at: float | None = None
        self._stored_stamp: tuple | None = None  # mrml.edit_stamp of the nodes when last stored in full

    # --- study and readers --------------------------------------------------------------

    def open_study(self, path: str | Path) -> None:
        """Open another study. The open case belongs to the old one: it is stored there and
        closed (its nodes and lesion ids mean nothing in the new study). A study that cannot be
        opened leaves the session as it was."""
        chosen = chosen_path(path)
        if chosen is None:
            raise StudyError("choose the study file to open")
        study = Study.open(chosen)
        try:
            self.close_case()
        except BaseException:
            study.close()
            raise
        if self.study is not None:
            self.study.close()
        self.study = study
        if self.reader and self.reader not in self.readers():
            self.reader = None

    def create_study(
        self, path: str | Path | None, images: str | Path | None, detections: str | Path | None, readers: Sequence[str] = ()
    ) -> tuple[list[str], list[CaseError]]:
        """Create a study from a folder of images and the folder of their CMBDetect results, with
        these readers, checked as `cmbdetect review create` checks it (study.case_list and
        study.create_study: a bad case is named and left out; when none passes, or a reader's
        name is refused, nothing is written), then open it here. Returns the cases added and
        the cases left out."""
        from .study import case_list, create_study

        path = chosen_path(path)
        if path is None:
            raise StudyError("choose where to write the new study (a .db file)")
        added, errors = create_study(path, case_list(chosen_path(images), chosen_path(detections)), readers=list(readers))
        try:
            self.open_study(path)
        except StudyError as exc:
            raise StudyError(f"the study {path} was created with {len(added)} case(s) but not opened: {exc}") from None
        return added, errors

    def close(self) -> None:
        """Leave the open case (storing it) and close the study."""
        self.close_case()
        if self.study is not None:
            self.study.close()
            self.study = None

    def _study(self) -> Study:
        if self.study is None:
            raise StudyError("no study is open")
        return self.study

    def readers(self) -> list[str]:
        return list(self._study().readers().values())

    def add_reader(self, name: str) -> None:
        self._study().add_reader(name)

    def select_reader(self, name: str | None) -> CaseNodes | None:
        """Make `name` the reader every next decision is filed under. An open case is read by one
        reader: it is stored and closed under the previous one, and opened again for the new one
        (returned; None when no case was open)."""
        name = name or None
        if name == self.reader:
            return self.nodes
        if name is not None:
            self._study().reader_id(name)  # an unknown reader changes nothing
        case = self.nodes.case if self.nodes is not None else None
        self.close_case()
        self.reader = name
        if case is None or name is None:
            return None
        return self._open(case)

    def _reader_id(self) -> int:
        if not self.reader:
            raise StudyError("choose a reader first")
        return self._study().reader_id(self.reader)

    def case_list(self) -> list[tuple[str, bool]]:
        """(case name, completed by the current reader), in the study's order."""
        study = self._study()
        done = study.completed_cases(self._reader_id())
        return [(c.name, c.id in done) for c in study.cases()]

    def resume_position(self) -> int:
        return self._study().resume_position(self._reader_id())

    # --- one case -----------------------------------------------------------------------

    def open_case(self, index: int) -> CaseNodes:
        """Leave the open case, then show the index-th case of the study to the current reader."""
        self.close_case()
        study = self._study()
        self._reader_id()
        cases = study.cases()
        if not 0 <= index < len(cases):
            raise StudyError(f"the study has {len(cases)} cases; there is no case number {index + 1}")
        return self._open(cases[index].name)

    def _open(self, case: str) -> CaseNodes:
        self.nodes = mrml.load_case(self._study(), case, self.reader, self.scene)
        self._opened_at = self._clock()
        self._stored_stamp = mrml.edit_stamp(self.nodes)
        return self.nodes

    def _case(self) -> CaseNodes:
        if self.nodes is None:
            raise StudyError("no case is open")
        return self.nodes

    def elapsed_seconds(self) -> float:
        return self._clock() - self._opened_at if self.nodes is not None and self._opened_at is not None else 0.0

    def close_case(self, completed: bool | None = None) -> None:
        """Store what changed in the nodes and the reading time of this sitting, then remove the
        nodes. The case counts as completed (when not said) once every detector lesion is judged."""
        if self.nodes is None:
            return
        nodes = self.nodes
        done = self.store_edits()
        if done["errors"]:
            raise StudyError("; ".join(done["errors"]) + f". {nodes.case} stays open so that nothing is lost: correct or delete that, then leave it")
        self._record_reading(completed)
        mrml.remove_case_nodes(nodes)
        self._forget_case()

    def _record_reading(self, completed: bool | None) -> None:
        """This sitting's reading time; completed (when not said) once every detector lesion is judged."""
        study, nodes = self._study(), self._case()
        if completed is None:
            completed = all(verdict for label, verdict in self.lesion_rows() if label.startswith("CMB"))
        study.record_reading(study.case(nodes.case).id, study.reader_id(nodes.reader), self.elapsed_seconds(), completed)

    def _forget_case(self) -> None:
        self.nodes = None
        self._opened_at = None
        self._stored_stamp = None

    def scene_closing(self) -> list[str]:
        """The scene is about to close and take the case's nodes with it (what the widget's
        StartClose observer calls). Stores what the reader changed and the reading time, as
        leaving the case does, then lets go of the nodes even when something could not be
        stored, so that no removed node is kept; returns one message per thing not stored
        (naming the case), for the widget to show. Never raises: the scene closes regardless."""
        if self.nodes is None:
            return []
        case = self.nodes.case
        problems: list[str] = []
        try:
            problems += self.store_edits()["errors"]
        except (StudyError, OSError, sqlite3.Error) as exc:
            problems.append(f"{case}: the edits were not stored ({exc})")
        try:
            self._record_reading(None)
        except (StudyError, OSError, sqlite3.Error) as exc:
            problems.append(f"{case}: the reading time was not stored ({exc})")
        self._forget_case()  # the scene removes the nodes themselves
        return [f"{p.removesuffix(mrml.STAYS)}; lost: the scene was closed" for p in problems]

    def lesion_rows(self) -> list[tuple[str, str]]:
        """(point label, verdict text) of each lesion of the open case, in the table's order."""
        m = self._case().markups
        return [(m.GetNthControlPointLabel(n), m.GetNthControlPointDescription(n)) for n in range(m.GetNumberOfControlPoints())]

    def jump_to(self, index: int) -> None:
        mrml.jump_to(self._case(), index)

    def set_verdict(self, index: int, verdict: str, reason: str | None = None, certainty: str = "definite") -> None:
        mrml.set_verdict(self._study(), self._case(), index, verdict, reason, certainty)

    def add_missed_at(self, ras: tuple[float, float, float], certainty: str = "definite") -> int:
        return mrml.add_missed_at(self._study(), self._case(), tuple(ras), certainty)

    def store_edits(self) -> dict:
        """Store what the reader changed in the nodes: counts, and `errors` for what could not be stored."""
        nodes = self._case()
        done = mrml.store_edits(self._study(), nodes)
        # After a failure the stamp is left stale, so that the next call tries again.
        self._stored_stamp = None if done["errors"] else mrml.edit_stamp(nodes)
        return done

    def store_edits_if_changed(self) -> dict | None:
        """What the widget calls after each completed stroke or on a short timer, so that painted
        lesions and typed verdicts are stored while the reader works, not only when they leave
        the case: stores if the nodes changed since the last store (None if they did not)."""
        if self.nodes is None or mrml.edit_stamp(self.nodes) == self._stored_stamp:
            return None
        return self.store_edits()

    def store_groundtruth(self, segmentation_node: Any) -> int:
        nodes = self._case()
        return mrml.store_groundtruth(self._study(), nodes.case, nodes.reader, segmentation_node, nodes.volume)

    def endorse_latest(self) -> str:
        """Endorse the latest ground truth of the open case made by another reader; returns its author."""
        study, nodes = self._study(), self._case()
        me = study.reader_id(nodes.reader)
        others = [g for g in study.groundtruths(study.case(nodes.case).id) if g["reader_id"] != me]
        if not others:
            raise StudyError(f"{nodes.case}: no other reader has labelled ground truth for this case yet")
        study.endorse(others[-1]["id"], me)
        return study.readers()[others[-1]["reader_id"]]

    # --- statistics ---------------------------------------------------------------------

    def statistics(self, n_boot: int = 500) -> dict:
        from .analysis import analyse

        return analyse(self._study(), n_boot=n_boot)

    def statistics_html(self, n_boot: int = 500) -> str:
        from .report import html_page

        return html_page(self.statistics(n_boot))

    def write_report(self, folder: str | Path) -> dict[str, Path]:
        from .analysis import analyse
        from .report import write_report

        return write_report(analyse(self._study()), folder)
