"""The study store: one SQLite file per study, every reader decision durable when the call returns.

Why SQLite and these settings:
- WAL journal: readers never block the writer, and a crash (of Slicer or of the machine)
  leaves the last committed transaction intact; `synchronous=FULL` makes each commit durable.
- One short `BEGIN IMMEDIATE` transaction per decision: two readers writing at the same time
  queue on the write lock (waiting up to `busy_timeout`) instead of failing or losing a click.
- Append-only history: a new verdict on a lesion is a new row; the current view is the latest
  row per (reader, lesion). Nothing is updated or deleted in place.
- `PRAGMA user_version` holds the schema version; `open_study` migrates older files forward,
  each step in its own transaction, so an interrupted migration leaves the previous version.
- Imported decision files are keyed by their content's sha256 (table `imports`): a file
  imported again stores nothing, and a whole import is one transaction (all files or none).
- Damage is named, never deepened: a file is recognised as a study (SQLite header, then
  `PRAGMA application_id` or, for studies made before it was set, their tables) and checked
  with `PRAGMA quick_check` before anything is written to it, WAL switch and migrations included.

Voxel data (a reader's added lesion, a ground-truth labelling) lives in `.seg.nrrd` files
beside the database (see `voxelfiles.py`), referenced here with their sha256.
"""

from __future__ import annotations

import re
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from CMBDetectLib.cohort.names import printable, unsafe_name_reason
from CMBDetectLib.io import sha256_of

SCHEMA_VERSION = 3
BUSY_TIMEOUT_MS = 30_000
# "CMBR": the SQLite header's application id of a study (schema 3 on), so that `file(1)` and we
# can tell a study from another program's SQLite file.
APPLICATION_ID = 0x434D4252
SQLITE_MAGIC = b"SQLite format 3\x00"
# Studies made before the application id was set are known by these tables (schema 1 on).
STUDY_TABLES = ("study", "cases", "readers", "files", "lesions", "verdicts", "groundtruths", "endorsements", "readings")
DAMAGED_HINT = "restore it from a backup (docs/review.md: backing up a study)"

VERDICTS = ("correct", "incorrect")
# Mimics of a microbleed on SWI, as the MARS / BOMBS rating scales list them.
MIMIC_REASONS = (
    "vessel", "calcification", "cavernous_malformation", "partial_volume", "artefact", "iron_deposit", "other",
)  # fmt: skip
CERTAINTIES = ("definite", "possible")

# Version 1, as the first release created it. Kept verbatim: migrations start from it, and the
# migration test builds a v1 file from exactly this text.
SCHEMA_V1 = """
CREATE TABLE study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE cases (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    image TEXT NOT NULL,
    detections TEXT,
    detector_seconds REAL,
    position INTEGER NOT NULL
);
CREATE TABLE readers (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created TEXT NOT NULL);
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES cases(id),
    reader_id INTEGER REFERENCES readers(id),
    kind TEXT NOT NULL CHECK (kind IN ('added', 'groundtruth')),
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE lesions (
    id INTEGER PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES cases(id),
    source TEXT NOT NULL CHECK (source IN ('detector', 'reader')),
    detector_label INTEGER,
    added_by INTEGER REFERENCES readers(id),
    file_id INTEGER REFERENCES files(id),
    r REAL NOT NULL, a REAL NOT NULL, s REAL NOT NULL,
    diameter_mm REAL,
    n_voxels INTEGER,
    size_class TEXT,
    mean_probability REAL,
    created TEXT NOT NULL,
    CHECK ((source = 'detector') = (detector_label IS NOT NULL)),
    CHECK ((source = 'reader') = (added_by IS NOT NULL AND file_id IS NOT NULL)),
    UNIQUE (case_id, detector_label)
);
CREATE TABLE verdicts (
    id INTEGER PRIMARY KEY,
    lesion_id INTEGER NOT NULL REFERENCES lesions(id),
    reader_id INTEGER NOT NULL REFERENCES readers(id),
    verdict TEXT NOT NULL CHECK (verdict IN ('correct', 'incorrect', 'withdrawn')),
    reason TEXT,
    created TEXT NOT NULL
);
CREATE TABLE groundtruths (
    id INTEGER PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES cases(id),
    reader_id INTEGER NOT NULL REFERENCES readers(id),
    file_id INTEGER NOT NULL REFERENCES files(id),
    created TEXT NOT NULL
);
CREATE TABLE endorsements (
    id INTEGER PRIMARY KEY,
    groundtruth_id INTEGER NOT NULL REFERENCES groundtruths(id),
    reader_id INTEGER NOT NULL REFERENCES readers(id),
    created TEXT NOT NULL
);
CREATE TABLE readings (
    id INTEGER PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES cases(id),
    reader_id INTEGER NOT NULL REFERENCES readers(id),
    seconds REAL NOT NULL CHECK (seconds >= 0),
    completed INTEGER NOT NULL CHECK (completed IN (0, 1)),
    created TEXT NOT NULL
);
CREATE INDEX verdicts_by_reader ON verdicts(reader_id, lesion_id, id);
CREATE INDEX lesions_by_case ON lesions(case_id);
"""

# v1 -> v2: the MARS/BOMBS certainty of each verdict (v1 verdicts were all taken as definite),
# and the reader's comment on a case reading. ALTER TABLE ADD COLUMN keeps every old row.
MIGRATIONS: dict[int, str] = {
    2: """
ALTER TABLE verdicts ADD COLUMN certainty TEXT NOT NULL DEFAULT 'definite'
    CHECK (certainty IN ('definite', 'possible'));
ALTER TABLE readings ADD COLUMN comment TEXT;
""",
    # v2 -> v3: the decision files imported, by content, so that importing one again stores nothing;
    # and the application id that marks the file as a CMBReview study.
    3: f"""
CREATE TABLE imports (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    decisions INTEGER NOT NULL,
    created TEXT NOT NULL
);
PRAGMA application_id = {APPLICATION_ID};
""",
}


class StudyError(ValueError):
    """A request the study cannot honour: unknown case or reader, bad verdict, wrong file."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per decision.
    con = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    con.row_factory = sqlite3.Row
    con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    con.execute("PRAGMA foreign_keys = ON")
    con.execute("PRAGMA synchronous = FULL")
    return con


def check_header(path: Path) -> None:
    """A study is a SQLite file: refuse anything else before SQLite opens (and would write) it."""
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if not head:
        raise StudyError(f"{path} is empty (0 bytes), not a CMBReview study; left as it is")
    if head != SQLITE_MAGIC:
        raise StudyError(f"{path} is not a SQLite file, so not a CMBReview study; left as it is")


def check_is_study(path: Path, con: sqlite3.Connection) -> None:
    """Refuse a SQLite file that is not a CMBReview study, or a damaged one, by reading it only:
    setting WAL or migrating would rewrite another program's file or deepen the damage."""
    try:
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID:
            if app_id != 0:
                raise StudyError(f"{path} is another program's SQLite file (application id {app_id:#x}), not a CMBReview study; left as it is")
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [t for t in STUDY_TABLES if t not in tables]
            if missing or con.execute("PRAGMA user_version").fetchone()[0] < 1:
                raise StudyError(
                    f"{path} is a SQLite file but not a CMBReview study (it lacks the study's tables: {', '.join(missing) or 'its schema version'}); left as it is"
                )
        problems = [r[0] for r in con.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems != ["ok"]:
        lines = [ln.strip() for m in problems for ln in m.splitlines() if ln.strip() and not ln.startswith("***")]
        said = "; ".join(lines[:3]) + ("; ..." if len(lines) > 3 else "")
        raise StudyError(f"{path}: the study file is damaged (SQLite: {said}); it was not changed: {DAMAGED_HINT}")


def create_schema_v1(path: Path) -> None:
    """Write an empty study in schema version 1 (used by `create` and by the migration test)."""
    con = _connect(path)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        con.executescript("BEGIN;" + SCHEMA_V1 + "PRAGMA user_version = 1; COMMIT;")
    finally:
        con.close()


def migrate(con: sqlite3.Connection) -> list[int]:
    """Bring the file to SCHEMA_VERSION; returns the versions applied."""
    applied = []
    while True:
        # Read the version inside the write lock so two processes never apply the same step twice.
        con.execute("BEGIN IMMEDIATE")
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            con.execute("COMMIT")
            if version > SCHEMA_VERSION:
                raise StudyError(f"study schema version {version} is newer than this CMBReview ({SCHEMA_VERSION}): update CMBReview")
            return applied
        try:
            step = version + 1
            for statement in MIGRATIONS[step].split(";"):
                if statement.strip():
                    con.execute(statement)
            con.execute(f"PRAGMA user_version = {step}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        applied.append(step)


@dataclass(frozen=True)
class Case:
    id: int
    name: str
    image: str
    detections: str | None
    detector_seconds: float | None
    position: int


@dataclass(frozen=True)
class StoredLesion:
    id: int
    case_id: int
    source: str  # 'detector' or 'reader'
    detector_label: int | None
    added_by: int | None
    file_id: int | None
    ras: tuple[float, float, float]
    diameter_mm: float | None
    n_voxels: int | None
    size_class: str | None
    mean_probability: float | None

    @property
    def label(self) -> str:
        return f"CMB {self.detector_label}" if self.source == "detector" else f"Added {self.id}"


@dataclass(frozen=True)
class Verdict:
    lesion_id: int
    reader_id: int
    verdict: str  # correct, incorrect, withdrawn (an added lesion taken back)
    reason: str | None
    certainty: str
    created: str


class Study:
    """An open study. Every `record_*` / `add_*` call is one transaction, durable on return."""

    def __init__(self, path: str | Path, con: sqlite3.Connection) -> None:
        self.path = Path(path)
        self.con = con

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, name: str | None = None, match_radius_mm: float = 5.0) -> "Study":
        path = Path(path)
        if path.exists():
            raise StudyError(f"study {path} exists already: open it instead")
        path.parent.mkdir(parents=True, exist_ok=True)
        create_schema_v1(path)
        study = cls.open(path)
        with study.transaction() as con:
            con.executemany(
                "INSERT INTO study (key, value) VALUES (?, ?)",
                [("name", name or path.stem), ("created", now()), ("match_radius_mm", repr(float(match_radius_mm)))],
            )
        return study

    @classmethod
    def open(cls, path: str | Path) -> "Study":
        path = Path(path)
        if not path.is_file():
            raise StudyError(f"study not found: {path}")
        check_header(path)
        try:
            con = _connect(path)
        except sqlite3.DatabaseError as exc:
            raise StudyError(f"{path}: SQLite cannot open the study ({exc}); if it is damaged, {DAMAGED_HINT}") from None
        try:
            check_is_study(path, con)
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StudyError(f"{path}: cannot switch the study to WAL journaling (mode {mode})")
            migrate(con)
        except sqlite3.DatabaseError as exc:
            con.close()
            raise StudyError(f"{path}: SQLite cannot use the study ({exc}); if it is damaged, {DAMAGED_HINT}") from None
        except BaseException:
            con.close()
            raise
        return cls(path, con)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Study":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: takes the write lock at once, waits for it up to busy_timeout.

        Inside another transaction (an import storing many decisions at once) it is a savepoint
        of that one: its work commits, or rolls back, with the outer transaction.
        """
        if self.con.in_transaction:
            self.con.execute("SAVEPOINT nested")
            try:
                yield self.con
            except BaseException:
                self.con.execute("ROLLBACK TO nested")
                self.con.execute("RELEASE nested")
                raise
            self.con.execute("RELEASE nested")
            return
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        try:
            self.con.execute("COMMIT")
        except BaseException:
            # A COMMIT can fail (a deferred constraint, SQLITE_BUSY, a full disk) and leave the
            # transaction open: roll it back, or every later BEGIN on this connection fails.
            if self.con.in_transaction:
                self.con.execute("ROLLBACK")
            raise

    @property
    def files_dir(self) -> Path:
        """Voxel files live in `<study>.files/` beside the database."""
        return self.path.with_name(self.path.name + ".files")

    def setting(self, key: str, default: str | None = None) -> str | None:
        row = self.con.execute("SELECT value FROM study WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def match_radius_mm(self) -> float:
        return float(self.setting("match_radius_mm", "5.0"))

    @property
    def schema_version(self) -> int:
        return int(self.con.execute("PRAGMA user_version").fetchone()[0])

    def integrity_ok(self) -> bool:
        ok = self.con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return ok and not self.con.execute("PRAGMA foreign_key_check").fetchall()

    def problems(self, limit: int = 20) -> list[str]:
        """Everything found wrong, each a sentence: SQLite's full integrity check, rows that
        point at nothing, and voxel files missing or changed since they were recorded."""
        found: list[str] = []
        try:
            messages = [r[0] for r in self.con.execute(f"PRAGMA integrity_check({int(limit)})")]
            found += [] if messages == ["ok"] else [f"SQLite integrity check: {m}" for m in messages]
            found += [f"table {r[0]} row {r[1]} refers to a missing row of {r[2]}" for r in self.con.execute("PRAGMA foreign_key_check")]
            rows = self.con.execute("SELECT path, sha256 FROM files ORDER BY id").fetchall()
        except sqlite3.DatabaseError as exc:
            return [*found, f"SQLite: {exc}"]
        for r in rows:
            path = self.files_dir / r["path"]
            if not path.is_file():
                found.append(f"voxel file {path.name} is missing from {path.parent}")
            elif sha256_of(path) != r["sha256"]:
                found.append(f"voxel file {path.name} was changed after it was recorded (sha256 differs)")
        return found

    def backup(self, dest: str | Path) -> Path:
        """A consistent copy of the study and its voxel files, taken while readers may be at work.

        The database is copied with SQLite's backup API (a snapshot of the last commit), then
        the voxel files: each file a row refers to was written before its row was committed,
        so all of them are there. Both are written under temporary names and renamed into
        place, the database last, and the copy's files are checked against its sha256s.
        """
        dest = Path(dest)
        dest_files = dest.with_name(dest.name + ".files")
        for p in (dest, dest_files):
            if p.exists():
                raise StudyError(f"backup {p} exists already: choose a new name (a backup never overwrites)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp_db = dest.with_name(f".tmp-{secrets.token_hex(4)}-{dest.name}")
        tmp_files = tmp_db.with_name(tmp_db.name + ".files")
        try:
            target = sqlite3.connect(str(tmp_db))
            try:
                self.con.backup(target)
                # One self-contained file (no -wal beside it to lose); opening it switches back to WAL.
                target.execute("PRAGMA journal_mode = DELETE")
                rows = target.execute("SELECT path, sha256 FROM files").fetchall()
            finally:
                target.close()
            if self.files_dir.is_dir():
                shutil.copytree(self.files_dir, tmp_files, ignore=shutil.ignore_patterns(".tmp-*"))
            for path, digest in rows:
                copied = tmp_files / path
                if not copied.is_file() or sha256_of(copied) != digest:
                    raise StudyError(f"voxel file {Path(path).name} is missing or changed in the study: not a backup to trust")
            if tmp_files.exists():
                tmp_files.rename(dest_files)
            tmp_db.rename(dest)
        except BaseException:
            tmp_db.unlink(missing_ok=True)
            shutil.rmtree(tmp_files, ignore_errors=True)
            raise
        return dest

    # --- cases and readers -------------------------------------------------------------

    def add_case(self, name: str, image: str, detections: str | None = None, detector_seconds: float | None = None) -> int:
        reason = unsafe_name_reason(name)
        if reason:  # the name names the case's files (cmbdetect detect's rules)
            raise StudyError(f"{printable(name)}: {reason}")
        with self.transaction() as con:
            if con.execute("SELECT 1 FROM cases WHERE name = ?", (name,)).fetchone():
                raise StudyError(f"{name}: the study has this case already")
            position = con.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM cases").fetchone()[0]
            cur = con.execute(
                "INSERT INTO cases (name, image, detections, detector_seconds, position) VALUES (?, ?, ?, ?, ?)",
                (name, image, detections, detector_seconds, position),
            )
            return int(cur.lastrowid)

    def cases(self) -> list[Case]:
        rows = self.con.execute("SELECT * FROM cases ORDER BY position").fetchall()
        return [Case(r["id"], r["name"], r["image"], r["detections"], r["detector_seconds"], r["position"]) for r in rows]

    def case(self, name_or_id: str | int) -> Case:
        key = "id" if isinstance(name_or_id, int) else "name"
        r = self.con.execute(f"SELECT * FROM cases WHERE {key} = ?", (name_or_id,)).fetchone()
        if r is None:
            raise StudyError(f"case {name_or_id!r} is not in the study {self.path.name}")
        return Case(r["id"], r["name"], r["image"], r["detections"], r["detector_seconds"], r["position"])

    def add_reader(self, name: str) -> int:
        check_reader_name(name)
        with self.transaction() as con:
            row = con.execute("SELECT id FROM readers WHERE name = ?", (name,)).fetchone()
            if row:
                return int(row[0])
            return int(con.execute("INSERT INTO readers (name, created) VALUES (?, ?)", (name, now())).lastrowid)

    def readers(self) -> dict[int, str]:
        return {r["id"]: r["name"] for r in self.con.execute("SELECT id, name FROM readers ORDER BY id")}

    def reader_id(self, name: str) -> int:
        row = self.con.execute("SELECT id FROM readers WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StudyError(f"reader {name!r} is not in the study {self.path.name} (add them first)")
        return int(row[0])

    # --- lesions -----------------------------------------------------------------------

    def add_detector_lesions(self, case_id: int, lesions: list[dict]) -> None:
        """The detector's lesions of one case, all in one transaction (all or none)."""
        with self.transaction() as con:
            con.executemany(
                "INSERT INTO lesions (case_id, source, detector_label, r, a, s, diameter_mm, n_voxels, size_class, "
                "mean_probability, created) VALUES (?, 'detector', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (case_id, int(l["id"]), *map(float, l["ras"]), l.get("diameter_mm"), l.get("n_voxels"),
                     l.get("size_class"), l.get("mean_probability"), now())
                    for l in lesions
                ],
            )  # fmt: skip

    def lesions(self, case_id: int | None = None, reader_id: int | None = None, include_withdrawn: bool = False) -> list[StoredLesion]:
        """Detector lesions plus reader-added ones (of `reader_id` only, when given)."""
        query = "SELECT * FROM lesions"
        where, args = [], []
        if case_id is not None:
            where.append("case_id = ?")
            args.append(case_id)
        if reader_id is not None:
            where.append("(source = 'detector' OR added_by = ?)")
            args.append(reader_id)
        if where:
            query += " WHERE " + " AND ".join(where)
        rows = self.con.execute(query + " ORDER BY case_id, source, detector_label, id", args).fetchall()
        out = [
            StoredLesion(
                r["id"], r["case_id"], r["source"], r["detector_label"], r["added_by"], r["file_id"], (r["r"], r["a"], r["s"]),
                r["diameter_mm"], r["n_voxels"], r["size_class"], r["mean_probability"],
            )  # fmt: skip
            for r in rows
        ]
        if include_withdrawn:
            return out
        withdrawn = {v.lesion_id for v in self.current_verdicts() if v.verdict == "withdrawn"}
        return [l for l in out if l.id not in withdrawn]

    def add_reader_lesion(
        self, case_id: int, reader_id: int, path: str, sha256: str, ras: tuple[float, float, float],
        n_voxels: int, diameter_mm: float, size_class: str, certainty: str = "definite",
    ) -> int:  # fmt: skip
        """A lesion the detector missed, with its voxel file; one transaction for file row, lesion and verdict."""
        if certainty not in CERTAINTIES:
            raise StudyError(f"certainty must be one of {', '.join(CERTAINTIES)}, not {certainty!r}")
        with self.transaction() as con:
            stamp = now()
            file_id = con.execute(
                "INSERT INTO files (case_id, reader_id, kind, path, sha256, created) VALUES (?, ?, 'added', ?, ?, ?)",
                (case_id, reader_id, path, sha256, stamp),
            ).lastrowid
            lesion_id = con.execute(
                "INSERT INTO lesions (case_id, source, added_by, file_id, r, a, s, diameter_mm, n_voxels, size_class, created) "
                "VALUES (?, 'reader', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (case_id, reader_id, file_id, *map(float, ras), diameter_mm, n_voxels, size_class, stamp),
            ).lastrowid
            # The reader's own verdict on what they added: a lesion, with their certainty.
            con.execute(
                "INSERT INTO verdicts (lesion_id, reader_id, verdict, reason, certainty, created) VALUES (?, ?, 'correct', NULL, ?, ?)",
                (lesion_id, reader_id, certainty, stamp),
            )
            return int(lesion_id)

    def file(self, file_id: int) -> tuple[Path, str]:
        row = self.con.execute("SELECT path, sha256 FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise StudyError(f"file {file_id} is not in the study")
        return self.files_dir / row["path"], row["sha256"]

    # --- verdicts ----------------------------------------------------------------------

    def record_verdict(
        self, lesion_id: int, reader_id: int, verdict: str, reason: str | None = None, certainty: str = "definite"
    ) -> None:
        """One reader's verdict on one lesion; supersedes their earlier verdict, which stays in the history."""
        if verdict not in VERDICTS:
            raise StudyError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        if verdict == "incorrect":
            if reason not in MIMIC_REASONS:
                raise StudyError(f"an incorrect label needs a mimic reason, one of {', '.join(MIMIC_REASONS)}; got {reason!r}")
        elif reason is not None:
            raise StudyError("only an incorrect label takes a mimic reason")
        if certainty not in CERTAINTIES:
            raise StudyError(f"certainty must be one of {', '.join(CERTAINTIES)}, not {certainty!r}")
        with self.transaction() as con:
            lesion = con.execute("SELECT source, added_by FROM lesions WHERE id = ?", (lesion_id,)).fetchone()
            if lesion is None:
                raise StudyError(f"lesion {lesion_id} is not in the study")
            if lesion["source"] == "reader" and lesion["added_by"] != reader_id:
                raise StudyError(f"lesion {lesion_id} was added by another reader: readers judge the detector's lesions and add their own")
            con.execute(
                "INSERT INTO verdicts (lesion_id, reader_id, verdict, reason, certainty, created) VALUES (?, ?, ?, ?, ?, ?)",
                (lesion_id, reader_id, verdict, reason, certainty, now()),
            )

    def withdraw_added(self, lesion_id: int, reader_id: int) -> None:
        """Take back a lesion one added (a history row, like every decision)."""
        with self.transaction() as con:
            row = con.execute("SELECT added_by FROM lesions WHERE id = ? AND source = 'reader'", (lesion_id,)).fetchone()
            if row is None or row[0] != reader_id:
                raise StudyError(f"lesion {lesion_id} is not one this reader added")
            con.execute(
                "INSERT INTO verdicts (lesion_id, reader_id, verdict, created) VALUES (?, ?, 'withdrawn', ?)",
                (lesion_id, reader_id, now()),
            )

    def current_verdicts(self, reader_id: int | None = None) -> list[Verdict]:
        """The latest verdict per (reader, lesion): the current view of the append-only history."""
        query = (
            "SELECT v.* FROM verdicts v JOIN (SELECT reader_id, lesion_id, MAX(id) AS last FROM verdicts GROUP BY reader_id, lesion_id) l "
            "ON v.id = l.last"
        )
        args: tuple = ()
        if reader_id is not None:
            query += " WHERE v.reader_id = ?"
            args = (reader_id,)
        rows = self.con.execute(query + " ORDER BY v.reader_id, v.lesion_id", args).fetchall()
        return [Verdict(r["lesion_id"], r["reader_id"], r["verdict"], r["reason"], r["certainty"], r["created"]) for r in rows]

    def history(self) -> list[dict]:
        rows = self.con.execute(
            "SELECT v.id, c.name AS case_name, rd.name AS reader, v.lesion_id, l.source, l.detector_label, v.verdict, v.reason, "
            "v.certainty, v.created FROM verdicts v JOIN lesions l ON l.id = v.lesion_id JOIN cases c ON c.id = l.case_id "
            "JOIN readers rd ON rd.id = v.reader_id ORDER BY v.id"
        ).fetchall()
        return [dict(r) for r in rows]

    # --- reading time, ground truth, endorsement --------------------------------------

    def record_reading(self, case_id: int, reader_id: int, seconds: float, completed: bool = True, comment: str | None = None) -> None:
        """Time spent on a case in one sitting; a case's reading time is the sum of its sittings."""
        if not seconds >= 0:
            raise StudyError(f"reading time must be >= 0 s, not {seconds}")
        with self.transaction() as con:
            con.execute(
                "INSERT INTO readings (case_id, reader_id, seconds, completed, comment, created) VALUES (?, ?, ?, ?, ?, ?)",
                (case_id, reader_id, float(seconds), int(bool(completed)), comment, now()),
            )

    def reading_seconds(self) -> dict[tuple[int, int], float]:
        """(case_id, reader_id) -> total seconds over all sittings."""
        rows = self.con.execute("SELECT case_id, reader_id, SUM(seconds) FROM readings GROUP BY case_id, reader_id")
        return {(r[0], r[1]): float(r[2]) for r in rows}

    def completed_cases(self, reader_id: int) -> set[int]:
        rows = self.con.execute("SELECT DISTINCT case_id FROM readings WHERE reader_id = ? AND completed = 1", (reader_id,))
        return {r[0] for r in rows}

    def resume_position(self, reader_id: int) -> int:
        """Index in the case list of the first case this reader has not completed (len if all done)."""
        done = self.completed_cases(reader_id)
        cases = self.cases()
        return next((n for n, c in enumerate(cases) if c.id not in done), len(cases))

    def add_groundtruth(self, case_id: int, reader_id: int, path: str, sha256: str) -> int:
        with self.transaction() as con:
            file_id = con.execute(
                "INSERT INTO files (case_id, reader_id, kind, path, sha256, created) VALUES (?, ?, 'groundtruth', ?, ?, ?)",
                (case_id, reader_id, path, sha256, now()),
            ).lastrowid
            return int(
                con.execute(
                    "INSERT INTO groundtruths (case_id, reader_id, file_id, created) VALUES (?, ?, ?, ?)",
                    (case_id, reader_id, file_id, now()),
                ).lastrowid
            )

    def groundtruths(self, case_id: int) -> list[dict]:
        """Every ground-truth labelling of a case, latest last, with who endorsed it."""
        rows = self.con.execute(
            "SELECT g.id, g.reader_id, g.file_id, g.created, f.path, f.sha256 FROM groundtruths g JOIN files f ON f.id = g.file_id "
            "WHERE g.case_id = ? ORDER BY g.id",
            (case_id,),
        ).fetchall()
        out = []
        for r in rows:
            endorsers = [e[0] for e in self.con.execute("SELECT reader_id FROM endorsements WHERE groundtruth_id = ?", (r["id"],))]
            out.append({**dict(r), "endorsed_by": endorsers})
        return out

    def endorse(self, groundtruth_id: int, reader_id: int) -> None:
        """A second reader endorses a ground truth; its author cannot endorse their own."""
        with self.transaction() as con:
            row = con.execute("SELECT reader_id FROM groundtruths WHERE id = ?", (groundtruth_id,)).fetchone()
            if row is None:
                raise StudyError(f"ground truth {groundtruth_id} is not in the study")
            if row[0] == reader_id:
                raise StudyError("a ground truth is endorsed by a second reader, not by its author")
            con.execute(
                "INSERT INTO endorsements (groundtruth_id, reader_id, created) VALUES (?, ?, ?)", (groundtruth_id, reader_id, now())
            )

    # --- imported decision files --------------------------------------------------------

    def imported(self, sha256: str) -> dict | None:
        """The earlier import of a file with this content (name, decisions, created), or None."""
        row = self.con.execute("SELECT name, decisions, created FROM imports WHERE sha256 = ?", (sha256,)).fetchone()
        return dict(row) if row else None

    def record_import(self, sha256: str, name: str, decisions: int) -> None:
        with self.transaction() as con:
            con.execute(
                "INSERT INTO imports (sha256, name, decisions, created) VALUES (?, ?, ?, ?)", (sha256, name, int(decisions), now())
            )

    def summary(self) -> dict:
        count = lambda table: self.con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: E731
        return {
            "study": self.setting("name"),
            "path": str(self.path),
            "schema_version": self.schema_version,
            "cases": count("cases"),
            "readers": list(self.readers().values()),
            "detector_lesions": self.con.execute("SELECT COUNT(*) FROM lesions WHERE source = 'detector'").fetchone()[0],
            "verdict_rows": count("verdicts"),
            "imported_files": count("imports"),
            "match_radius_mm": self.match_radius_mm,
        }


def check_reader_name(name: str) -> None:
    """Reader names go into file names: keep them to letters, digits, '-' and '_'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name or ""):
        raise StudyError(f"reader name {name!r}: use 1-64 letters, digits, '-' or '_' (it names the reader's files)")
