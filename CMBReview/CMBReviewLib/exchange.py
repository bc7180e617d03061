"""Decisions in and out of a study as CSV or JSON, and example decisions simulated from synthetic truth.

One row per decision, columns DECISION_COLUMNS:
- `correct` / `incorrect`: `lesion` is the detector's lesion id (the `id` of `<case>_lesions.csv`,
  the segment "CMB <id>"); an incorrect label takes a `reason` (MIMIC_REASONS); `certainty` is
  definite (default) or possible;
- `missed`: a lesion the detector missed, at RAS `r, a, s` (mm): grown from that point as a click
  in Slicer grows it, or a sphere of `diameter_mm` when that column is filled;
- `reading`: `seconds` spent on the case (a sitting), `completed` 1/0, an optional `comment`.
An import (one or several files) is checked in full before anything is stored, and then
stored in one transaction: one bad row, in any of the files, stores nothing, and the error
names the file, the row, the case and the problem. Each file is keyed by its content's sha256:
a file imported before (under any name) stores nothing again and is reported as such; a reader
who changes their mind writes a new file, whose verdicts supersede the earlier ones.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from CMBDetectLib.io import read_volume

from .store import CERTAINTIES, MIMIC_REASONS, Study, StudyError
from .study import AddedFile, detector_labels, grid_differences, load_image, ras_to_kji, record_added, write_added
from .regiongrow import grow_from_click, sphere_mask

DECISION_COLUMNS = ("case", "reader", "decision", "lesion", "reason", "certainty", "r", "a", "s", "diameter_mm", "seconds", "completed", "comment")
DECISIONS = ("correct", "incorrect", "missed", "reading")


@dataclass
class Row:
    where: str
    case: str
    reader: str
    decision: str
    lesion: int | None = None
    reason: str | None = None
    certainty: str = "definite"
    ras: tuple[float, float, float] | None = None
    diameter_mm: float | None = None
    seconds: float | None = None
    completed: bool = True
    comment: str | None = None
    mask: np.ndarray | None = None  # prepared before storing, for missed lesions
    added: AddedFile | None = None  # its voxel file, written just before storing


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def parse_row(raw: dict, where: str) -> Row:
    get = lambda k: None if _blank(raw.get(k)) else str(raw.get(k)).strip()  # noqa: E731
    case, reader, decision = get("case"), get("reader"), (get("decision") or "").lower()
    if not case or not reader:
        raise StudyError(f"{where}: case and reader are required")
    if decision not in DECISIONS:
        raise StudyError(f"{where} ({case}): decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    row = Row(where, case, reader, decision, certainty=(get("certainty") or "definite").lower(), comment=get("comment"))
    if row.certainty not in CERTAINTIES:
        raise StudyError(f"{where} ({case}): certainty must be one of {', '.join(CERTAINTIES)}, not {row.certainty!r}")
    try:
        if decision in ("correct", "incorrect"):
            if get("lesion") is None:
                raise StudyError(f"{where} ({case}): a {decision} decision names the detector's lesion id")
            row.lesion = int(get("lesion"))
            row.reason = (get("reason") or "").lower() or None
            if decision == "incorrect" and row.reason not in MIMIC_REASONS:
                raise StudyError(f"{where} ({case}): an incorrect label needs a reason, one of {', '.join(MIMIC_REASONS)}; got {row.reason!r}")
            if decision == "correct":
                row.reason = None
        elif decision == "missed":
            if any(get(k) is None for k in "ras"):
                raise StudyError(f"{where} ({case}): a missed lesion needs its position r, a, s in mm (RAS)")
            row.ras = (float(get("r")), float(get("a")), float(get("s")))
            row.diameter_mm = float(get("diameter_mm")) if get("diameter_mm") else None
            if row.diameter_mm is not None and not 0 < row.diameter_mm <= 10:
                raise StudyError(f"{where} ({case}): diameter_mm must lie in (0, 10], not {row.diameter_mm}")
        else:
            if get("seconds") is None:
                raise StudyError(f"{where} ({case}): a reading row gives the seconds spent")
            row.seconds = float(get("seconds"))
            if not row.seconds >= 0:
                raise StudyError(f"{where} ({case}): seconds must be >= 0, not {row.seconds}")
            row.completed = (get("completed") or "1").lower() in ("1", "true", "yes", "y")
    except ValueError as exc:
        if isinstance(exc, StudyError):
            raise
        raise StudyError(f"{where} ({case}): {exc}") from None
    return row


def parse_rows(data: bytes, name: str) -> list[Row]:
    """The decision rows of a CSV or JSON file's bytes (`name` for messages and the format)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StudyError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if name.lower().endswith(".json"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StudyError(f"{name}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        items = parsed.get("decisions", parsed) if isinstance(parsed, dict) else parsed
        if not isinstance(items, list):
            raise StudyError(f"{name}: expected a list of decisions (or {{'decisions': [...]}})")
        return [parse_row(item, f"{name} item {n + 1}") for n, item in enumerate(items)]
    return [parse_row(raw, f"{name} line {n + 2}") for n, raw in enumerate(csv.DictReader(io.StringIO(text, newline="")))]


def read_rows(path: str | Path) -> list[Row]:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"decisions file not found: {path}")
    return parse_rows(path.read_bytes(), path.name)


def prepare(study: Study, rows: list[Row], images: dict | None = None) -> dict:
    """Check every row against the study, and grow the missed lesions' voxels, before storing
    anything; returns the images read (case -> Volume)."""
    readers = set(study.readers().values())
    detector = {}
    images = {} if images is None else images
    cases = {c.name: c for c in study.cases()}
    for row in rows:
        case = cases.get(row.case)
        if case is None:
            raise StudyError(f"{row.where}: case {row.case!r} is not in the study")
        if row.reader not in readers:
            raise StudyError(f"{row.where} ({row.case}): reader {row.reader!r} is not in the study (add them first)")
        if row.decision in ("correct", "incorrect"):
            if case.id not in detector:
                detector[case.id] = {l.detector_label for l in study.lesions(case.id) if l.source == "detector"}
            if row.lesion not in detector[case.id]:
                raise StudyError(f"{row.where} ({row.case}): the detector found no lesion {row.lesion} in this case")
        elif row.decision == "missed":
            image = images.get(row.case) or images.setdefault(row.case, load_image(study, row.case))
            kji = ras_to_kji(image, row.ras)
            if any(not 0 <= v < n for v, n in zip(kji, image.shape)):
                raise StudyError(f"{row.where} ({row.case}): point RAS {row.ras} lies outside the image")
            if row.diameter_mm:
                row.mask = sphere_mask(image.shape, image.geometry, kji, row.diameter_mm / 2)
            else:
                try:
                    row.mask = grow_from_click(image.array, image.geometry, kji)
                except ValueError as exc:
                    raise StudyError(f"{row.where} ({row.case}): {exc}") from None
    return images


@dataclass
class Imported:
    """One file of an import: what it stored, or the earlier import that already holds it."""

    path: Path
    sha256: str
    counts: dict[str, int] | None = None  # None: imported before, nothing stored now
    earlier: dict | None = None  # the earlier import (name, decisions, created), or {"name": ...} within this one


def import_decisions(study: Study, paths: Sequence[str | Path]) -> list[Imported]:
    """Store the decisions of CSV/JSON files, all of them or none; a file imported before
    (same content, any name) stores nothing and is returned with `earlier` set."""
    files: list[tuple[Imported, list[Row]]] = []
    seen: dict[str, str] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise StudyError(f"decisions file not found: {path}")
        data = path.read_bytes()  # hashed and parsed from the same bytes
        item = Imported(path, hashlib.sha256(data).hexdigest())
        item.earlier = study.imported(item.sha256) or ({"name": seen[item.sha256]} if item.sha256 in seen else None)
        seen.setdefault(item.sha256, path.name)
        files.append((item, [] if item.earlier else parse_rows(data, path.name)))
    images: dict = {}
    for _, rows in files:
        prepare(study, rows, images)

    # Voxel files first, outside the write lock; a failure below removes them again, so an
    # import that stored nothing leaves no files either.
    missed = [row for _, rows in files for row in rows if row.decision == "missed"]
    try:
        for row in missed:
            row.added = write_added(study, row.case, row.reader, row.mask, images[row.case])
        with study.transaction():
            for item, rows in files:
                if item.earlier is None:
                    # Checked again under the write lock: another process may have imported it meanwhile.
                    item.earlier = study.imported(item.sha256)
                if item.earlier is None:
                    item.counts = _store_rows(study, rows)
                    study.record_import(item.sha256, item.path.name, len(rows))
    except BaseException:
        _remove([row for row in missed if row.added])
        raise
    _remove([row for item, rows in files if item.counts is None for row in rows if row.added])
    return [item for item, _ in files]


def _remove(rows: list[Row]) -> None:
    """Voxel files that no stored decision references (their import stored nothing)."""
    for row in rows:
        row.added.path.unlink(missing_ok=True)  # type: ignore[union-attr]


def _store_rows(study: Study, rows: list[Row]) -> dict[str, int]:
    counts = {d: 0 for d in DECISIONS}
    lesion_ids: dict[tuple[int, int], int] = {}
    for row in rows:
        reader_id, case = study.reader_id(row.reader), study.case(row.case)
        if row.decision in ("correct", "incorrect"):
            key = (case.id, row.lesion)
            if key not in lesion_ids:
                lesion_ids.update({(case.id, l.detector_label): l.id for l in study.lesions(case.id) if l.source == "detector"})
            study.record_verdict(lesion_ids[key], reader_id, row.decision, row.reason, row.certainty)
        elif row.decision == "missed":
            record_added(study, row.added, row.certainty)  # type: ignore[arg-type]
        else:
            study.record_reading(case.id, reader_id, row.seconds, row.completed, row.comment)
        counts[row.decision] += 1
    return counts


def current_rows(study: Study) -> list[dict]:
    """The current view as decision rows (re-importable; a missed lesion is given by its centroid and size)."""
    readers = study.readers()
    cases = {c.id: c.name for c in study.cases()}
    lesions = {l.id: l for l in study.lesions()}
    out = []
    for v in study.current_verdicts():
        l = lesions.get(v.lesion_id)
        if l is None or v.verdict == "withdrawn":
            continue
        base = {"case": cases[l.case_id], "reader": readers[v.reader_id], "certainty": v.certainty}
        if l.source == "detector":
            out.append({**base, "decision": v.verdict, "lesion": l.detector_label, "reason": v.reason})
        else:
            r, a, s = (round(x, 3) for x in l.ras)
            out.append({**base, "decision": "missed", "r": r, "a": a, "s": s, "diameter_mm": round(l.diameter_mm, 3)})
    rows = study.con.execute("SELECT case_id, reader_id, seconds, completed, comment FROM readings ORDER BY id").fetchall()
    for r in rows:
        out.append({"case": cases[r[0]], "reader": readers[r[1]], "decision": "reading", "seconds": r[2], "completed": r[3], "comment": r[4]})
    return [{k: row.get(k) for k in DECISION_COLUMNS} for row in out]


def export_decisions(study: Study, path: str | Path) -> Path:
    """CSV: the current view (DECISION_COLUMNS). JSON: the current view plus the full history."""
    from CMBDetectLib.io import atomic_path

    path = Path(path)
    rows = current_rows(study)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps({"study": study.summary(), "decisions": rows, "history": study.history()}, indent=1) + "\n", encoding="utf-8")
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=DECISION_COLUMNS)
                w.writeheader()
                w.writerows(rows)
    return path


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    from CMBDetectLib.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=DECISION_COLUMNS)
        w.writeheader()
        w.writerows({k: row.get(k) for k in DECISION_COLUMNS} for row in rows)
    return path


# The synthetic engine's mimic codes (synth.MIMIC_CODES) as a reader's reasons for "incorrect".
MIMIC_CODE_REASONS = {1: "vessel", 2: "calcification", 3: "iron_deposit", 4: "artefact"}


def _mimic_map(truth: Path, case: str, like) -> np.ndarray | None:
    """The case's mimic map from a `cmbdetect synth` folder (mimics/<case>.*), or None."""
    files = [p for p in (truth / "mimics").glob(f"{case}.*") if p.name.split(".")[0] == case] if (truth / "mimics").is_dir() else []
    if not files:
        return None
    mimics = read_volume(files[0], case)
    if grid_differences(mimics.shape, mimics.geometry, like.shape, like.geometry):
        raise StudyError(f"{case}: mimic map {files[0].name} is not on the truth's grid")
    return np.rint(mimics.array).astype(np.int64)


def _mimic_reason(mimics: np.ndarray | None, inside: np.ndarray) -> str:
    """The reason a reader would give: the mimic most of the detection lies on, else "other"."""
    if mimics is None:
        return "other"
    codes = mimics[inside]
    codes = codes[(codes > 0) & (codes < 5)]
    if codes.size == 0:
        return "other"
    return MIMIC_CODE_REASONS[int(np.bincount(codes).argmax())]


def simulate_decisions(study: Study, truth: str | Path, reader: str, error_rate: float = 0.0, seed: int = 0) -> list[dict]:
    """Example decisions of a simulated reader who knows the synthetic ground truth.

    For trying the review workflow on `cmbdetect synth` data only: a detector lesion touching a
    true microbleed is judged correct, any other incorrect, with the mimic most of it lies on
    when the truth folder has the engine's mimic maps (`mimics/<case>`: vein -> vessel,
    calcification, nucleus -> iron_deposit, air-tissue edge -> artefact), else "other"; each true microbleed
    no detection touches is added as missed (a sphere of its equivalent diameter at its centroid).
    With `error_rate`, that share of the verdicts is flipped and of the missed lesions overlooked
    (seeded), so that two simulated readers disagree. Reading times are drawn from 60-240 s.
    """
    from .voxelfiles import describe

    if not 0 <= error_rate <= 1:
        raise StudyError(f"error rate must lie in [0, 1], not {error_rate}")
    truth = Path(truth)
    label_dir = truth / "labels" if (truth / "labels").is_dir() else truth
    rng = np.random.default_rng([seed, sum(map(ord, reader))])
    rows = []
    for case in study.cases():
        files = [p for p in label_dir.glob(f"{case.name}.*") if p.name.split(".")[0] == case.name]
        if not files:
            raise StudyError(f"{case.name}: no synthetic truth {case.name}.* in {label_dir}")
        image = load_image(study, case.name)
        truth_volume = read_volume(files[0], case.name)
        differ = grid_differences(truth_volume.shape, truth_volume.geometry, image.shape, image.geometry)
        if differ:
            raise StudyError(f"{case.name}: truth {files[0].name} is not on the image's grid ({'; '.join(differ)})")
        true = truth_volume.array.astype(np.int64)
        det = detector_labels(study, case.name, image)
        mimics = _mimic_map(truth, case.name, truth_volume)
        for l in sorted((l for l in study.lesions(case.id) if l.source == "detector"), key=lambda l: l.detector_label):
            hit = bool(np.any(true[det == l.detector_label] > 0))
            if rng.random() < error_rate:
                hit = not hit
            rows.append({"case": case.name, "reader": reader, "decision": "correct" if hit else "incorrect",
                         "lesion": l.detector_label, "reason": None if hit else _mimic_reason(mimics, det == l.detector_label),
                         "certainty": "definite"})  # fmt: skip
        found = set(np.unique(true[det > 0]).tolist())
        for t in describe(true.astype(np.uint16), image.geometry):
            if t.id in found or rng.random() < error_rate:
                continue
            r, a, s = (round(v, 3) for v in t.centroid_ras)
            rows.append({"case": case.name, "reader": reader, "decision": "missed", "r": r, "a": a, "s": s,
                         "diameter_mm": round(min(t.diameter_mm, 10.0), 3), "certainty": "definite"})  # fmt: skip
        rows.append({"case": case.name, "reader": reader, "decision": "reading", "seconds": round(float(rng.uniform(60, 240)), 1),
                     "completed": 1, "comment": "simulated reader (synthetic truth)"})  # fmt: skip
    return rows
